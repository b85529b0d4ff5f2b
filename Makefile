# make demo   set up .venv and run the default job (a worker is killed mid-run; the run recovers)
# make test   set up .venv and run the test suite (starts its own Ray and S3 servers)
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: setup demo test unit lint bench campaign clean
setup: $(VENV)/.installed

# torch first, pinned: the CPU build; an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The demo run is runs/$(DEMO_NAME): runs/digits, where README's commands and
# deploy/serve/config.yaml look. Run again, it continues an unfinished demo run and reports a
# finished one (--resume-if-exists); `make demo DEMO_NAME=digits2` trains a fresh one.
DEMO_NAME ?= digits
DEMO_RUN := runs/$(DEMO_NAME)
DEMO_SERVE := $(if $(filter digits,$(DEMO_NAME)),serve run deploy/serve/config.yaml,serve run deploy.serve.app:app run_uri=$(DEMO_RUN))
demo: setup
	@$(BIN)/orchestrator run configs/digits.yaml --set name=$(DEMO_NAME) --resume-if-exists || { rc=$$?; \
	  echo "[demo] exit $$rc (the error is above). \`make demo\` continues an unfinished demo run;" \
	    "\`make demo DEMO_NAME=digits2\` trains a fresh one in runs/digits2" >&2; exit $$rc; }
	@echo "[demo] the run is $(DEMO_RUN). Next (after \`source $(VENV)/bin/activate\`):"
	@echo "  orchestrator checkpoints $(DEMO_RUN)              # what is kept, and why"
	@echo "  orchestrator best $(DEMO_RUN) --download out/     # a verified copy of the best checkpoint"
	@echo "  orchestrator plot $(DEMO_RUN) --out curves.png    # the loss curves, the restart marked"
	@echo "  $(DEMO_SERVE)   # POST /predict at 127.0.0.1:8000; Ctrl-C stops it"
	@echo "  make demo DEMO_NAME=digits2                      # the demo again, as a new run (runs/digits2)"

# Two test processes (pytest-xdist), a file each at a time, in the files' order. An end-to-end
# test keeps about 1.4 cores busy (process start-ups, Ray's actors, training): the suite is
# CPU-bound on 2 cores (3478 CPU-s in 1869 s of wall time, measured). Handing the longest tests
# out first (two heavy tests at once) made each 1.0-2.4x slower; files in order mix heavy and light.
TEST_PROCS ?= 2
test: setup
	$(BIN)/pytest -q -ra -n $(TEST_PROCS) --dist loadfile --durations=30

unit: setup
	$(BIN)/pytest -q -m "not e2e"

lint: setup
	$(BIN)/ruff check orchestrator workers tests bench harness deploy examples
	$(BIN)/ruff format --check orchestrator workers tests bench harness deploy examples
	$(BIN)/mypy orchestrator workers

# Side by side with bare Ray Train in one sitting (about 18 minutes, and about 20 more for the
# scale simulation; `python -m bench --quick` about 5 + 5). Writes bench/results.json and prints the tables docs/benchmarks.md shows.
bench: setup
	$(PY) -m bench

# The seeded fault campaign docs/reliability.md reports (about 70 minutes on a shared 2-core machine:
# a third of the runs hold a partition, which starts a second cluster and waits out a lease).
CAMPAIGN_RUNS ?= 30
CAMPAIGN_SEED ?= 12
campaign: setup
	$(PY) -m harness.campaign --runs $(CAMPAIGN_RUNS) --seed $(CAMPAIGN_SEED) --json bench/results/campaign.json

clean:
	rm -rf $(VENV) runs

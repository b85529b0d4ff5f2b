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

demo: setup
	$(BIN)/orchestrator run configs/digits.yaml --set name=digits-$$(date +%Y%m%d-%H%M%S)

# Two test processes (pytest-xdist), a file each at a time: most of an end-to-end test is
# waiting on process start-up and Ray's restarts, not computing, so two overlap well on 2 cores.
TEST_PROCS ?= 2
test: setup
	$(BIN)/pytest -q -ra -n $(TEST_PROCS) --dist loadfile --durations=30

unit: setup
	$(BIN)/pytest -q -m "not e2e"

lint: setup
	$(BIN)/ruff check orchestrator workers tests bench
	$(BIN)/mypy orchestrator workers

# Side by side with bare Ray Train in one sitting (about 18 minutes; `python -m bench --quick`
# about 5). Writes bench/results.json and prints the tables docs/benchmarks.md shows.
bench: setup
	$(PY) -m bench

# The seeded fault campaign docs/reliability.md reports (about 50 minutes on a shared 2-core machine).
CAMPAIGN_RUNS ?= 30
CAMPAIGN_SEED ?= 12
campaign: setup
	$(PY) -m bench.campaign --runs $(CAMPAIGN_RUNS) --seed $(CAMPAIGN_SEED) --json bench/results/campaign.json

clean:
	rm -rf $(VENV) runs

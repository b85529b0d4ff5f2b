"""Every rank's output is kept with the run (RUN_URI/logs/rank-<r>-attempt-<a>.log), and a
failed run's error names the log of the rank that failed: a real run whose train function
prints on each rank (stdout and stderr), then raises on rank 1."""

from __future__ import annotations

import sys

import pytest

from harness.cli import run_cli
from orchestrator.core.manifest import read_jsonl
from orchestrator.core.storage import Storage
from workers.rank_log import RankLog, Tee

TRAIN = """
import sys, time


def train(session):
    ctx = session.context
    for i in range(3):
        print(f"rank {ctx.rank} says {i}")
    print(f"rank {ctx.rank} on stderr", file=sys.stderr)
    if ctx.rank == 1:
        time.sleep(2)  # rank 0 has ended its attempt by then: both logs are whole
        raise ValueError("rank 1 cannot go on")
"""


def test_a_rank_log_copies_what_the_rank_prints_and_keeps_it_in_storage(tmp_path):
    before = sys.stdout, sys.stderr
    rank_log = RankLog(str(tmp_path / "run"), {}, 3)
    try:
        assert isinstance(sys.stdout, Tee)
        print("a line of rank 3")
        print("an error line", file=sys.stderr)
        rank_log.attempt = 2
    finally:
        rank_log.close()
    assert (sys.stdout, sys.stderr) == before  # the streams are as they were
    text = (tmp_path / "run" / "logs" / "rank-3-attempt-2.log").read_text()
    assert "a line of rank 3\n" in text and "an error line\n" in text
    assert rank_log.uri == str(tmp_path / "run" / "logs" / "rank-3-attempt-2.log")


@pytest.mark.e2e
def test_every_ranks_output_is_in_storage_and_the_failure_names_rank_1s_log(tmp_path):
    (tmp_path / "shout.py").write_text(TRAIN)
    p = run_cli(
        "run",
        "configs/digits.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "name=logs",
        "--set",
        f"task.name={tmp_path / 'shout.py'}:train",
        "--set",
        "chaos.kills=[]",
        "--set",
        "failure.max_failures=0",
        "--address",
        "local",
    )
    assert p.returncode == 1, p.stderr[-4000:]
    run = tmp_path / "logs"
    logs = run / "logs"
    assert sorted(f.name for f in logs.iterdir()) == ["rank-0-attempt-1.log", "rank-1-attempt-1.log"]
    for rank in (0, 1):
        text = (logs / f"rank-{rank}-attempt-1.log").read_text()
        for line in (f"rank {rank} says 0", f"rank {rank} says 2", f"rank {rank} on stderr"):
            assert line in text, (rank, text[-2000:])
    failed = (logs / "rank-1-attempt-1.log").read_text()
    assert "Traceback" in failed and "ValueError: rank 1 cannot go on" in failed, failed[-2000:]
    assert "ValueError" not in (logs / "rank-0-attempt-1.log").read_text()

    # the console's error names rank 1's log, as the worker_error event does
    where = str(logs / "rank-1-attempt-1.log")
    assert f"rank 1's log: {where}" in p.stderr, p.stderr[-3000:]
    (error,) = [e for e in read_jsonl(Storage(str(run)), "events.jsonl") if e["kind"] == "worker_error"]
    assert (error["rank"], error["log"]) == (1, where)

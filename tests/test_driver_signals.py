"""The driver's own process: what happens when it is killed, interrupted or preempted.

Real CLI runs on an embedded Ray, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from harness.cli import jsonl, manifest, run_cli, start_cli, wait_until

pytestmark = pytest.mark.e2e


def _run_args(tmp_path: Path, name: str, *sets: str) -> list[str]:
    return [
        "run",
        "configs/digits.yaml",
        "--set",
        f"name={name}",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "chaos.kills=[]",
        *(a for s in sets for a in ("--set", s)),
    ]


def _training(tmp_path: Path, name: str, kill_group, *sets: str) -> tuple[subprocess.Popen, Path, Path]:  # noqa: ANN001
    """`orchestrator run` in the background, once its first epoch is reported."""
    run_dir, log = tmp_path / name, tmp_path / f"{name}.log"
    p = start_cli(*_run_args(tmp_path, name, *sets), log=log)
    kill_group(p)
    wait_until(lambda: jsonl(run_dir / "metrics.jsonl"), 180, "the first epoch")
    return p, run_dir, log


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_embedded_ray_goes_away_with_a_sigkilled_driver(tmp_path, kill_group):
    p, run_dir, _ = _training(tmp_path, "reap", kill_group, "epochs=40")
    ray_procs = [
        c for c in psutil.Process(p.pid).children(recursive=True) if "reaper" not in " ".join(c.cmdline())
    ]
    assert any(c.name() == "raylet" for c in ray_procs), [c.name() for c in ray_procs]
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    try:
        wait_until(lambda: not any(_alive(c) for c in ray_procs), 30, "the embedded Ray to stop")
    finally:
        left = [c for c in ray_procs if _alive(c)]
        for c in left:
            c.kill()
    assert not left
    # and the run is one `resume` continues (the lease of a dead driver is taken over)
    assert manifest(run_dir)["status"] == "running"


def _events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in jsonl(run_dir / "events.jsonl") if e["kind"] == kind]


# Enough epochs that the run is still going when the stop lands: the driver's request reaches
# rank 0 through the coordinator's answer to a tick, and is agreed on every 10 steps. Under
# the full suite's load 8 digits epochs were not enough once (stop 24's check: the run
# finished before the stop landed); a run stopped early costs nothing for the epochs it did
# not train. Replica groups never wait on Ray Train's poll between epochs: shorter epochs.
@pytest.mark.parametrize(("mode", "epochs"), [("restart", 20), ("replicas", 30)])
def test_sigterm_on_the_driver_commits_a_checkpoint_stops_and_resume_continues(
    tmp_path, kill_group, mode, epochs
):
    p, run_dir, log = _training(tmp_path, "term", kill_group, f"epochs={epochs}", f"failure.mode={mode}")
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=150) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    out = log.read_text()
    assert "*** SIGTERM received" not in out  # not Ray's fatal-signal dump
    assert "interrupted" in out and f"orchestrator resume {run_dir}" in out, out[-2000:]
    m = manifest(run_dir)
    assert m["stopped"]["kind"] == "interrupt"
    asked = _events(run_dir, "stop_requested")
    assert len(asked) == 1
    after = [e for e in _events(run_dir, "commit") if e["ts"] >= asked[0]["ts"]]
    assert after, "no checkpoint committed after the stop request"
    assert m["checkpoints"][-1]["id"] == after[-1]["id"]
    assert not (run_dir / "lease.json").exists()  # released: resume needs no wait

    r = run_cli("resume", str(run_dir), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert manifest(run_dir)["status"] == "finished"
    reported = [row["epoch"] for row in jsonl(run_dir / "metrics.jsonl")]
    assert sorted(reported) == list(range(1, epochs + 1)), reported  # every epoch once
    assert _events(run_dir, "attempt_started")[-1].get("restore") == after[-1]["id"]


def test_a_second_ctrl_c_stops_the_driver_at_once(tmp_path, kill_group):
    p, run_dir, log = _training(tmp_path, "int", kill_group, "epochs=40")
    os.kill(p.pid, signal.SIGINT)
    wait_until(lambda: "again stops at once" in log.read_text(), 30, "the first Ctrl-C's message")
    os.kill(p.pid, signal.SIGINT)
    assert p.wait(timeout=60) == 128 + signal.SIGINT, log.read_text()[-3000:]
    out = log.read_text()
    assert "stopped at once on SIGINT" in out and "orchestrator resume" in out, out[-2000:]
    assert manifest(run_dir)["status"] == "running"  # not finished: resume continues it
    assert not (run_dir / "lease.json").exists()


def test_a_preempted_worker_commits_a_checkpoint_before_the_group_restarts(tmp_path, kill_group):
    p, run_dir, log = _training(tmp_path, "pre", kill_group, "epochs=6", "failure.checkpoint_on_preempt=true")
    workers = [c for c in psutil.Process(p.pid).children(recursive=True) if "RayTrainWorker" in c.name()]
    assert len(workers) == 2, [c.name() for c in psutil.Process(p.pid).children(recursive=True)]
    sent = time.time()
    workers[1].send_signal(signal.SIGTERM)
    assert p.wait(timeout=300) == 0, log.read_text()[-3000:]

    restarts = _events(run_dir, "restart")
    assert len(restarts) == 1 and "Preempted" in restarts[0]["reason"], restarts
    saved = [e for e in _events(run_dir, "commit") if sent <= e["ts"] <= restarts[0]["ts"]]
    assert saved, "no checkpoint committed between the notice and the restart"
    # the new attempt starts from that checkpoint: nothing trained before the notice is redone
    assert _events(run_dir, "attempt_started")[-1]["restore"] == saved[-1]["id"]
    epochs = [row["epoch"] for row in jsonl(run_dir / "metrics.jsonl")]
    assert sorted(epochs) == list(range(1, 7)), epochs

"""The driver's own process: what happens when it is killed, interrupted or preempted.

Real CLI runs on an embedded Ray, real signals."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
from conftest import jsonl, manifest, start_cli, wait_until

pytestmark = pytest.mark.e2e


def _run_args(tmp_path: Path, name: str, *sets: str) -> list[str]:
    return ["run", "configs/digits.yaml", "--set", f"name={name}", "--set", f"storage.root={tmp_path}",
            "--set", "chaos.kills=[]", *(a for s in sets for a in ("--set", s))]  # fmt: skip


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_embedded_ray_goes_away_with_a_sigkilled_driver(tmp_path, kill_group):
    log = tmp_path / "run.log"
    p = start_cli(*_run_args(tmp_path, "reap", "epochs=40"), log=log)
    kill_group(p)
    wait_until(lambda: jsonl(tmp_path / "reap" / "metrics.jsonl"), 180, "the first epoch")
    ray_procs = [c for c in psutil.Process(p.pid).children(recursive=True) if "reaper" not in " ".join(c.cmdline())]
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
    assert manifest(tmp_path / "reap")["status"] == "running"

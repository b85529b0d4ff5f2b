"""Shared helpers for tests that run the real CLI, real Ray and real process kills."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "orchestrator"]


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def run_cli(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [*CLI, *args],
        cwd=ROOT,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"orchestrator {' '.join(args)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
        )
    return p


def start_cli(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The CLI in the background, in its own process group, output to log."""
    f = open(log, "wb")
    return subprocess.Popen(
        [*CLI, *args],
        cwd=ROOT,
        env=env or cli_env(),
        stdout=f,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "manifest.json").read_text())


def wait_until(pred: Any, timeout: float, what: str, interval: float = 0.5) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def expected_kept(metrics: list[dict[str, Any]], monitor: str, mode: str, top_k: int) -> set[int]:
    """Epochs best-k ∪ latest should leave, computed from the metrics history alone
    (every epoch checkpointed; ties go to the newer)."""
    sign = 1 if mode == "min" else -1
    ranked = sorted(metrics, key=lambda r: (sign * r[monitor], -r["epoch"]))
    return {r["epoch"] for r in ranked[:top_k]} | {max(r["epoch"] for r in metrics)}


@pytest.fixture
def kill_group():
    """Processes started with start_cli; whatever is still running at the end is killed."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs.append
    import signal

    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """moto's standalone S3 server on a free loopback port, stopped (by pid) at the end."""
    from s3_support import MotoServer

    server = MotoServer.start(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()
    assert server.proc.poll() is not None


@pytest.fixture
def bucket(moto, request):
    """A fresh bucket per test."""
    import re

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-b"
    moto.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_env(moto, monkeypatch):
    """AWS settings the way AWS tools take them, in this process and for CLI subprocesses."""
    from s3_support import CREDS

    env = {**CREDS, "AWS_ENDPOINT_URL": moto.endpoint}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


_SERVICE_NAMES = ("raylet", "gcs_server", "moto_server")
# Every process this suite starts inherits this mark (cli_env copies os.environ), so the
# check below sees only this test process's servers: not another suite's running beside it,
# and, under pytest-xdist, not another worker's (the controller sets the mark first and every
# worker inherits it; a worker that finished early once killed the other's moto server).
# A worker's subprocesses (the campaign) inherit the worker's mark and count as its own.
_MARK = "ORCHESTRATOR_TEST_SESSION"
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
if not os.environ.get(_MARK, "").endswith(f"/{_WORKER}"):
    os.environ[_MARK] = f"{os.getpid()}-{time.time():.0f}/{_WORKER}"


def _service_pids() -> set[tuple[int, float]]:
    out = set()
    for p in psutil.process_iter(["name", "cmdline", "create_time"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if not (p.info["name"] in _SERVICE_NAMES or any(f"/{n}" in cmd for n in _SERVICE_NAMES)):
            continue
        with contextlib.suppress(psutil.Error):
            if p.environ().get(_MARK) == os.environ[_MARK]:
                out.add((p.pid, p.info["create_time"]))
    return out


@pytest.fixture(scope="session", autouse=True)
def no_service_outlives_the_suite():
    """Every raylet, GCS and S3 server this suite started is gone when it ends."""
    yield
    end = time.time() + 30
    left = _service_pids()
    while left and time.time() < end:
        time.sleep(1)
        left = _service_pids()
    for pid, _ in left:  # do not leave them to the next run, but do fail
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
    assert not left, f"processes started by tests still running: {sorted(left)}"

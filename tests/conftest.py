"""The suite's fixtures, and its guard that no server it started outlives it. The helpers the
tests, the fault campaign and the benchmarks share (the CLI as a subprocess, local Ray clusters,
moto's S3 server) are the `harness` package."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import psutil
import pytest


@pytest.fixture(scope="session", autouse=True)
def project_console():
    """The project's `[tag] message` lines on stdout and stderr, as the CLI's main and the
    workers configure them (tests read them with capsys)."""
    from orchestrator.core import console

    console.configure()


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
    from harness.s3 import MotoServer

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
    from harness.s3 import CREDS

    env = {**CREDS, "AWS_ENDPOINT_URL": moto.endpoint}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


_SERVICE_NAMES = ("raylet", "gcs_server", "moto_server")
# Every process this suite starts inherits this mark (harness.cli.cli_env copies os.environ), so the
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

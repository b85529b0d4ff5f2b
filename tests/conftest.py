"""The suite's fixtures, and its guard that no server it started outlives it. The helpers the
tests, the fault campaign and the benchmarks share (the CLI as a subprocess, local Ray clusters,
moto's S3 server) are the `harness` package."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

# -- scheduling: the longest work first ------------------------------------------------------------
# `make test` runs pytest-xdist with `--dist loadgroup`: every test is its own unit of work, except
# tests that share a module-scoped fixture (a Ray cluster), which go to one process together. xdist
# hands units out in collection order, so the suite orders them longest first (the classic
# longest-processing-time rule): a 6-minute test that starts last would otherwise be the tail of the
# whole run. The expected seconds are tests/durations.json, measured by a whole run
# (`ORCHESTRATOR_STORE_DURATIONS=1 make test` rewrites it); a test it does not know counts as the
# median of its kind (end to end or not).
DURATIONS = Path(__file__).with_name("durations.json")


def _module_scoped(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.values() if info else ()
    return any(d[-1].scope == "module" for d in defs if d)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    known: dict[str, float] = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    e2e = sorted(v for k, v in known.items() if v >= 10) or [30.0]
    default = {True: e2e[len(e2e) // 2], False: 1.0}
    unit_of: dict[str, str] = {}
    for item in items:
        unit_of[item.nodeid] = item.nodeid
        if _module_scoped(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
            unit_of[item.nodeid] = item.module.__name__
    weight: dict[str, float] = {}
    for item in items:
        seconds = known.get(item.nodeid, default[item.get_closest_marker("e2e") is not None])
        weight[unit_of[item.nodeid]] = weight.get(unit_of[item.nodeid], 0.0) + seconds
    order = {item.nodeid: i for i, item in enumerate(items)}
    items.sort(key=lambda it: (-weight[unit_of[it.nodeid]], unit_of[it.nodeid], order[it.nodeid]))


_measured: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if os.environ.get("ORCHESTRATOR_STORE_DURATIONS"):
        _measured[report.nodeid.split("@")[0]] = (
            _measured.get(report.nodeid.split("@")[0], 0.0) + report.duration
        )


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _measured and not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller sees every report
        DURATIONS.write_text(
            json.dumps({k: round(v, 1) for k, v in sorted(_measured.items())}, indent=0) + "\n"
        )


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

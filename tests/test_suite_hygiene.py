"""The suite's own guard, `no_service_outlives_the_suite`, under `make test`'s two processes
(pytest-xdist): one test process that ends first must not take the other's servers for its own
leftovers. Seen in CI: a worker that finished early killed the other worker's moto server and
embedded Ray 30 s later, in the middle of a test."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from harness.cli import ROOT

NESTED_CONFTEST = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("suite_conftest", {str(ROOT / "tests" / "conftest.py")!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
no_service_outlives_the_suite = suite.no_service_outlives_the_suite
"""

# Holds a process that the guard counts as a server (its command line names /moto_server)
# until the other test process has ended, then checks that it was left alone.
HOLDS_A_SERVER = """
import os, subprocess, time
from pathlib import Path

def test_holds_a_server(tmp_path_factory):
    server = subprocess.Popen(["bash", "-c", "exec -a /fake/moto_server sleep 120"])
    try:
        Path(os.environ["HANDOFF"] + ".up").write_text("")  # the other test ends after this
        marker = Path(os.environ["HANDOFF"])
        end = time.time() + 20
        while not marker.exists() and time.time() < end:
            time.sleep(0.2)
        worker, _ = marker.read_text().split()
        assert worker != os.environ["PYTEST_XDIST_WORKER"], "both files ran in one test process"
        # The other process's guard waits up to 30 s for what it counts as its own, then kills it.
        time.sleep(35)
        assert server.poll() is None, "the other test process killed this one's server"
    finally:
        server.terminate()
        server.wait()
"""

ENDS_FIRST = """
import os, time
from pathlib import Path

def test_ends_first():
    up = Path(os.environ["HANDOFF"] + ".up")
    end = time.time() + 20
    while not up.exists() and time.time() < end:
        time.sleep(0.2)
    Path(os.environ["HANDOFF"]).write_text(f"{os.environ['PYTEST_XDIST_WORKER']} {os.getpid()}")
"""


def test_one_test_process_leaves_the_others_servers_alone(tmp_path):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(NESTED_CONFTEST))
    (tmp_path / "test_a.py").write_text(textwrap.dedent(HOLDS_A_SERVER))
    (tmp_path / "test_b.py").write_text(textwrap.dedent(ENDS_FIRST))
    env = {"HANDOFF": str(tmp_path / "handoff"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n",
            "2",
            "--dist",
            "loadfile",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "2 passed" in p.stdout, p.stdout[-2000:]

"""`run` next to another Ray on the machine: a stale `ray_current_cluster` marker (a head
killed without `ray stop`) must not break it, and `--address local` always starts a fresh
embedded Ray whatever the marker says.

The marker is written where Ray itself keeps it, in a Ray temp dir of this test's own
(RAY_TMPDIR, which Ray honours): the machine's real /tmp/ray/ray_current_cluster, which other
processes may use, is never touched.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from harness.cli import cli_env, run_cli
from harness.s3 import free_port
from orchestrator.ray_compat import current_cluster

SMALL = {"chaos": {"kills": []}, "epochs": 1, "scaling": {"num_workers": 1}}


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    """A Ray temp dir of this test's own; short, for the unix sockets Ray makes under it."""
    d = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def stale_marker(ray_tmpdir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """The marker `ray start --head` leaves behind when its head is killed without `ray stop`:
    a GCS address where nothing listens any more, in the file Ray itself reads (checked)."""
    from ray._private.utils import write_ray_address  # what `ray start --head` calls

    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmpdir))
    marker = ray_tmpdir / "ray" / "ray_current_cluster"
    assert current_cluster() == (str(marker), None)
    address = f"127.0.0.1:{free_port()}"  # bound and released: a closed port
    marker.parent.mkdir(parents=True)  # `ray start` makes it with the session dir
    write_ray_address(address)
    assert marker.read_text() == address and current_cluster() == (str(marker), address)
    return marker, address


def small_job(tmp_path: Path) -> Path:
    f = tmp_path / "job.yaml"
    spec = {"name": "m", **SMALL, "storage": {"root": str(tmp_path / "runs")}}
    f.write_text(yaml.safe_dump(spec, sort_keys=False))
    return f


@pytest.mark.e2e
@pytest.mark.parametrize("address", [[], ["--address", "local"]], ids=["no-address", "address-local"])
def test_a_stale_ray_marker_does_not_break_run(tmp_path, ray_tmpdir, monkeypatch, address):
    marker, stale = stale_marker(ray_tmpdir, monkeypatch)
    env = cli_env(RAY_TMPDIR=str(ray_tmpdir), RAY_USAGE_STATS_ENABLED="0")
    p = run_cli("run", str(small_job(tmp_path)), *address, "--json", env=env, timeout=600)
    print(p.stderr[-3000:])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-5000:]
    assert json.loads(p.stdout)["status"] == "finished"
    assert "num_cpus and num_gpus must not be provided" not in p.stderr
    assert "Traceback" not in p.stderr, p.stderr[-5000:]
    notes = [line for line in p.stderr.splitlines() if "ray_current_cluster" in line]
    if address:  # --address local: the marker is not even read
        assert notes == [], notes
    else:  # one line: what was found, that it was ignored, how to choose
        (note,) = notes
        assert str(marker) in note and stale in note and "ignored" in note, note
        assert "--address HOST:PORT" in note, note
    assert marker.read_text() == stale  # left as it was: Ray's file, not ours


# -- the check alone, no Ray started ---------------------------------------------------------


def test_a_marker_whose_cluster_answers_is_joined_and_a_stale_one_noted(ray_tmpdir, monkeypatch, capsys):
    import socket

    from orchestrator.driver import _running_cluster

    marker, stale = stale_marker(ray_tmpdir, monkeypatch)
    assert _running_cluster() is None
    (note,) = capsys.readouterr().err.splitlines()
    assert note.startswith(f"[run] note: {marker} names a Ray cluster at '{stale}' that does not answer")
    assert "ignored it, starting an embedded Ray" in note and "--address HOST:PORT" in note, note

    with socket.socket() as live:  # something listens where the marker points: joined, no note
        live.bind(("127.0.0.1", 0))
        live.listen()
        address = f"127.0.0.1:{live.getsockname()[1]}"
        marker.write_text(address)
        assert _running_cluster() == address
    assert capsys.readouterr().err == ""

    marker.write_text("not-an-address")  # garbage: noted and ignored, never a traceback
    assert _running_cluster() is None
    assert "'not-an-address' that does not answer" in capsys.readouterr().err

    marker.unlink()  # no marker: nothing to say
    assert _running_cluster() is None and capsys.readouterr().err == ""

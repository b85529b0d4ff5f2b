"""A checkpoint file that is a malicious pickle (a `__reduce__` payload that creates a marker
file), committed with a record that matches it, as someone with write access to the run's
storage could leave it: every path that loads a checkpoint refuses it with a clear error, and
the payload never runs (the marker file never appears)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from harness.cli import ROOT, run_cli
from orchestrator.api import Run, load_best
from orchestrator.coordinator import RetentionConfig, RunLedger
from orchestrator.core.manifest import CHECKPOINTS, RECORD, CheckpointRecord, FileEntry
from orchestrator.core.storage import Storage, sha256_hex
from orchestrator.core.verify import CheckpointRefused
from workers.state import MODEL_FILE, STATE_FILE, load_tensor_file


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # what unpickling it calls: os.system("touch MARKER")
        return (os.system, (f"touch {self.marker}",))


def malicious(marker) -> bytes:
    """A torch checkpoint whose pickle calls os.system: the classic `__reduce__` attack."""
    buf = io.BytesIO()
    torch.save({"head.3.weight": torch.zeros(10, 64), "x": Payload(str(marker))}, buf)
    return buf.getvalue()


@pytest.fixture
def planted(tmp_path):
    """(run URI, marker path): a digits run whose only committed checkpoint is malicious."""
    marker = tmp_path / "PWNED"
    storage = Storage(str(tmp_path / "runs" / "evil"))
    storage.write_bytes("spec.yaml", b"name: evil\ntask: {name: digits}\nseed: 0\n")
    led = RunLedger(storage, "evil", RetentionConfig(monitor="val_loss", mode="min", top_k=1, keep_latest=1))
    led.start_attempt(1)
    cid = "epoch0001-step0000010-a1"
    files = []
    for name in (MODEL_FILE, STATE_FILE):
        data = malicious(marker)
        storage.write_bytes(f"{CHECKPOINTS}/{cid}/{name}", data)
        files.append(FileEntry(path=name, size=len(data), sha256=sha256_hex(data)))
    rec = CheckpointRecord(
        id=cid,
        epoch=1,
        step_in_epoch=10,
        global_step=10,
        end_of_epoch=True,
        metrics={"val_loss": 0.1},
        files=files,
        world_size=1,
        attempt=1,
    )
    storage.write_bytes(f"{CHECKPOINTS}/{cid}/{RECORD}", rec.model_dump_json().encode())
    led.commit(rec)
    return storage.uri, marker


def test_the_payload_runs_when_loaded_unsafely(tmp_path):
    """The guard that keeps the tests below honest: loaded the unsafe way, in another
    process, the file does create the marker."""
    marker = tmp_path / "PWNED"
    (tmp_path / "evil.pt").write_bytes(malicious(marker))
    code = f"import torch; torch.load({str(tmp_path / 'evil.pt')!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False, capture_output=True, timeout=120)
    assert marker.exists()


def refused(e: pytest.ExceptionInfo[BaseException], where: str) -> None:
    msg = str(e.value)
    assert where in msg and "refused to load: it is not plain tensors" in msg, msg
    assert "GLOBAL posix.system" in msg and "nothing in the file ran" in msg, msg


def test_the_worker_restore_refuses_it(planted):
    uri, marker = planted
    data = Storage(uri).read_bytes(f"{CHECKPOINTS}/epoch0001-step0000010-a1/{STATE_FILE}")
    with pytest.raises(CheckpointRefused) as e:
        load_tensor_file(data, "cpu", STATE_FILE)  # what workers/resume.py and the session call
    refused(e, STATE_FILE)
    assert not marker.exists()


def test_the_python_api_refuses_it(planted):
    uri, marker = planted
    for load in (lambda: Run(uri).weights(), lambda: Run(uri).weights("latest"), lambda: load_best(uri)):
        with pytest.raises(CheckpointRefused) as e:
            load()
        refused(e, f"{uri}/checkpoints/epoch0001-step0000010-a1/model.pt")
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript"])
def test_export_refuses_it(planted, tmp_path, fmt):
    uri, marker = planted
    p = run_cli("export", uri, "--out", str(tmp_path / "x"), "--format", fmt, timeout=300)
    assert p.returncode == 1, p.stderr
    assert "refused to load: it is not plain tensors" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not marker.exists() and not (tmp_path / "x" / "model.safetensors").exists()


def test_best_download_copies_it_without_loading_it(planted, tmp_path):
    uri, marker = planted
    p = run_cli("best", uri, "--download", str(tmp_path / "dl"), "--json", timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["downloaded"] == ["model.pt"]  # verified against its record, not loaded
    assert not marker.exists()
    with pytest.raises(CheckpointRefused):  # what the printed hint says to do with it
        load_tensor_file(str(tmp_path / "dl" / "model.pt"))
    assert not marker.exists()


def test_the_serve_app_refuses_it(planted, monkeypatch):
    uri, marker = planted
    monkeypatch.syspath_prepend(str(ROOT))  # deploy.serve.app imports from the repository root
    from deploy.serve.app import BestCheckpoint

    # The deployment's own class, under Serve's ingress wrapper (whose __init__ needs Serve).
    replica = next(c for c in BestCheckpoint.func_or_class.__mro__ if "_load" in vars(c))
    with pytest.raises(CheckpointRefused) as e:
        replica(uri, 60.0, {}, [1, 8, 8])
    refused(e, "model.pt")
    assert not marker.exists()

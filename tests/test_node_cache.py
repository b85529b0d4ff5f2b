"""The node-local tier (orchestrator/core/node_cache.py) and crashes during a background
upload, with the real writer, a real RunLedger (the coordinator's logic) and real files;
no Ray.

- The tier never serves a checkpoint whose bytes differ from the committed record: a
  corrupted, swapped or truncated local copy is passed over for shared storage's verified
  bytes, which then replace it.
- A crash during a background upload loses nothing committed: every earlier commit still
  verifies and the next attempt restores the latest committed one.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from harness.cli import ROOT, wait_until
from orchestrator.coordinator import RetentionConfig, RunLedger
from orchestrator.core.manifest import CHECKPOINTS, RECORD, CheckpointRecord, read_manifest
from orchestrator.core.node_cache import NodeCache, cache_root
from orchestrator.core.storage import Storage, sha256_hex
from orchestrator.core.verify import VerificationError, read_verified
from workers.config import WorkerConfig
from workers.writer import CheckpointWriter

CFG = RetentionConfig(monitor="val_loss", mode="min", top_k=3, keep_latest=1)
FILES = ("model.pt", "train_state.pt")


def open_run(tmp_path, tier=True, cls=Storage):
    storage = cls(str(tmp_path / "run"))
    if tier:
        storage.node_cache = NodeCache(str(tmp_path / "cache"), storage.uri)
    return storage


def meta(i: int) -> dict:
    return {
        "id": f"epoch{i:04d}-step{i * 10:07d}-a1",
        "epoch": i,
        "step_in_epoch": 0,
        "global_step": i * 10,
        "end_of_epoch": True,
        "metrics": {"val_loss": 1.0 / i},
        "metrics_fresh": True,
        "world_size": 1,
        "attempt": 1,
    }


def state(i: int) -> dict:
    """Every checkpoint's files have the same sizes and different bytes."""
    g = torch.Generator().manual_seed(i)
    return {
        "model.pt": {"w": torch.randn(128, 64, generator=g)},
        "train_state.pt": {"m": torch.randn(300, generator=g), "step": i * 10},
    }


def save_all(storage, n: int, start: int = 1) -> RunLedger:
    led = RunLedger(storage, "run", CFG)
    led.start_attempt(1)
    writer = CheckpointWriter(storage, led.commit)
    for i in range(start, start + n):
        writer.save(meta(i), state(i))
    writer.close()
    return led


def shared(storage) -> Storage:
    """The same run without a node-local tier: what shared storage alone holds."""
    return Storage(storage.uri)


def local_file(storage, cid: str, name: str) -> str:
    return os.path.join(storage.node_cache.dir, CHECKPOINTS, cid, name)


def test_rank0_keeps_its_last_committed_checkpoint_and_nothing_else(tmp_path):
    storage = open_run(tmp_path)
    save_all(storage, 3)
    latest = read_manifest(storage).latest()
    assert latest is not None and latest.id == meta(3)["id"]
    near = storage.node_cache
    assert os.listdir(os.path.join(near.dir, CHECKPOINTS)) == [latest.id]
    assert os.listdir(os.path.join(near.dir, "staging")) == []
    for f in latest.files:  # the sha256 computed while writing is the stored bytes' own
        data = shared(storage).read_bytes(f"{CHECKPOINTS}/{latest.id}/{f.path}")
        assert (len(data), sha256_hex(data)) == (f.size, f.sha256)
        with open(local_file(storage, latest.id, f.path), "rb") as fh:
            assert fh.read() == data


def test_a_matching_local_copy_is_used_without_shared_storage(tmp_path, capsys):
    storage = open_run(tmp_path)
    save_all(storage, 2)
    latest = read_manifest(storage).latest()
    expected = read_verified(shared(storage), latest)
    for name in FILES:  # shared storage loses the data files: only the local copy has them
        os.unlink(tmp_path / "run" / CHECKPOINTS / latest.id / name)
    assert read_verified(storage, latest) == expected
    assert "node-local copy matches its record" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["corrupt", "swap", "truncate", "empty", "delete"])
@pytest.mark.parametrize("name", FILES)
def test_a_local_copy_that_differs_from_the_record_is_never_served(tmp_path, capsys, damage, name):
    storage = open_run(tmp_path)
    save_all(storage, 3)
    latest = read_manifest(storage).latest()
    earlier = sorted(read_manifest(storage).checkpoints, key=lambda c: c.seq)[0]
    expected = read_verified(shared(storage), latest)
    path = local_file(storage, latest.id, name)
    with open(path, "rb") as fh:
        good = fh.read()
    if damage == "corrupt":
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0x01
    elif damage == "swap":  # another checkpoint's file: the same size, other bytes
        bad = bytearray(shared(storage).read_bytes(f"{CHECKPOINTS}/{earlier.id}/{name}"))
        assert len(bad) == len(good) and bad != good
    elif damage == "truncate":
        bad = bytearray(good[: len(good) // 2])
    elif damage == "empty":
        bad = bytearray()
    if damage == "delete":
        os.unlink(path)
    else:
        with open(path, "wb") as fh:
            fh.write(bad)

    got = read_verified(storage, latest)
    assert got == expected  # shared storage's verified bytes...
    if damage != "delete":
        assert got[name] != bytes(bad)  # ...not the local ones
        assert "node-local copy not used" in capsys.readouterr().out
    with open(path, "rb") as fh:  # the local copy is refreshed from them
        assert fh.read() == expected[name]


def test_a_stale_local_copy_of_another_checkpoint_is_not_used(tmp_path):
    """The local copy holds an older checkpoint's files under the latest one's name."""
    storage = open_run(tmp_path)
    save_all(storage, 3)
    m = read_manifest(storage)
    latest, earlier = m.latest(), sorted(m.checkpoints, key=lambda c: c.seq)[0]
    near = storage.node_cache
    for name in FILES:
        with open(local_file(storage, latest.id, name), "wb") as fh:
            fh.write(shared(storage).read_bytes(f"{CHECKPOINTS}/{earlier.id}/{name}"))
    assert read_verified(storage, latest) == read_verified(shared(storage), latest)
    assert os.listdir(os.path.join(near.dir, CHECKPOINTS)) == [latest.id]


def test_damage_in_both_tiers_is_an_error_never_a_load(tmp_path):
    storage = open_run(tmp_path)
    save_all(storage, 2)
    latest = read_manifest(storage).latest()
    for path in (
        local_file(storage, latest.id, "model.pt"),
        tmp_path / "run" / CHECKPOINTS / latest.id / "model.pt",
    ):
        with open(path, "r+b") as fh:
            fh.seek(100)
            byte = fh.read(1)
            fh.seek(100)
            fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(VerificationError, match="model.pt: sha256"):
        read_verified(storage, latest)


def test_a_node_without_a_copy_reads_shared_storage_and_keeps_one(tmp_path):
    storage = open_run(tmp_path)
    save_all(storage, 2)
    latest = read_manifest(storage).latest()
    other_node = Storage(storage.uri)
    other_node.node_cache = NodeCache(str(tmp_path / "node2-cache"), storage.uri)
    assert not other_node.node_cache.has(latest.id)
    assert read_verified(other_node, latest) == read_verified(shared(storage), latest)
    assert other_node.node_cache.has(latest.id)
    for name in FILES:
        os.unlink(tmp_path / "run" / CHECKPOINTS / latest.id / name)
    assert read_verified(other_node, latest)["model.pt"]  # from its own copy now


def test_staging_on_a_failing_local_disk_writes_straight_to_shared_storage(tmp_path, capsys):
    storage = open_run(tmp_path, tier=False)
    (tmp_path / "not-a-dir").write_text("")  # the tier's root is a file: every write there fails
    storage.node_cache = NodeCache(str(tmp_path / "not-a-dir"), storage.uri)
    save_all(storage, 2)
    latest = read_manifest(storage).latest()
    assert latest.id == meta(2)["id"]
    assert read_verified(shared(storage), latest)
    assert "node-local staging" in capsys.readouterr().out


def test_spec_and_worker_config_open_the_tier(tmp_path):
    from orchestrator.spec import CheckpointSpec

    assert cache_root(True) and cache_root(False) is None and cache_root("/x") == "/x"
    with pytest.raises(ValueError, match="absolute path"):
        CheckpointSpec(local_cache="relative/dir")
    cfg = dict(
        run_uri=str(tmp_path / "r"),
        storage_options={},
        retry=None,
        task="digits",
        task_options={},
        seed=0,
        epochs=1,
        use_gpu=False,
        monitor="val_loss",
        mode="min",
    )
    assert WorkerConfig(**cfg, local_cache=False).open_storage().node_cache is None
    near = WorkerConfig(**cfg, local_cache=str(tmp_path / "c")).open_storage().node_cache
    assert near.dir.startswith(str(tmp_path / "c")) and os.path.basename(near.dir).startswith("r-")


# -- a crash during a background upload ---------------------------------------------------
class TornUpload(Storage):
    """Shared storage whose upload of one checkpoint's model.pt fails halfway, leaving the
    half it wrote in place (as a store without atomic uploads would)."""

    fail_id = ""

    def _torn(self, rel: str) -> bool:
        return rel == f"{CHECKPOINTS}/{self.fail_id}/model.pt"

    def put_file(self, local: str, rel: str) -> None:
        if self._torn(rel):
            with open(local, "rb") as f:
                data = f.read()
            os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
            with open(self.path(rel), "wb") as out:
                out.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        super().put_file(local, rel)

    def write_stream(self, rel, produce, durable=True, size_hint=0):
        if self._torn(rel):
            os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
            with open(self.path(rel), "wb") as out:
                out.write(b"half of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return super().write_stream(rel, produce, durable, size_hint)


def check_nothing_committed_was_lost(storage: Storage, committed: list[str], failed: str) -> None:
    """Every commit verifies, a new attempt restores the latest and collects the torn upload,
    and the tier never held the torn checkpoint as a committed copy."""
    m = read_manifest(storage)
    assert sorted(c.id for c in m.checkpoints) == sorted(committed)
    for c in m.checkpoints:
        read_verified(shared(storage), c)
    plan = RunLedger(shared(storage), "run", CFG).start_attempt(1)  # a new coordinator, a new attempt
    assert plan["restore"]["id"] == committed[-1]
    assert not shared(storage).exists(f"{CHECKPOINTS}/{failed}")  # collected as an orphan
    near = storage.node_cache
    if near is not None:
        assert not near.has(failed)
    record = CheckpointRecord.model_validate(plan["restore"])
    blobs = read_verified(storage, record)
    weights = torch.load(io.BytesIO(blobs["model.pt"]), weights_only=True)["w"]
    assert weights.equal(state(len(committed))["model.pt"]["w"])


@pytest.mark.parametrize("tier", [True, False], ids=["node-local-tier", "straight-to-shared"])
def test_an_upload_that_fails_midway_loses_nothing_committed(tmp_path, tier):
    storage = open_run(tmp_path, tier=tier, cls=TornUpload)
    storage.fail_id = meta(3)["id"]
    led = RunLedger(storage, "run", CFG)
    led.start_attempt(1)
    writer = CheckpointWriter(storage, led.commit)
    for i in (1, 2, 3):
        writer.save(meta(i), state(i))
    with pytest.raises(RuntimeError, match="checkpoint writer failed: .*No space left"):
        writer.close()
    assert storage.exists(f"{CHECKPOINTS}/{meta(3)['id']}/model.pt")  # the torn half is there
    assert not storage.exists(f"{CHECKPOINTS}/{meta(3)['id']}/{RECORD}")  # never recorded
    check_nothing_committed_was_lost(storage, [meta(1)["id"], meta(2)["id"]], meta(3)["id"])


class FailsAfterTheNextSaveIsQueued(TornUpload):
    """The upload of fail_id fails only once the training thread has queued the next save
    (its buffers were free again as soon as fail_id was staged on local disk)."""

    writer: CheckpointWriter | None = None

    def _torn(self, rel: str) -> bool:
        if super()._torn(rel):
            end = time.time() + 30
            while self.writer is not None and self.writer._queue.empty() and time.time() < end:
                time.sleep(0.01)
            return True
        return False


def test_no_save_after_a_failed_one_is_committed(tmp_path):
    """Seen in the fault campaign under CI: an S3 outage failed the upload of one save while the
    next was queued; the next was committed, the attempt then failed at the save after it and
    restarted from the later one, so the failed position was never committed at all. Commits
    follow training order with no hole: after a failure the queued saves are dropped, and the
    attempt restarts from the last commit before the failed one."""
    storage = open_run(tmp_path, cls=FailsAfterTheNextSaveIsQueued)
    storage.fail_id = meta(2)["id"]
    led = RunLedger(storage, "run", CFG)
    led.start_attempt(1)
    writer = storage.writer = CheckpointWriter(storage, led.commit)
    for i in (1, 2, 3):
        writer.save(meta(i), state(i))
    with pytest.raises(RuntimeError, match="checkpoint writer failed: .*No space left"):
        writer.close()
    m = read_manifest(storage)
    assert [c.id for c in m.checkpoints] == [meta(1)["id"]]
    plan = RunLedger(shared(storage), "run", CFG).start_attempt(2)
    assert plan["restore"]["id"] == meta(1)["id"]
    for i in (2, 3):  # neither left behind: collected as orphans, never in the tier as committed
        assert not shared(storage).exists(f"{CHECKPOINTS}/{meta(i)['id']}")
        assert not storage.node_cache.has(meta(i)["id"])


CHILD = """
import os, time
from orchestrator.core.storage import Storage
from orchestrator.core.node_cache import NodeCache
from orchestrator.coordinator import RunLedger
from workers.writer import CheckpointWriter
from test_node_cache import CFG, meta, state

class SlowUpload(Storage):
    def put_file(self, local, rel):
        if "{stuck}" in rel and rel.endswith("model.pt"):
            data = open(local, "rb").read()
            os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
            with open(self.path(rel), "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
            open({marker!r}, "w").close()
            time.sleep(600)  # SIGKILLed here, mid-upload
        super().put_file(local, rel)

storage = SlowUpload({run!r})
storage.node_cache = NodeCache({cache!r}, storage.uri)
led = RunLedger(storage, "run", CFG)
led.start_attempt(1)
writer = CheckpointWriter(storage, led.commit)
for i in (1, 2, 3):
    writer.save(meta(i), state(i))
writer.close()
"""


def test_a_writer_killed_mid_upload_loses_nothing_committed(tmp_path):
    marker = tmp_path / "uploading"
    code = CHILD.format(
        stuck=meta(3)["id"], marker=str(marker), run=str(tmp_path / "run"), cache=str(tmp_path / "cache")
    )
    # from the repository root (the package under test), with tests/ on its path (this module)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},
    )
    try:
        wait_until(lambda: marker.exists() or proc.poll() is not None, 300, "the upload to start", 0.1)
        assert proc.poll() is None, f"the writer exited ({proc.returncode}) before its upload"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    storage = open_run(tmp_path)
    assert storage.exists(f"{CHECKPOINTS}/{meta(3)['id']}/model.pt")  # half uploaded, never recorded
    staged = os.path.join(storage.node_cache.dir, "staging", meta(3)["id"])
    assert os.path.isdir(staged)  # what the killed writer staged is still on the node...
    check_nothing_committed_was_lost(storage, [meta(1)["id"], meta(2)["id"]], meta(3)["id"])
    CheckpointWriter(storage, lambda r: None).close()  # ...until the next writer starts there
    assert not os.path.exists(staged)


def test_a_save_after_close_is_an_error_not_a_silent_drop(tmp_path):
    storage = open_run(tmp_path, tier=False)
    led = RunLedger(storage, "run", CFG)
    led.start_attempt(1)
    writer = CheckpointWriter(storage, led.commit)
    writer.save(meta(1), state(1))
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.save(meta(2), state(2))
    assert [c.id for c in led.manifest.checkpoints] == [meta(1)["id"]]

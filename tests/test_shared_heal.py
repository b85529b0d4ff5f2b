"""A restore served from the node-local tier still checks the shared copy (in the background)
and heals it from the verified local copy; `orchestrator verify` checks every kept checkpoint's
shared copy. Real writer, real RunLedger (the coordinator's logic), real files; no Ray.

- A damaged shared copy is found although the restore never read it: shared_copy_damaged,
  then rewritten from the local copy (verified first) and re-verified: shared_copy_healed.
- The check never fails or holds up the restore; an intact shared copy is only read.
- A checkpoint the coordinator deleted meanwhile is never resurrected; a local copy that no
  longer matches the record is never used to heal.
- With the tier off the damage is caught on restore, the checkpoint marked bad and the
  previous one used (as before).
"""

from __future__ import annotations

import json
import os
import sys
import threading

import pytest
from test_node_cache import CFG, FILES, local_file, meta, open_run, save_all, shared

from harness.cli import run_cli
from orchestrator.coordinator import RunLedger
from orchestrator.core.heal import check_and_heal, start_shared_check
from orchestrator.core.manifest import CHECKPOINTS, RECORD, FileEntry, read_manifest, write_manifest
from orchestrator.core.storage import Storage, StorageError, sha256_hex
from orchestrator.core.verify import Damage, check_stored, copy_verified, read_verified
from workers.resume import plan_restore


class Coord:
    """The coordinator client's methods that rank 0 calls while restoring, on a RunLedger."""

    def __init__(self, led: RunLedger) -> None:
        self.led = led

    def start_attempt(self, world, replica=False):
        return self.led.start_attempt(world, replica=replica)

    def next_restore(self, bad, why):
        return self.led.next_restore(bad, why)

    def event(self, kind, fields):
        self.led.event(kind, **fields)


@pytest.fixture
def direct_calls():
    """Without Ray: plan_restore calls its coordinator client's typed methods (workers.calls.
    Coordinator), and Coord answers them from a RunLedger in this process."""
    return Coord


def flip(storage: Storage, cid: str, name: str, how: str = "corrupt") -> bytes:
    """Damage the shared copy of one file; returns the good bytes."""
    path = os.path.join(storage.path(f"{CHECKPOINTS}/{cid}"), name)
    with open(path, "rb") as fh:
        good = fh.read()
    if how == "delete":
        os.unlink(path)
        return good
    bad = bytearray(good[: len(good) // 2] if how == "truncate" else good)
    if how == "corrupt":
        bad[len(bad) // 2] ^= 0x01
    with open(path, "wb") as fh:
        fh.write(bad)
    return good


def kinds(led_or_storage) -> list[dict]:
    rows = led_or_storage.events if isinstance(led_or_storage, RunLedger) else []
    return [
        e for e in rows if e["kind"] in ("shared_copy_damaged", "shared_copy_healed", "verification_failed")
    ]


def restore_rank0(storage: Storage, led: RunLedger) -> tuple[dict, dict | None, list[threading.Thread]]:
    """plan_restore on rank 0, with the session's hook: a check of the shared copy started
    in the background when the node-local tier served the restore."""
    coord, threads = Coord(led), []

    def on_local(record):
        threads.append(start_shared_check(storage, record, lambda kind, fields: coord.event(kind, fields)))

    plan, blobs = plan_restore(coord, storage, 0, 1, on_local=on_local)
    return plan, blobs, threads


# -- healing on restore --------------------------------------------------------------------
@pytest.mark.parametrize("how", ["corrupt", "truncate", "delete"])
@pytest.mark.parametrize("name", FILES)
def test_a_restore_from_the_local_copy_heals_a_damaged_shared_copy(tmp_path, direct_calls, how, name):
    storage = open_run(tmp_path)
    save_all(storage, 3)
    latest = read_manifest(storage).latest()
    good = flip(storage, latest.id, name, how)
    led = RunLedger(shared(storage), "run", CFG)  # a new coordinator: the resume
    plan, blobs, threads = restore_rank0(storage, led)
    assert plan["restore"]["id"] == latest.id and blobs[name] == good  # served from the local copy
    assert len(threads) == 1
    threads[0].join(60)
    assert not threads[0].is_alive()
    damaged, healed = kinds(led)
    assert damaged["kind"] == "shared_copy_damaged" and healed["kind"] == "shared_copy_healed"
    for e in (damaged, healed):
        assert e["id"] == latest.id and e["file"] == name
    assert {"corrupt": "sha256", "truncate": "size", "delete": "missing"}[how] in damaged["why"]
    copy_verified(shared(storage), latest, None)  # the shared copy verifies again
    assert shared(storage).read_bytes(f"{CHECKPOINTS}/{latest.id}/{name}") == good
    m = read_manifest(storage)
    assert m.get(latest.id) is not None and not m.bad  # still kept, never marked bad


def test_an_intact_shared_copy_is_read_and_left_alone(tmp_path, direct_calls):
    storage = open_run(tmp_path)
    save_all(storage, 2)
    latest = read_manifest(storage).latest()
    paths = [os.path.join(storage.path(latest.dir), f.path) for f in latest.files]
    before = [os.stat(p).st_mtime_ns for p in paths]
    led = RunLedger(shared(storage), "run", CFG)
    plan, _, threads = restore_rank0(storage, led)
    threads[0].join(60)
    assert kinds(led) == []
    assert [os.stat(p).st_mtime_ns for p in paths] == before
    assert check_and_heal(storage, latest, lambda k, f: None) == "ok"


def test_a_restore_from_shared_storage_starts_no_check(tmp_path, direct_calls):
    storage = open_run(tmp_path)
    save_all(storage, 2)
    other_node = Storage(storage.uri)  # no copy on this node: the restore reads shared storage
    from orchestrator.core.node_cache import NodeCache

    other_node.node_cache = NodeCache(str(tmp_path / "node2"), storage.uri)
    led = RunLedger(shared(storage), "run", CFG)
    _, blobs, threads = restore_rank0(other_node, led)
    assert blobs and threads == []


class Blocking(Storage):
    """Shared storage whose reads of a checkpoint's data wait until released, or fail."""

    release = threading.Event()
    fail = False

    def download(self, rel, target, chunk=8 << 20):
        if self.fail:
            raise StorageError("storage down (injected)")
        assert self.release.wait(60)
        return super().download(rel, target, chunk)


def test_the_check_never_holds_up_or_fails_the_restore(tmp_path, direct_calls, capsys):
    storage = open_run(tmp_path)
    save_all(storage, 2)
    latest = read_manifest(storage).latest()
    flip(storage, latest.id, "model.pt")
    slow = Blocking(storage.uri)
    slow.node_cache, slow.release = storage.node_cache, threading.Event()
    led = RunLedger(shared(storage), "run", CFG)
    plan, blobs, threads = restore_rank0(slow, led)  # returns while the check waits on storage
    assert plan["restore"]["id"] == latest.id and threads[0].is_alive()
    slow.release.set()
    threads[0].join(60)
    assert [e["kind"] for e in kinds(led)] == ["shared_copy_damaged", "shared_copy_healed"]

    def report(kind, fields):
        raise RuntimeError("coordinator gone (injected)")

    capsys.readouterr()
    for fail in (False, True):  # the coordinator fails, then storage too: the thread ends quietly
        flip(storage, latest.id, "model.pt")
        slow.fail = fail
        t = start_shared_check(slow, latest, report)
        t.join(60)
        assert not t.is_alive()
        out = capsys.readouterr().out
        assert "checking the shared copy" in out and ("injected" in out), out


# -- races ---------------------------------------------------------------------------------
def test_a_checkpoint_dropped_from_the_manifest_is_not_rewritten(tmp_path):
    storage = open_run(tmp_path)
    save_all(storage, 3)
    m = read_manifest(storage)
    latest = m.latest()
    flip(storage, latest.id, "model.pt")
    # Retention dropped it (the manifest is written before the files are deleted).
    write_manifest(shared(storage), m.model_copy(update={"checkpoints": m.checkpoints[:-1]}))
    events: list = []
    assert check_and_heal(storage, latest, lambda k, f: events.append((k, f))) == "gone"
    assert events == []
    with pytest.raises(Exception, match="sha256"):
        copy_verified(shared(storage), latest, None)  # left as it was: not resurrected


class DeletedWhileChecked(Storage):
    """The coordinator deletes the checkpoint (record first) while the check reads it."""

    cid = ""

    def download(self, rel, target, chunk=8 << 20):
        out = super().download(rel, target, chunk)
        if self.cid:
            os.unlink(self.path(f"{CHECKPOINTS}/{self.cid}/{RECORD}"))
            self.cid = ""
        return out


def test_a_checkpoint_deleted_while_checked_is_not_resurrected(tmp_path):
    storage = open_run(tmp_path)
    save_all(storage, 3)
    latest = read_manifest(storage).latest()
    flip(storage, latest.id, "model.pt", "delete")
    racing = DeletedWhileChecked(storage.uri)
    racing.node_cache, racing.cid = storage.node_cache, latest.id
    events: list = []
    assert check_and_heal(racing, latest, lambda k, f: events.append((k, f))) == "damaged"
    assert not os.path.exists(os.path.join(storage.path(latest.dir), "model.pt"))  # not rewritten
    assert [k for k, _ in events] == ["shared_copy_damaged", "shared_copy_damaged"]
    assert events[1][1]["healed"] is False and RECORD in events[1][1]["error"]


def test_a_local_copy_that_no_longer_matches_is_never_used_to_heal(tmp_path):
    storage = open_run(tmp_path)
    save_all(storage, 3)
    latest = read_manifest(storage).latest()
    flip(storage, latest.id, "model.pt")
    damaged_shared = shared(storage).read_bytes(f"{CHECKPOINTS}/{latest.id}/model.pt")
    with open(local_file(storage, latest.id, "model.pt"), "r+b") as fh:  # changed since the restore
        fh.seek(10)
        fh.write(b"\xff\xfe")
    events: list = []
    assert check_and_heal(storage, latest, lambda k, f: events.append((k, f))) == "damaged"
    assert shared(storage).read_bytes(f"{CHECKPOINTS}/{latest.id}/model.pt") == damaged_shared
    assert events[-1][0] == "shared_copy_damaged" and events[-1][1]["healed"] is False
    assert not any(k == "shared_copy_healed" for k, _ in events)


# -- the tier off --------------------------------------------------------------------------
def test_with_the_tier_off_the_damaged_checkpoint_is_marked_bad_and_the_previous_used(tmp_path, direct_calls):
    storage = open_run(tmp_path, tier=False)
    save_all(storage, 3)
    m = read_manifest(storage)
    latest, previous = m.latest(), sorted(m.checkpoints, key=lambda c: c.seq)[-2]
    flip(storage, latest.id, "model.pt")
    led = RunLedger(storage, "run", CFG)
    plan, blobs, threads = restore_rank0(storage, led)
    assert plan["restore"]["id"] == previous.id and threads == []
    assert blobs == read_verified(storage, previous)
    assert [(e["kind"], e["id"]) for e in kinds(led)] == [("verification_failed", latest.id)]
    assert [b.record.id for b in read_manifest(storage).bad] == [latest.id]


# -- check_stored: what `orchestrator verify` and the check use -----------------------------
def test_check_stored_lists_every_damaged_file_with_why(tmp_path):
    storage = open_run(tmp_path, tier=False)
    save_all(storage, 2)
    latest = read_manifest(storage).latest()
    assert check_stored(storage, latest) == []
    flip(storage, latest.id, "model.pt")
    flip(storage, latest.id, "train_state.pt", "truncate")
    got = check_stored(storage, latest)
    assert [d.file for d in got] == ["model.pt", "train_state.pt"]
    assert "sha256" in got[0].why and "size" in got[1].why
    assert check_stored(storage, latest, only={"train_state.pt"}) == [got[1]]
    assert isinstance(got[0], Damage)


# -- orchestrator verify -------------------------------------------------------------------
def sharded_commit(storage: Storage, led: RunLedger, epoch: int) -> str:
    """A sharded checkpoint as every rank writes it (DCP files per rank, then the record)."""
    cid = f"epoch{epoch:04d}-step{epoch * 10:07d}-a1"
    files = []
    for name, rank in ((".metadata", 0), ("__0_0.distcp", 0), ("__1_0.distcp", 1), ("train_state.pt", 0)):
        data = f"{cid}/{name}".encode() * 50
        storage.write_bytes(f"{CHECKPOINTS}/{cid}/{name}", data)
        files.append(FileEntry(path=name, size=len(data), sha256=sha256_hex(data), rank=rank))
    rec = {
        **meta(epoch),
        "id": cid,
        "world_size": 2,
        "sharded": True,
        "files": [f.model_dump() for f in files],
    }
    from orchestrator.core.manifest import CheckpointRecord

    record = CheckpointRecord.model_validate(rec)
    storage.write_bytes(f"{CHECKPOINTS}/{cid}/{RECORD}", record.model_dump_json().encode())
    led.commit(record)
    return cid


@pytest.fixture
def run_with_sharded(tmp_path):
    storage = open_run(tmp_path, tier=False)
    led = save_all(storage, 2)
    sharded = sharded_commit(storage, led, 3)
    return storage, sharded


def test_verify_says_all_intact_and_exits_0(run_with_sharded):
    storage, sharded = run_with_sharded
    p = run_cli("verify", storage.uri)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "3 kept checkpoint(s)" in p.stdout and "DAMAGED" not in p.stdout
    assert sharded in p.stdout
    assert "[1/3]" in p.stderr and "[3/3]" in p.stderr  # progress goes to stderr
    out = json.loads(run_cli("verify", storage.uri, "--json", check=True).stdout)
    assert out["ok"] is True and out["damaged"] == [] and len(out["checkpoints"]) == 3
    assert {c["id"]: c["files"] for c in out["checkpoints"]}[sharded] == 4


def test_verify_names_the_damaged_checkpoints_and_why_and_exits_1(run_with_sharded):
    storage, sharded = run_with_sharded
    m = read_manifest(storage)
    first = sorted(m.checkpoints, key=lambda c: c.seq)[0]
    flip(storage, first.id, "model.pt")
    flip(storage, sharded, "__1_0.distcp", "delete")  # another rank's shard
    p = run_cli("verify", storage.uri)
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"DAMAGED  {first.id}" in p.stdout and "model.pt: sha256" in p.stdout
    assert "__1_0.distcp: missing" in p.stdout
    p = run_cli("verify", storage.uri, "--json")
    assert p.returncode == 1
    out = json.loads(p.stdout)
    assert out["ok"] is False
    assert sorted((d["id"], d["file"]) for d in out["damaged"]) == sorted(
        [(first.id, "model.pt"), (sharded, "__1_0.distcp")]
    )
    assert all(d["why"] for d in out["damaged"])
    assert read_manifest(storage) == m  # read-only: nothing marked, nothing deleted


def test_verify_help_teaches_and_bad_input_exits_2(tmp_path):
    p = run_cli("verify", "--help", check=True)
    for words in ("shared", "sha256", "sharded", "--json", "exit", "ray", "stderr", "example"):
        assert words in p.stdout.lower(), words
    assert "verify" in run_cli("--help", check=True).stdout
    p = run_cli("verify", str(tmp_path / "nope"))
    assert p.returncode == 2 and "no manifest.json" in p.stderr


NO_RAY = """
import sys
sys.modules["ray"] = None  # any `import ray` fails
sys.argv = ["orchestrator", "verify", sys.argv[1], "--json"]
from orchestrator.cli import main
main()
"""


def test_verify_does_not_need_ray(run_with_sharded):
    import subprocess

    storage, _ = run_with_sharded
    p = subprocess.run(
        [sys.executable, "-c", NO_RAY, storage.uri], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["ok"] is True


# -- on S3 ---------------------------------------------------------------------------------
class NoReads(Storage):
    """Shared storage whose files may be looked up but never read."""

    def download(self, rel, target, chunk=8 << 20):
        raise AssertionError(f"{rel} was read")


def test_on_s3_the_stores_own_sha256_spares_the_read(s3_env, bucket, moto):
    uri, key = f"s3://{bucket}/runs/r", "runs/r/checkpoints/c1/model.pt"
    data = b"0123456789" * 1000
    rec = {
        **meta(1),
        "id": "c1",
        "files": [{"path": "model.pt", "size": len(data), "sha256": sha256_hex(data)}],
    }
    from orchestrator.core.manifest import CheckpointRecord

    record = CheckpointRecord.model_validate(rec)
    moto.client().put_object(Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256")
    assert check_stored(NoReads(uri), record) == []  # S3 keeps this file's sha256: no read
    flipped = bytearray(data)
    flipped[5000] ^= 0x01
    moto.client().put_object(Bucket=bucket, Key=key, Body=bytes(flipped), ChecksumAlgorithm="SHA256")
    assert "sha256" in check_stored(NoReads(uri), record)[0].why
    Storage(uri).write_bytes("checkpoints/c1/model.pt", bytes(flipped))  # no SHA256 kept: a read
    with pytest.raises(AssertionError, match="was read"):
        check_stored(NoReads(uri), record)
    assert "sha256" in check_stored(Storage(uri), record)[0].why
    Storage(uri).delete("checkpoints/c1/model.pt")
    assert check_stored(Storage(uri), record) == [Damage("model.pt", "missing")]


def test_on_s3_a_damaged_shared_copy_is_healed(s3_env, bucket, tmp_path):
    from orchestrator.core.node_cache import NodeCache

    storage = Storage(f"s3://{bucket}/runs/r")
    storage.node_cache = NodeCache(str(tmp_path / "cache"), storage.uri)
    save_all(storage, 2)
    latest = read_manifest(storage).latest()
    rel = f"{CHECKPOINTS}/{latest.id}/train_state.pt"
    good = storage.read_bytes(rel)
    storage.write_bytes(rel, good[:-1] + bytes([good[-1] ^ 0x01]))
    events: list = []
    assert check_and_heal(storage, latest, lambda k, f: events.append((k, f["file"]))) == "healed"
    assert events == [("shared_copy_damaged", "train_state.pt"), ("shared_copy_healed", "train_state.pt")]
    assert Storage(storage.uri).read_bytes(rel) == good

"""A stale owner deletes nothing, ever: the interleavings of a coordinator that lost its run
while it stalled, each replayed exactly (the stall is a hook inside the stale coordinator's
own storage calls), on a temp dir and on moto's S3 server. Also: repair never rewinds, the
lease judges staleness by one clock and one process, and a local read error is not a bad
checkpoint.

No Ray here: RunLedger is the coordinator's logic, Lease the driver's, Storage the store's.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import pytest

from harness.s3 import CREDS
from orchestrator.coordinator import CommitError, RetentionConfig, RunLedger
from orchestrator.core import repair as repair_mod
from orchestrator.core import verify
from orchestrator.core.lease import LEASE, Lease, LeaseHeld, LeaseLost
from orchestrator.core.manifest import (
    BACKUP,
    CHECKPOINTS,
    MANIFEST,
    RECORD,
    CheckpointRecord,
    FileEntry,
    read_jsonl,
    read_manifest,
)
from orchestrator.core.storage import Storage, sha256_hex

CFG = RetentionConfig(monitor="val_loss", mode="min", top_k=1, keep_latest=1)
S3_OPTS = {"key": CREDS["AWS_ACCESS_KEY_ID"], "secret": CREDS["AWS_SECRET_ACCESS_KEY"]}


@pytest.fixture(params=["local", "s3"])
def make_storage(request, tmp_path) -> Callable[[], Storage]:
    """A factory of Storage objects on one run: each driver gets its own, as on two hosts."""
    if request.param == "local":
        return lambda: Storage(str(tmp_path / "run"))
    moto = request.getfixturevalue("moto")
    bucket = request.getfixturevalue("bucket")
    return lambda: Storage(f"s3://{bucket}/runs/run", {"endpoint_url": moto.endpoint, **S3_OPTS})


def upload(storage: Storage, epoch: int, loss: float, attempt: int, record: bool = True) -> CheckpointRecord:
    """What rank 0's writer does before a commit: the data, then checkpoint.json last."""
    cid = f"epoch{epoch:04d}-step{epoch * 10:07d}-a{attempt}"
    data = f"weights of epoch {epoch}, attempt {attempt}".encode()
    storage.write_bytes(f"{CHECKPOINTS}/{cid}/model.pt", data)
    rec = CheckpointRecord(
        id=cid,
        epoch=epoch,
        step_in_epoch=10,
        global_step=epoch * 10,
        end_of_epoch=True,
        metrics={"val_loss": loss},
        world_size=1,
        attempt=attempt,
        files=[FileEntry(path="model.pt", size=len(data), sha256=sha256_hex(data))],
    )
    if record:
        storage.write_bytes(f"{CHECKPOINTS}/{cid}/{RECORD}", rec.model_dump_json().encode())
    return rec


def stall_inside(
    storage: Storage, methods: tuple[str, ...], rel: str, during: Callable[[], None]
) -> list[str]:
    """The next call of one of these Storage methods on `rel` stalls: `during` runs (the world
    goes on without this process), then the call goes ahead as if nothing had happened."""
    fired: list[str] = []
    for name in methods:
        real = getattr(storage, name)

        def call(path, *args, _real=real, _name=name, **kwargs):
            if path == rel and not fired:
                fired.append(_name)
                during()
            return _real(path, *args, **kwargs)

        setattr(storage, name, call)
    return fired


def owned(storage: Storage, ttl_s: float = 1.0) -> tuple[Lease, RunLedger]:
    lease = Lease(storage, ttl_s=ttl_s, heartbeat_s=3600)
    lease.acquire()
    lease.stop_heartbeat()  # beats only when a test says so
    return lease, RunLedger(storage, "run", CFG, owner=lease.token)


def take_over(storage: Storage) -> tuple[Lease, RunLedger]:
    """Driver B on another cluster, once A's lease is past its TTL (S3 times: 1 s steps)."""
    time.sleep(2.2)
    lease = Lease(storage, ttl_s=30, heartbeat_s=3600)
    lease.acquire()
    lease.stop_heartbeat()
    return lease, RunLedger(storage, "run", CFG, owner=lease.token)


def verifies(storage: Storage, rec: CheckpointRecord) -> bool:
    try:
        verify.copy_verified(storage, rec, None)
        return True
    except verify.VerificationError:
        return False


def test_a_coordinator_stalled_after_its_attempt_write_deletes_nothing_of_the_new_owner(make_storage):
    """A's start_attempt lands its compare-and-swap, then stalls in the backup write; B takes
    over, starts attempt 3 and commits; A wakes up and would collect B's commit as an orphan."""
    sa = make_storage()
    a_lease, a = owned(sa)
    a.start_attempt(1)
    a.commit(upload(sa, 1, 0.9, attempt=1))
    b_side: dict[str, object] = {}

    def driver_b_runs() -> None:
        sb = make_storage()
        b_lease, b = take_over(sb)
        assert b.start_attempt(1)["attempt"] == 3
        rec = upload(sb, 2, 0.5, attempt=3)
        b.commit(rec)
        b_side.update(storage=sb, lease=b_lease, ledger=b, rec=rec)

    fired = stall_inside(sa, ("write_bytes", "write_if"), BACKUP, driver_b_runs)
    with pytest.raises(LeaseLost, match="taken over"):
        a.start_attempt(1)  # attempt 2: its manifest write lands, then the stall
    assert fired
    sb, rec = b_side["storage"], b_side["rec"]
    m = read_manifest(sb)
    assert m.owner == b_side["lease"].token and m.latest().id == rec.id
    assert rec.id in sb.list_dirs(CHECKPOINTS) and verifies(sb, rec)
    backup = json.loads(sb.read_bytes(BACKUP))
    assert backup["owner"] == b_side["lease"].token and backup["generation"] == m.generation
    assert not any(e.get("id") == rec.id and e["kind"] == "delete" for e in read_jsonl(sb, "events.jsonl"))


def test_a_coordinator_that_stalls_in_its_orphan_listing_is_fenced_before_deleting(make_storage):
    """B takes over while A lists checkpoints/: the listing A gets back holds B's commit."""
    sa = make_storage()
    a_lease, a = owned(sa)
    a.start_attempt(1)
    a.commit(upload(sa, 1, 0.9, attempt=1))
    b_side: dict[str, object] = {}

    def driver_b_runs() -> None:
        sb = make_storage()
        _, b = take_over(sb)
        b.start_attempt(1)
        b_side["rec"] = upload(sb, 2, 0.5, attempt=3)
        b.commit(b_side["rec"])
        b_side["late"] = upload(sa, 3, 0.4, attempt=2, record=False)  # A's own writer, late

    stall_inside(sa, ("list_dirs",), CHECKPOINTS, driver_b_runs)
    with pytest.raises(LeaseLost, match="nothing was deleted"):
        a.start_attempt(1)  # its listing holds B's commit and its own late upload
    rec = b_side["rec"]
    assert rec.id in sa.list_dirs(CHECKPOINTS) and verifies(sa, rec)
    assert b_side["late"].id in sa.list_dirs(CHECKPOINTS)  # fenced before any delete: B collects it


def test_orphan_collection_never_deletes_what_a_later_attempt_wrote(tmp_path):
    """Even unfenced (a plain ledger), a directory whose id names an attempt after the
    ledger's own is a newer owner's upload, not an orphan of this run's past."""
    storage = Storage(str(tmp_path / "run"))
    led = RunLedger(storage, "run", CFG)
    led.start_attempt(1)
    newer = upload(storage, 3, 0.2, attempt=5, record=False)  # B's writer, still uploading
    older = upload(storage, 2, 0.2, attempt=1, record=False)  # this run's own crashed upload
    assert led.collect_orphans() == [older.id]
    assert newer.id in storage.list_dirs(CHECKPOINTS)


def test_a_commit_whose_data_files_are_gone_is_refused(make_storage):
    """The data deleted under the writer (a stale coordinator's delete while it uploaded),
    checkpoint.json written after: the commit checks every file with its size."""
    storage = make_storage()
    led = RunLedger(storage, "run", CFG)
    led.start_attempt(1)
    rec = upload(storage, 1, 0.5, attempt=1)
    storage.delete(f"{CHECKPOINTS}/{rec.id}/model.pt")
    with pytest.raises(CommitError, match="model.pt: missing"):
        led.commit(rec)
    short = upload(storage, 2, 0.5, attempt=1)
    storage.write_bytes(f"{CHECKPOINTS}/{short.id}/model.pt", b"cut")
    with pytest.raises(CommitError, match="model.pt: size 3 != recorded"):
        led.commit(short)
    assert read_manifest(storage).checkpoints == []


def test_a_stale_backup_write_never_replaces_the_new_owners(make_storage):
    sa = make_storage()
    a_lease, a = owned(sa)
    a.start_attempt(1)
    sb = make_storage()
    stale = sb.read_bytes(BACKUP)
    _, b = take_over(sb)
    b.start_attempt(1)
    from orchestrator.core.manifest import backup_manifest

    assert backup_manifest(sa, stale) is None  # skipped: the stored backup is newer
    assert json.loads(sb.read_bytes(BACKUP))["owner"] == b.owner


def test_a_failed_backup_write_is_an_event(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    lease, led = owned(storage)
    storage.delete(BACKUP)
    os.makedirs(storage.path(BACKUP))  # a directory where the backup goes: every write fails
    led.start_attempt(1)
    led.event("attempt_note")  # the next event write carries what was noted in memory
    failed = [e for e in read_jsonl(storage, "events.jsonl") if e["kind"] == "backup_failed"]
    assert failed and "IsADirectoryError" in failed[0]["error"]


def test_repair_never_moves_the_resume_point_back(tmp_path):
    """Retention dropped epoch 1 but its delete failed; the manifest is damaged later: repair
    must not adopt epoch 1 as a newer commit the backup missed."""
    storage = Storage(str(tmp_path / "run"))
    led = RunLedger(storage, "run", CFG)
    led.start_attempt(1)
    first = upload(storage, 1, 0.5, attempt=1)
    led.commit(first)
    led.commit(upload(storage, 2, 0.4, attempt=1))
    led.commit(upload(storage, 3, 0.3, attempt=1))  # top_k=1, latest 1: keeps only epoch 3
    upload(storage, 1, 0.5, attempt=1)  # epoch 1's files as a failed delete left them
    storage.write_bytes(MANIFEST, b"{ damaged")
    report = repair_mod.repair(storage, dry_run=True)
    assert report.adopted == []
    assert {x["id"] for x in report.left_out} >= {first.id}
    assert any(x["id"] == first.id and "dropped" in x["reason"] for x in report.left_out)
    repair_mod.repair(storage)
    restored = RunLedger(storage, "run", CFG)
    assert restored.start_attempt(1)["restore"]["id"] == "epoch0003-step0000030-a1"


def test_lease_staleness_is_judged_by_the_storage_clock_not_the_readers(tmp_path, monkeypatch):
    """A reader whose clock runs 100 s ahead of the file server's must not see a live lease
    as stale (the mtime is the server's clock; so is the reader's probe)."""
    storage = Storage(str(tmp_path / "run"))
    holder = Lease(storage, ttl_s=30, heartbeat_s=3600)
    holder.acquire()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 100)
    with pytest.raises(LeaseHeld):
        Lease(Storage(str(tmp_path / "run")), ttl_s=30).acquire()
    assert not [n for n in os.listdir(tmp_path / "run") if "tmp" in n]  # the probe is gone
    holder.stop_heartbeat()


def write_lease(storage: Storage, **fields: object) -> None:
    body = {
        "host": Lease(storage).host,
        "token": "theirs",
        "since": time.time(),
        "heartbeat": time.time(),
        "ttl_s": 30,
        **fields,
    }
    storage.write_bytes(LEASE, json.dumps(body).encode())


def test_a_lease_from_another_pid_namespace_waits_for_its_ttl(tmp_path):
    """Same host name (a container with host networking), a pid this process cannot see:
    not proof of death. Only the TTL decides."""
    storage = Storage(str(tmp_path / "run"))
    write_lease(storage, pid=4_000_000, pid_ns="pid:[1]", pid_start=123.0)
    with pytest.raises(LeaseHeld):
        Lease(storage).acquire()


def test_a_dead_or_recycled_pid_on_this_host_frees_the_lease_at_once(tmp_path):
    import psutil

    from orchestrator.core.procs import pid_namespace

    storage = Storage(str(tmp_path / "run"))
    write_lease(storage, pid=4_000_000, pid_ns=pid_namespace(), pid_start=123.0)
    taker = Lease(storage, heartbeat_s=3600)
    taker.acquire()
    assert "is gone" in taker.events[0]["why"]
    taker.release()
    me = psutil.Process()  # a pid that runs, but started at another time: recycled
    write_lease(storage, pid=me.pid, pid_ns=pid_namespace(), pid_start=me.create_time() - 500)
    taker = Lease(storage, heartbeat_s=3600)
    taker.acquire()
    assert "is gone" in taker.events[0]["why"]
    taker.release()


def test_a_local_write_error_is_not_a_damaged_checkpoint(tmp_path, monkeypatch):
    """The local side of a download failing (a temp cleaner removed the directory) says so:
    an OSError about the local path, never a VerificationError that marks the shared copy bad."""
    storage = Storage(str(tmp_path / "run"))
    rec = upload(storage, 1, 0.5, attempt=1)
    monkeypatch.setattr(verify.os, "makedirs", lambda *a, **k: None)
    with pytest.raises(OSError) as info:
        verify.copy_verified(storage, rec, str(tmp_path / "gone" / "here"))
    assert not isinstance(info.value, verify.VerificationError)
    assert "gone" in str(info.value)


def _with_files(
    storage: Storage, rec: CheckpointRecord, files: dict[str, bytes], lie: str = ""
) -> CheckpointRecord:
    """rec with more files, stored under its directory; `lie`: one whose record hash is wrong."""
    entries = list(rec.files)
    for path, data in files.items():
        storage.write_bytes(f"{CHECKPOINTS}/{rec.id}/{path}", data)
        entries.append(
            FileEntry(path=path, size=len(data), sha256=sha256_hex(b"other" if path == lie else data))
        )
    return rec.model_copy(update={"files": entries})


def test_a_failed_copy_removes_every_file_it_wrote(tmp_path):
    """best --download falls back to the next checkpoint when one fails: the files the failed one
    wrote before its bad file (extras/a here) must not stay beside the next one's."""
    storage = Storage(str(tmp_path / "run"))
    rec = _with_files(
        storage, upload(storage, 1, 0.5, attempt=1), {"extras/a": b"a", "extras/b": b"b"}, "extras/b"
    )
    out = tmp_path / "out"
    with pytest.raises(verify.VerificationError, match="extras/b"):
        verify.copy_verified(storage, rec, str(out))
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_a_record_path_outside_the_checkpoint_is_refused(tmp_path):
    """A record names its files; one with '..' would write outside the directory asked for."""
    storage = Storage(str(tmp_path / "run"))
    rec = _with_files(storage, upload(storage, 1, 0.5, attempt=1), {"extras/x": b"x"})
    rec = rec.model_copy(update={"files": [*rec.files, FileEntry(path="../escape", size=1, sha256="0")]})
    with pytest.raises(verify.VerificationError, match="outside"):
        verify.copy_verified(storage, rec, str(tmp_path / "out" / "ck"))
    assert not (tmp_path / "out" / "escape").exists()
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_marking_bad_records_why_before_anything_is_deleted(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    led = RunLedger(storage, "run", CFG)
    led.start_attempt(1)
    rec = upload(storage, 1, 0.5, attempt=1)
    led.commit(rec)
    seen: list[list[str]] = []
    real = storage.delete

    def delete(rel: str) -> None:
        seen.append([e["kind"] for e in read_jsonl(storage, "events.jsonl")])
        real(rel)

    storage.delete = delete  # type: ignore[method-assign]
    led.next_restore(rec.id, "model.pt: sha256 … != recorded")
    assert seen and seen[0][-1] == "verification_failed"


def test_a_checkpoint_is_read_twice_before_it_counts_as_bad(tmp_path):
    """One corrupted read (a flaky connection, a proxy) must not mark a good checkpoint bad:
    marking bad deletes it from shared storage."""
    from workers.resume import _read_twice

    storage = Storage(str(tmp_path / "run"))
    rec = upload(storage, 1, 0.5, attempt=1)
    real, flipped = storage.read_bytes, []

    def flaky(rel: str) -> bytes:
        data = real(rel)
        if rel.endswith("model.pt") and not flipped:
            flipped.append(rel)
            return b"X" + data[1:]
        return data

    storage.read_bytes = flaky  # type: ignore[method-assign]
    assert _read_twice(storage, rec, None)["model.pt"] == real(f"{CHECKPOINTS}/{rec.id}/model.pt")
    assert flipped
    storage.write_bytes(f"{CHECKPOINTS}/{rec.id}/model.pt", b"X" * rec.files[0].size)  # damaged for good
    with pytest.raises(verify.VerificationError, match="sha256"):
        _read_twice(storage, rec, None)


def test_a_stale_coordinator_never_rewrites_the_new_owners_journals(make_storage):
    """metrics.jsonl (and events.jsonl on object stores, where an append is a rewrite) are
    replaced whole: from a stale coordinator's memory they would drop what the new owner
    logged. Both are compare-and-swapped; locally an event is an append, which drops nothing."""
    sa = make_storage()
    a_lease, a = owned(sa)
    a.start_attempt(1)
    a.report_metrics({"epoch": 1, "val_loss": 0.9})
    sb = make_storage()
    _, b = take_over(sb)
    b.start_attempt(1)
    b.report_metrics({"epoch": 2, "val_loss": 0.5})
    with pytest.raises(LeaseLost):
        a.report_metrics({"epoch": 2, "val_loss": 9.0})
    assert read_jsonl(sb, "metrics.jsonl") == [{"epoch": 1, "val_loss": 0.9}, {"epoch": 2, "val_loss": 0.5}]
    if not sa.is_local:
        with pytest.raises(LeaseLost):
            a.event("restart", reason="a stale restart")
    kinds = [e["kind"] for e in read_jsonl(sb, "events.jsonl")]
    assert kinds.count("attempt_started") == 2 and "lease_taken_over" not in kinds[:1]


def test_an_owned_coordinator_with_no_attempt_yet_deletes_no_numbered_checkpoint(tmp_path):
    """A driver whose workers never started still ends its run (finish): with no attempt of its
    own, every attempt-numbered directory is a later owner's."""
    storage = Storage(str(tmp_path / "run"))
    lease, led = owned(storage)
    theirs = upload(storage, 1, 0.5, attempt=1, record=False)
    led.finish("failed")
    assert theirs.id in storage.list_dirs(CHECKPOINTS)
    lease.release()


def test_only_old_temp_files_are_swept(tmp_path):
    """A young temp file may be a live writer's (a new owner's manifest write): only one left
    untouched for 10 minutes is a crashed write's."""
    storage = Storage(str(tmp_path / "run"))
    led = RunLedger(storage, "run", CFG)
    young, old = storage.path("manifest.json.tmp-young"), storage.path("metrics.jsonl.tmp-old")
    for path in (young, old):
        with open(path, "wb") as f:
            f.write(b"partial")
    past = time.time() - 1200
    os.utime(old, (past, past))
    led.start_attempt(1)
    assert os.path.exists(young) and not os.path.exists(old)


def test_our_own_landed_write_is_not_a_takeover_at_the_ownership_check(tmp_path):
    """A manifest write that landed but was reported failed leaves the ledger a version behind:
    the check before deleting reloads it (a retryable error), it does not fence the owner."""
    from orchestrator.core.manifest import write_manifest_if
    from orchestrator.core.storage import StorageError

    storage = Storage(str(tmp_path / "run"))
    lease, led = owned(storage, ttl_s=30)
    led.start_attempt(1)
    write_manifest_if(storage, led.manifest, led._version)  # ours, its answer "lost"
    with pytest.raises(StorageError, match="our own earlier write"):
        led.collect_orphans()
    assert led.fenced is None
    led.collect_orphans()  # reloaded: goes on
    lease.release()


def test_a_run_whose_manifest_is_gone_but_its_backup_is_there_is_not_started_over(tmp_path):
    """Starting over would take the run's committed checkpoints for orphans and delete them."""
    from harness.cli import run_cli

    storage = Storage(str(tmp_path / "runs" / "r"))
    led = RunLedger(storage, "r", CFG)
    led.start_attempt(1)
    rec = upload(storage, 1, 0.5, attempt=1)
    led.commit(rec)
    storage.delete(MANIFEST)
    p = run_cli(
        "run",
        "configs/digits.yaml",
        "--set",
        f"storage.root={tmp_path / 'runs'}",
        "--set",
        "name=r",
        timeout=120,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert "manifest.json is missing but manifest.backup.json is there" in p.stderr
    assert "orchestrator repair" in p.stderr
    assert rec.id in storage.list_dirs(CHECKPOINTS)


def test_a_stale_coordinator_adds_no_row_to_a_journal_the_new_owner_has_not_written_yet(make_storage):
    """Found by the campaign's partition (run 10 of seed 12): B had not reported yet, so A's
    compare-and-swap on metrics.jsonl still matched and its stale row went through."""
    sa = make_storage()
    a_lease, a = owned(sa)
    a.start_attempt(1)
    a.report_metrics({"epoch": 1, "val_loss": 0.9})
    sb = make_storage()
    take_over(sb)[1].start_attempt(1)
    with pytest.raises(LeaseLost):
        a.report_metrics({"epoch": 2, "val_loss": 9.0})
    assert read_jsonl(sb, "metrics.jsonl") == [{"epoch": 1, "val_loss": 0.9}]

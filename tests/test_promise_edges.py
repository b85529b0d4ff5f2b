"""The promise at its edges: NaN metrics, the true best without user code, stale
attempts, fencing after a lease takeover, idempotent coordinator calls.

Real storage throughout: a temp dir, and moto's S3 server on loopback where it says so.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time

import pytest

from harness.cli import run_cli
from harness.s3 import CREDS
from orchestrator.coordinator import CommitError, RetentionConfig, RunLedger
from orchestrator.core.lease import Lease, LeaseHeld, LeaseLost
from orchestrator.core.manifest import (
    CHECKPOINTS,
    FORMAT,
    MANIFEST,
    RECORD,
    CheckpointRecord,
    FileEntry,
    ManifestError,
    read_jsonl,
    read_manifest,
)
from orchestrator.core.retention import Ckpt, rank_best
from orchestrator.core.storage import Storage, sha256_hex

NAN, INF = float("nan"), float("inf")
CFG = RetentionConfig(monitor="val_loss", mode="min", top_k=2, keep_latest=1)


def upload(storage: Storage, epoch: int, loss: float, attempt: int = 1) -> CheckpointRecord:
    """What a worker does before its commit: the files, then checkpoint.json last."""
    cid = f"epoch{epoch:04d}-step{epoch * 10:07d}-a{attempt}"
    data = f"weights {epoch}".encode()
    storage.write_bytes(f"{CHECKPOINTS}/{cid}/model.pt", data)
    rec = CheckpointRecord(
        id=cid,
        epoch=epoch,
        step_in_epoch=10,
        global_step=epoch * 10,
        end_of_epoch=True,
        metrics={"val_loss": loss, "val_acc": 1 - loss if math.isfinite(loss) else loss},
        files=[FileEntry(path="model.pt", size=len(data), sha256=sha256_hex(data))],
        world_size=1,
        attempt=attempt,
    )
    storage.write_bytes(f"{CHECKPOINTS}/{cid}/{RECORD}", json.dumps(rec.model_dump()).encode())
    return rec


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "run"))
    moto = request.getfixturevalue("moto")
    bucket = request.getfixturevalue("bucket")
    return Storage(f"s3://{bucket}/runs/run", {"endpoint_url": moto.endpoint, **S3_OPTS})


S3_OPTS = {"key": CREDS["AWS_ACCESS_KEY_ID"], "secret": CREDS["AWS_SECRET_ACCESS_KEY"]}


# -- 1. NaN and inf --------------------------------------------------------------------------


def test_nan_and_inf_metrics_round_trip_and_are_never_best(storage):
    led = RunLedger(storage, "run", CFG)
    led.start_attempt(1)
    for epoch, loss in [(1, 0.5), (2, NAN), (3, INF), (4, 0.7)]:
        led.commit(upload(storage, epoch, loss))
        led.report_metrics({"epoch": epoch, "val_loss": loss, "attempt": 1})
        if epoch == 2:  # NaN used to come back as null and fail validation here
            latest = read_manifest(storage).latest()
            assert latest.epoch == 2 and math.isnan(latest.metrics["val_loss"])
    m = read_manifest(storage)
    assert led.best().epoch == 1
    assert set(m.kept) == {"epoch0001-step0000010-a1", "epoch0004-step0000040-a1"}
    rows = read_jsonl(storage, "metrics.jsonl")
    assert math.isnan(rows[1]["val_loss"]) and rows[2]["val_loss"] == INF
    again = RunLedger(storage, "run", CFG)  # a restarted coordinator reads it all back
    assert again.best().epoch == 1


@pytest.mark.parametrize("mode", ["min", "max"])
def test_non_finite_values_are_not_ranked(mode):
    ckpts = [
        Ckpt("nan", 1, 1, True, NAN),
        Ckpt("inf", 2, 2, True, INF),
        Ckpt("-inf", 3, 3, True, -INF),
        Ckpt("ok", 4, 4, True, 0.5),
    ]
    assert [c.id for c in rank_best(ckpts, mode)] == ["ok"]


def test_read_only_commands_read_a_nan_run(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    led = RunLedger(storage, "run", CFG)
    for epoch, loss in [(1, 0.5), (2, NAN)]:
        led.commit(upload(storage, epoch, loss))
    for cmd in ("checkpoints", "best", "events"):
        p = run_cli(cmd, str(tmp_path / "run"), "--json", timeout=60)
        assert p.returncode == 0, (cmd, p.stderr)
    assert json.loads(run_cli("best", str(tmp_path / "run"), "--json").stdout)["epoch"] == 1


# -- 3. the true best, without user code -------------------------------------------------------


def test_best_uses_the_monitor_stored_in_the_manifest_not_a_guess(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    led = RunLedger(storage, "run", RetentionConfig(monitor="val_acc", mode="max", top_k=3, keep_latest=1))
    for epoch, loss in [(1, 0.2), (2, 0.6), (3, 0.4)]:
        led.commit(upload(storage, epoch, loss))  # val_acc = 1 - loss: epoch 1 is the best
    # The task file the run was started with is not on this machine.
    storage.write_bytes(
        "spec.yaml",
        b"name: run\ntask: {name: /nowhere/task.py:build}\ncheckpoint: {monitor: val_acc, mode: max}\n",
    )
    assert read_manifest(storage).retention["monitor"] == "val_acc"
    p = run_cli("best", str(tmp_path / "run"), "--json", timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert (out["monitor"], out["mode"], out["epoch"]) == ("val_acc", "max", 1)


# -- 5. a stale attempt cannot commit -----------------------------------------------------------


def test_a_commit_from_a_previous_attempt_is_refused_and_collected(storage):
    led = RunLedger(storage, "run", CFG)
    led.start_attempt(1)
    led.commit(upload(storage, 1, 0.5, attempt=1))
    late = upload(storage, 2, 0.4, attempt=1)  # attempt 1's writer, still uploading
    led.start_attempt(1)  # attempt 2 starts (and collects the upload as an orphan)
    late = upload(storage, 2, 0.4, attempt=1)  # ...which the late writer then finishes
    with pytest.raises(CommitError, match="attempt 1 is not the current attempt 2"):
        led.commit(late)
    assert read_manifest(storage).get(late.id) is None
    assert late.id not in storage.list_dirs(CHECKPOINTS)


# -- 8. format -----------------------------------------------------------------------------------


def test_a_newer_manifest_format_is_refused_clearly(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    RunLedger(storage, "run", CFG).commit(upload(storage, 1, 0.5))
    data = json.loads(storage.read_bytes(MANIFEST))
    data["format"] = FORMAT + 1
    storage.write_bytes(MANIFEST, json.dumps(data).encode())
    with pytest.raises(ManifestError, match=f"format {FORMAT + 1}.*newer"):
        read_manifest(storage)
    p = run_cli("checkpoints", str(tmp_path / "run"), timeout=60)
    assert p.returncode == 4 and "newer" in p.stderr


# -- 2. fencing ------------------------------------------------------------------------------------


def test_conditional_writes_let_exactly_one_racer_win(storage):
    from orchestrator.core.storage import Conflict

    wins, losses = [], []
    go = threading.Barrier(6)

    def racer(i: int) -> None:
        go.wait()
        try:
            storage.write_if("race.json", f"{i}".encode(), None)
            wins.append(i)
        except Conflict:
            losses.append(i)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 5
    assert storage.read_bytes("race.json") == str(wins[0]).encode()


def test_two_drivers_starting_together_one_wins_the_lease(storage):
    leases = [Lease(storage, ttl_s=30, heartbeat_s=60) for _ in range(4)]
    go = threading.Barrier(len(leases))
    won, refused = [], []

    def start(lease: Lease) -> None:
        go.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld as e:
            refused.append(str(e))

    threads = [threading.Thread(target=start, args=(le,)) for le in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(won) == 1 and len(refused) == 3, refused
    finally:
        for le in won:
            le.release()


def stall_and_take_over(storage: Storage) -> tuple[Lease, RunLedger, Lease]:
    """Driver A owns the run and commits epoch 1, then stalls (a storage outage, a suspended
    laptop) past its TTL, and driver B takes the lease over."""
    a_lease = Lease(storage, ttl_s=1, heartbeat_s=60)
    a_lease.acquire()
    a = RunLedger(storage, "run", CFG, owner=a_lease.token)
    a.start_attempt(1)
    a.commit(upload(storage, 1, 0.9, attempt=1))
    a_lease.stop_heartbeat()
    time.sleep(2.5)  # past A's TTL by the storage's clock (S3 times have 1 s resolution)
    b_lease = Lease(storage, ttl_s=30, heartbeat_s=60)
    b_lease.acquire()
    return a_lease, a, b_lease


def test_a_stalled_driver_is_fenced_and_deletes_nothing_after_a_takeover(storage):
    a_lease, a, b_lease = stall_and_take_over(storage)
    assert b_lease.events and b_lease.events[0]["kind"] == "lease_taken_over"
    a_late = upload(storage, 2, 0.1, attempt=1)  # A's writer finished an upload meanwhile
    b = RunLedger(storage, "run", CFG, owner=b_lease.token)
    b_plan = b.start_attempt(1)  # B's orphan collection: A's uncommitted upload goes
    assert b_plan["restore"]["id"] == "epoch0001-step0000010-a1"
    b.commit(upload(storage, 2, 0.5, attempt=2))
    # A wakes up: its heartbeat and its commit both find the run taken over.
    with pytest.raises(LeaseLost, match=f"taken over by driver pid {b_lease.pid}"):
        a_lease.beat()
    a_again = upload(storage, 3, 0.05, attempt=1)
    with pytest.raises(LeaseLost, match="taken over"):
        a.commit(a_again)
    with pytest.raises(LeaseLost):
        a.finish("finished")  # would have applied retention and collected "orphans"
    m = read_manifest(storage)
    assert {c.id for c in m.checkpoints} == {"epoch0001-step0000010-a1", "epoch0002-step0000020-a2"}
    assert m.owner == b_lease.token
    on_disk = set(storage.list_dirs(CHECKPOINTS))
    assert {c.id for c in m.checkpoints} <= on_disk  # nothing B committed was deleted by A
    assert a_late.id not in on_disk
    a_lease.release()  # must not delete B's lease
    assert Lease(storage).read()["token"] == b_lease.token
    b_lease.release()


def test_a_coordinator_without_the_lease_cannot_claim_the_run(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    holder = Lease(storage, heartbeat_s=60)
    holder.acquire()
    try:
        with pytest.raises(LeaseLost, match=f"taken over by driver pid {holder.pid}"):
            RunLedger(storage, "run", CFG, owner="some-other-token")
    finally:
        holder.release()


# -- 6. `run` on an existing run ---------------------------------------------------------------------


def test_run_refuses_an_existing_unfinished_run(tmp_path):
    storage = Storage(str(tmp_path / "existing"))
    RunLedger(storage, "existing", CFG).commit(upload(storage, 1, 0.5))
    spec_before = b"name: existing\n"
    storage.write_bytes("spec.yaml", spec_before)
    p = run_cli(
        "run",
        "configs/digits.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "name=existing",
        "--set",
        "epochs=1",
        "--set",
        "chaos.kills=[]",
        timeout=120,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert (
        "already holds a running run" in p.stderr
        and f"orchestrator resume {tmp_path / 'existing'}" in p.stderr
    )
    assert storage.read_bytes("spec.yaml") == spec_before  # its spec is left as it was


# -- 8. smaller holes ----------------------------------------------------------------------------


def test_events_are_appended_not_rewritten(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    led = RunLedger(storage, "run", CFG)
    writes: list[str] = []
    plain = storage.write_bytes
    storage.write_bytes = lambda rel, data: (writes.append(rel), plain(rel, data))[1]  # type: ignore[method-assign]
    for i in range(30):
        led.event("note", i=i)
    assert "events.jsonl" not in writes
    rows = read_jsonl(storage, "events.jsonl")
    assert [r["i"] for r in rows if r["kind"] == "note"] == list(range(30))
    again = RunLedger(storage, "run", CFG)  # a restarted coordinator appends after them
    again.event("note", i=30)
    assert [r["i"] for r in read_jsonl(storage, "events.jsonl") if r["kind"] == "note"] == list(range(31))


def test_temp_files_of_an_interrupted_write_are_collected(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    led = RunLedger(storage, "run", CFG)
    tmp = tmp_path / "run" / "manifest.json.tmp-deadbeef"
    tmp.write_bytes(b"half a manif")
    past = time.time() - 1200  # an interrupted write's: a young one may be a live writer's
    os.utime(tmp, (past, past))
    led.start_attempt(1)
    assert not list((tmp_path / "run").glob("*.tmp-*"))


def test_every_credential_spelling_is_kept_out_of_the_spec_events_and_errors(tmp_path):
    from orchestrator.core.storage import redact_options, secrets_in

    canaries = {
        "aws_access_key_id": "CANARY-AKID-1",
        "aws_secret_access_key": "CANARY-SAK-2",
        "key": "CANARY-KEY-3",
        "secret": "CANARY-SECRET-4",
        "token": "CANARY-TOKEN-5",
        "aws_session_token": "CANARY-SESSION-6",
        "session_token": "CANARY-SESSION-7",
        "password": "CANARY-PASSWORD-8",
    }
    options = {
        **{k: v for k, v in canaries.items() if not k.startswith("aws_")},
        "client_kwargs": {k: v for k, v in canaries.items() if k.startswith("aws_")},
    }
    shown = json.dumps(redact_options(options))
    assert not [v for v in canaries.values() if v in shown], shown
    assert set(canaries.values()) <= set(secrets_in(options))
    storage = Storage(str(tmp_path / "run"), options)
    led = RunLedger(storage, "run", CFG)
    rec = upload(storage, 1, 0.5)
    led.commit(rec)

    def failing_delete(rel: str) -> None:
        raise PermissionError(f"denied for key CANARY-KEY-3 secret CANARY-SECRET-4 on {rel}")

    storage.delete = failing_delete  # type: ignore[method-assign]
    led._delete(rec.id, "retention")
    text = (tmp_path / "run" / "events.jsonl").read_text()
    assert "delete_failed" in text and "CANARY" not in text


def test_best_verifies_and_falls_back_past_a_damaged_best(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    led = RunLedger(storage, "run", RetentionConfig("val_loss", "min", top_k=3, keep_latest=1))
    for epoch, loss in [(1, 0.3), (2, 0.1), (3, 0.5)]:
        led.commit(upload(storage, epoch, loss))
    damaged = tmp_path / "run" / CHECKPOINTS / "epoch0002-step0000020-a1" / "model.pt"
    data = bytearray(damaged.read_bytes())
    data[0] ^= 0xFF  # one flipped byte
    damaged.write_bytes(bytes(data))
    p = run_cli("best", str(tmp_path / "run"), "--json", timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["epoch"] == 1 and out["skipped"][0]["id"] == "epoch0002-step0000020-a1"
    assert "failed verification" in p.stderr and "using the next best" in p.stderr
    p = run_cli("best", str(tmp_path / "run"), "--download", str(tmp_path / "out"), timeout=60)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "model.pt").read_bytes() == b"weights 1"


def test_best_chosen_again_when_retention_deleted_it_mid_read(tmp_path):
    from orchestrator.api import Run

    storage = Storage(str(tmp_path / "run"))
    led = RunLedger(storage, "run", RetentionConfig("val_loss", "min", top_k=1, keep_latest=1))
    led.commit(upload(storage, 1, 0.3))
    seen = read_manifest(storage)  # a reader chose epoch 1 as best here ...
    led.commit(upload(storage, 2, 0.1))  # ... then a better commit dropped it
    led.commit(upload(storage, 3, 0.5))
    run = Run(storage.uri)
    run.manifest = seen  # what the reader had read
    found = run.verified_best(into=str(tmp_path / "got"))
    assert found.checkpoint.epoch == 2 and found.skipped == []
    assert (tmp_path / "got" / "model.pt").read_bytes() == b"weights 2"


@pytest.mark.parametrize("override", ["seed=7", "task.options.lr=0.5", "checkpoint.monitor=val_acc"])
def test_resume_refuses_overrides_that_change_what_the_run_computes(tmp_path, override):
    p = run_cli("resume", str(tmp_path / "any"), "--set", override, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"--set {override.split('=')[0]}: cannot change on resume" in p.stderr


def test_a_fenced_coordinator_deletes_nothing_the_new_owner_committed(storage):
    a_lease, a, b_lease = stall_and_take_over(storage)
    b = RunLedger(storage, "run", CFG, owner=b_lease.token)
    b.start_attempt(1)
    b.commit(upload(storage, 2, 0.5, attempt=2))
    b.commit(upload(storage, 3, 0.4, attempt=2))
    # A's worker group restarts (its commit failed) and asks A's coordinator for an attempt:
    # its manifest is stale, so everything B committed looks like an orphan to it.
    for _ in range(2):
        with pytest.raises(LeaseLost, match="taken over"):
            a.start_attempt(1)
    on_disk = set(storage.list_dirs(CHECKPOINTS))
    assert {c.id for c in read_manifest(storage).checkpoints} <= on_disk
    assert {"epoch0002-step0000020-a2", "epoch0003-step0000030-a2"} <= on_disk
    b_lease.release()
    a_lease.release()


def test_a_write_whose_answer_was_lost_is_not_mistaken_for_a_takeover(moto, bucket):
    """The PUT lands, its response does not (a reset): the retry meets our own write."""
    from orchestrator.core.storage import RetryPolicy

    storage = Storage(
        f"s3://{bucket}/runs/run",
        {"endpoint_url": moto.endpoint, **S3_OPTS},
        retry=RetryPolicy(attempts=3, initial_s=0.01, max_s=0.02),
    )
    lease = Lease(storage, heartbeat_s=3600)
    lease.acquire()
    led = RunLedger(storage, "run", CFG, owner=lease.token)
    led.start_attempt(1)
    real, lost = storage.fs.call_s3, []

    def answer_lost_once(method, *args, **kwargs):
        out = real(method, *args, **kwargs)  # the request reaches the store and is applied
        if method == "put_object" and not lost:
            lost.append(kwargs["Key"])
            raise ConnectionResetError(104, "Connection reset by peer")
        return out

    storage.fs.call_s3 = answer_lost_once
    rec = upload(storage, 1, 0.5)  # plain writes are retried as before
    lost.clear()
    led.commit(rec)  # the manifest's conditional PUT: landed, answer lost, retried
    assert lost and lost[0].endswith("manifest.json")
    assert read_manifest(storage).get(rec.id) is not None
    lost.clear()
    lease.beat()  # the lease's conditional PUT, the same way
    assert lost and lost[0].endswith("lease.json") and lease.lost is None
    storage.fs.call_s3 = real
    lease.release()


def test_the_python_api_reads_a_run_on_local_and_s3(storage):
    from orchestrator import open_run

    led = RunLedger(storage, "run", CFG)
    for epoch, loss in [(1, 0.5), (2, 0.3), (3, NAN)]:
        led.commit(upload(storage, epoch, loss))
        led.report_metrics({"epoch": epoch, "val_loss": loss, "attempt": 1})
    run = open_run(storage.uri, storage.options)
    assert (run.monitor, run.mode, run.status) == ("val_loss", "min", "running")
    assert run.best().epoch == 2 and run.best(rank=2).epoch == 1
    assert [c.rank for c in run.checkpoints()] == [2, 1, None]  # NaN: kept as latest, never ranked
    frame = run.metrics()
    assert list(frame["epoch"]) == [1, 2, 3]  # a DataFrame: pandas is installed here
    assert run.metrics(as_frame=False)[1]["val_loss"] == 0.3
    assert [e["kind"] for e in run.events(["commit"])] == ["commit"] * 3

"""The fault campaign (harness/campaign.py): its plans, its checks (each must catch the defect it
is for, on a run built by the real coordinator ledger), and a small seeded campaign end to end:
three runs on a real multi-node Ray cluster (and a second one, for the partition) and moto S3
behind the fault proxy, covering every fault kind (docs/reliability.md reports a larger one)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from harness import campaign
from harness.cli import ROOT, cli_env
from orchestrator.coordinator import RetentionConfig, RunLedger
from orchestrator.core.manifest import CHECKPOINTS, EVENTS, METRICS, RECORD, CheckpointRecord, FileEntry
from orchestrator.core.storage import Storage, sha256_hex

STEPS, EPOCHS = 10, 4
CFG = {"top_k": 1, "keep_latest": 1, "keep_every_n_epochs": 2}
LOSSES = [0.9, 0.5, 0.7, 0.6]  # epoch 2 is the best


# -- plans -----------------------------------------------------------------------------------------


def test_plans_are_seeded_and_every_three_runs_cover_every_kind():
    plans = campaign.make_plans(7, 9, 8, 23, ["epochs", "midepoch"])
    again = campaign.make_plans(7, 9, 8, 23, ["epochs", "midepoch"])
    assert [[f.describe() for f in p.faults] for p in plans] == [
        [f.describe() for f in p.faults] for p in again
    ]
    assert plans != campaign.make_plans(8, 9, 8, 23, ["epochs", "midepoch"])
    for block in (plans[0:3], plans[3:6], plans[6:9]):
        assert {f.kind for p in block for f in p.faults} == set(campaign.KINDS)
        assert [p.partitioned for p in block].count(True) == 1  # a third of the runs
        assert all(sum(f.kind == "partition" for f in p.faults) <= 1 for p in block)
    for p in plans:
        external = [f.epoch for f in p.faults if f.kind not in campaign.CHAOS_KINDS]
        assert len(set(external)) == len(external) and all(1 <= e <= 5 for e in external)
        for k in p.chaos():
            assert k["rank"] in (0, 1) and 1 <= k["epoch"] <= 8 and 0 <= k.get("step", 0) < 23
    assert [p.variant for p in plans[:4]] == ["epochs", "midepoch", "epochs", "midepoch"]


def test_plans_narrowed_to_some_kinds():
    """--only: the blocks cover the kinds asked for; with only partition, every run has one."""
    plans = campaign.make_plans(7, 4, 8, 23, ["epochs"], ("partition",))
    assert [[f.kind for f in p.faults] for p in plans] == [["partition"]] * 4
    plans = campaign.make_plans(7, 6, 8, 23, ["epochs"], ("driver_kill", "s3_outage", "partition"))
    assert {f.kind for p in plans for f in p.faults} == {"driver_kill", "s3_outage", "partition"}
    assert sum(p.partitioned for p in plans) == 2
    # A last block of fewer than three runs still gets its partition.
    assert campaign.make_plans(7, 1, 8, 23, ["epochs"])[0].partitioned


# -- checks ----------------------------------------------------------------------------------------


def _upload(storage: Storage, epoch: int, loss: float, weight: float) -> CheckpointRecord:
    """A checkpoint as rank 0's writer leaves it: the files, then checkpoint.json last."""
    cid = f"epoch{epoch:04d}-step{epoch * STEPS:07d}-a1"
    files = []
    for name, tree in {
        "model.pt": {"w": torch.full((3,), weight)},
        "train_state.pt": {"step": epoch},
    }.items():
        buf = io.BytesIO()
        torch.save(tree, buf)
        storage.write_bytes(f"{CHECKPOINTS}/{cid}/{name}", buf.getvalue())
        files.append(FileEntry(path=name, size=len(buf.getvalue()), sha256=sha256_hex(buf.getvalue())))
    rec = CheckpointRecord(
        id=cid,
        epoch=epoch,
        step_in_epoch=STEPS,
        global_step=epoch * STEPS,
        end_of_epoch=True,
        metrics={"val_loss": loss},
        files=files,
        world_size=2,
        attempt=1,
    )
    storage.write_bytes(f"{CHECKPOINTS}/{cid}/{RECORD}", json.dumps(rec.model_dump()).encode())
    return rec


def _run(tmp_path, name: str) -> Storage:
    """A finished 4-epoch run, committed and retained by the coordinator's own ledger."""
    storage = Storage(str(tmp_path / name))
    led = RunLedger(
        storage, name, RetentionConfig("val_loss", "min", top_k=1, keep_latest=1, keep_every_n_epochs=2)
    )
    led.start_attempt(2)
    for epoch, loss in enumerate(LOSSES, 1):
        led.report_metrics({"epoch": epoch, "global_step": epoch * STEPS, "attempt": 1, "val_loss": loss})
        led.commit(_upload(storage, epoch, loss, weight=epoch / 3))
    led.finish("finished")
    return storage


def _check(storage: Storage, ref: campaign.Reference | None = None) -> campaign.Checked:
    return campaign.check_run(storage, CFG, EPOCHS, STEPS, ref)[0]


@pytest.fixture
def ref(tmp_path) -> campaign.Reference:
    checked, reference = campaign.check_run(_run(tmp_path, "ref"), CFG, EPOCHS, STEPS, None)
    assert checked.all() == [] and checked.finished
    assert sorted(reference.kept) == [(2, 20), (4, 40)] and reference.best_epoch == 2
    return reference


def test_a_run_equal_to_its_reference_passes(tmp_path, ref):
    assert _check(_run(tmp_path, "same"), ref).all() == []


def test_an_orphan_object_is_caught(tmp_path, ref):
    st = _run(tmp_path, "orphan")
    st.write_bytes(f"{CHECKPOINTS}/epoch0003-step0000030-a2/model.pt", b"uploaded, never committed")
    st.write_bytes("lease.json", b"{}")
    got = _check(st, ref)
    assert got.orphans == [f"{CHECKPOINTS}/epoch0003-step0000030-a2/model.pt", "lease.json"], got.all()


def test_a_commit_gone_without_retention_is_caught(tmp_path, ref):
    st = _run(tmp_path, "lost")
    m = json.loads(st.read_bytes("manifest.json"))
    m["checkpoints"] = [c for c in m["checkpoints"] if c["epoch"] != 2]  # the best, dropped
    m["kept"].pop("epoch0002-step0000020-a1")
    st.write_bytes("manifest.json", json.dumps(m).encode())
    st.delete(f"{CHECKPOINTS}/epoch0002-step0000020-a1")
    got = _check(st, ref)
    assert got.lost == ["epoch0002-step0000020-a1 committed, gone, and no delete of it can be accounted for"]
    assert any("the rules keep" in p for p in got.problems)


def test_a_delete_while_retention_still_kept_it_is_caught(tmp_path, ref):
    st = _run(tmp_path, "early")
    events = st.read_bytes(EVENTS).decode().splitlines()
    at = next(i for i, e in enumerate(events) if '"commit"' in e and "epoch0003" in e)
    early = {"ts": 0, "kind": "delete", "id": "epoch0002-step0000020-a1", "why": "retention"}
    st.write_bytes(EVENTS, "\n".join([*events[: at + 1], json.dumps(early), *events[at + 1 :]]).encode())
    got = _check(st, ref)
    assert any("while the retention rules still kept it" in x for x in got.lost), got.all()


def test_a_checkpoint_that_does_not_verify_is_caught(tmp_path, ref):
    st = _run(tmp_path, "damaged")
    path = tmp_path / "damaged" / CHECKPOINTS / "epoch0004-step0000040-a1" / "model.pt"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert any("does not verify" in x for x in _check(st, ref).lost)


def test_different_weights_and_metrics_are_caught(tmp_path, ref):
    st = _run(tmp_path, "bits")
    rec = CheckpointRecord.model_validate_json(
        st.read_bytes(f"{CHECKPOINTS}/epoch0004-step0000040-a1/{RECORD}")
    )
    buf = io.BytesIO()
    w = torch.full((3,), 4 / 3).nextafter(torch.tensor(2.0))  # one ulp off, and it verifies
    torch.save({"w": w}, buf)
    st.write_bytes(f"{rec.dir}/model.pt", buf.getvalue())
    m = json.loads(st.read_bytes("manifest.json"))
    for c in m["checkpoints"]:
        if c["id"] == rec.id:
            c["files"][0].update(size=len(buf.getvalue()), sha256=sha256_hex(buf.getvalue()))
    st.write_bytes("manifest.json", json.dumps(m).encode())
    rows = st.read_bytes(METRICS).decode().splitlines()
    st.write_bytes(METRICS, "\n".join([*rows, rows[-1]]).encode())  # epoch 4 twice
    got = _check(st, ref)
    assert got.mismatches[-1] == "e4/step40 differs at .model.pt.w", got.all()
    assert any("metrics epochs [1, 2, 3, 4, 4]" in p for p in got.problems)


def test_an_interrupted_retention_delete_collected_as_an_orphan_is_no_loss(tmp_path, ref):
    """The coordinator killed after the manifest dropped a checkpoint, before deleting it: the
    next orphan collection deletes it. Nothing was lost, and the note says what happened."""
    st = _run(tmp_path, "interrupted")
    events = [json.loads(x) for x in st.read_bytes(EVENTS).decode().splitlines()]
    for e in events:
        if e["kind"] == "delete" and e["id"] == "epoch0003-step0000030-a1":
            e["why"] = "orphan: never committed"
    st.write_bytes(EVENTS, "".join(json.dumps(e) + "\n" for e in events).encode())
    got = _check(st, ref)
    assert got.all() == [] and got.notes == [
        "epoch0003-step0000030-a1: committed, dropped by retention, its delete logged as 'orphan: never committed'"
    ]


def test_a_delete_without_its_event_is_accounted_for_only_by_a_coordinator_that_died(tmp_path, ref):
    """The coordinator deleted what retention dropped and was killed before logging it: fine
    when a new coordinator started after it and the rules no longer kept the checkpoint."""
    st = _run(tmp_path, "unlogged")
    events = [json.loads(x) for x in st.read_bytes(EVENTS).decode().splitlines()]
    at = next(
        i for i, e in enumerate(events) if e["kind"] == "delete" and e["id"] == "epoch0003-step0000030-a1"
    )
    without = events[:at] + events[at + 1 :]
    st.write_bytes(EVENTS, "".join(json.dumps(e) + "\n" for e in without).encode())
    assert _check(st, ref).lost == [
        "epoch0003-step0000030-a1 committed, gone, and no delete of it can be accounted for"
    ]
    restarted = {"ts": 0, "kind": "coordinator_started", "pid": 1}
    st.write_bytes(
        EVENTS, "".join(json.dumps(e) + "\n" for e in [*without[:at], restarted, *without[at:]]).encode()
    )
    got = _check(st, ref)
    assert got.all() == [] and got.notes == [
        "epoch0003-step0000030-a1: committed, dropped by retention, deleted by "
        "a coordinator that died before it logged the delete"
    ]
    # A commit whose event died with its coordinator counts from the commit before it: the
    # delete of epoch 1 that it caused is no early delete.
    no_commit = [e for e in events if not (e["kind"] == "commit" and e["id"].startswith("epoch0002"))]
    st.write_bytes(EVENTS, "".join(json.dumps(e) + "\n" for e in no_commit).encode())
    assert _check(st, ref).all() == []
    # A coordinator restart before the rules dropped it does not account for it.
    early = next(
        i for i, e in enumerate(without) if e["kind"] == "commit" and e["id"].startswith("epoch0003")
    )
    st.write_bytes(
        EVENTS,
        "".join(
            json.dumps(e) + "\n" for e in [*without[: early + 1], restarted, *without[early + 1 :]]
        ).encode(),
    )
    assert _check(st, ref).lost == [
        "epoch0003-step0000030-a1 committed, gone, and no delete of it can be accounted for"
    ]


def test_a_driver_summary_with_more_on_stdout_is_noted_and_garbage_is_a_failure(tmp_path):
    out = tmp_path / "driver.out"
    res = campaign.RunResult(campaign.Plan(1, "epochs", []), lives=1)
    out.write_text('{"status": "finished", "best": {"epoch": 6}}\n(raylet) Task Coordinator.commit failed\n')
    campaign.Campaign._read_summary(res, out)
    assert res.summary["best"]["epoch"] == 6 and res.checked.problems == []
    assert res.checked.notes == [
        "driver 1: stdout holds more than its --json summary: (raylet) Task Coordinator.commit failed"
    ]
    out.write_text("Traceback (most recent call last):\n")
    campaign.Campaign._read_summary(res, out)
    assert res.checked.problems and "stdout is not its --json summary" in res.checked.problems[0]


def test_what_a_partitions_stale_side_changed_is_judged(moto, bucket, tmp_path):
    """After a partition, the first proxy's log of writes since the freeze is driver A's side:
    a delete of a checkpoint B committed (or kept) is a lost commit, of one B only uploaded a
    problem, of A's own upload a note; a manifest or lease write that went through after the
    thaw is a problem (one in flight at the freeze, or a refused one, is not); a journal that
    A's coordinator rewrote is a note."""
    from types import SimpleNamespace

    from harness.s3 import CREDS

    st = Storage(
        f"s3://{bucket}/runs/r",
        {
            "endpoint_url": moto.endpoint,
            "key": CREDS["AWS_ACCESS_KEY_ID"],
            "secret": CREDS["AWS_SECRET_ACCESS_KEY"],
        },
    )
    b_commit = "epoch0005-step0000100-a3"
    st.write_bytes(EVENTS, json.dumps({"ts": 9.0, "kind": "commit", "id": b_commit}).encode() + b"\n")
    c = campaign.Campaign(tmp_path, EPOCHS, print)
    ck = f"/{bucket}/runs/r/{CHECKPOINTS}"
    c.proxy = SimpleNamespace(
        writes=[
            (1.0, "PUT", f"/{bucket}/runs/r/manifest.json", 200),  # before the freeze (the mark)
            (5.0, "PUT", f"/{bucket}/runs/r/lease.json", 200),  # A's heartbeat in flight at the freeze
            (6.0, "PUT", f"{ck}/epoch0005-step0000100-a2/model.pt", 200),  # A's writer, frozen side
            (10.0, "DELETE", f"{ck}/{b_commit}/model.pt", 204),
            (10.0, "DELETE", f"{ck}/{b_commit}/checkpoint.json", 204),
            (10.0, "DELETE", f"{ck}/epoch0005-step0000110-a3/model.pt", 204),  # B's, not committed yet
            (
                10.0,
                "DELETE",
                f"{ck}/epoch0004-step0000092-a1/model.pt",
                204,
            ),  # A's commit, B's manifest keeps
            (10.0, "DELETE", f"{ck}/epoch0005-step0000100-a2/model.pt", 204),  # A's own upload
            (12.0, "PUT", f"/{bucket}/runs/r/manifest.json", 412),  # the compare-and-swap refused
            (12.0, "PUT", f"/{bucket}/runs/r/{METRICS}", 200),
            (13.0, "DELETE", f"/{bucket}/runs/r/lease.json", 204),
            (13.0, "PUT", f"/{bucket}/other/{CHECKPOINTS}/x-a9/model.pt", 200),  # not this run
        ]
    )
    f = campaign.Fault("partition", 3, mode="training", at=4.0)
    res = campaign.RunResult(campaign.Plan(1, "epochs", [f]))
    t = campaign.Thawed(None, None, f, res, 3, {"epoch0004-step0000092-a1": None}, 1, 11.0, 0.0)  # type: ignore[arg-type]
    problems = c._a_side_writes(st, t)
    assert res.checked.lost == [
        "epoch0004-step0000092-a1 (kept by B's manifest at the thaw) deleted by A's side after the takeover (1 objects)",
        f"{b_commit} (committed by B) deleted by A's side after the takeover (2 objects)",
    ]
    assert problems == [
        "A's side: DELETE lease.json went through (204) at +9s",
        "A's side deleted epoch0005-step0000110-a3, B's upload (1 objects)",
    ]
    assert "its own uncommitted epoch0005-step0000100-a2" in f.note and "1 upload(s), 1 refused" in f.note
    assert res.checked.notes == [
        "partition(after e3, training): A's coordinator rewrote metrics.jsonl 1 time(s) after the thaw, with its "
        "stale rows (B's next write restores them)"
    ]


def test_what_driving_a_run_found_outlives_its_checks():
    during = campaign.Checked(problems=["driver 2 exited 3 without the documented error"], notes=["n1"])
    after = campaign.Checked(lost=["x"], notes=["n2"])
    after.merge(during)
    assert after.all() == ["lost: x", "driver 2 exited 3 without the documented error"]
    assert after.notes == ["n1", "n2"]


# -- what the campaign found ------------------------------------------------------------------------


def test_a_storage_retry_leaves_the_training_rng_streams_alone(tmp_path):
    """Seed 12, run 3: rank 0's background writer retried its uploads through an S3 outage, and
    the retry's jitter came from Python's global `random`, the stream a training loop seeds and
    each checkpoint captures: every later checkpoint held another Python RNG state than the
    fault-free run's (the digits task draws nothing from it; a task that does would diverge)."""
    from orchestrator.core.storage import RetryPolicy

    retries = []
    st = Storage(
        str(tmp_path / "run"),
        retry=RetryPolicy(attempts=4, initial_s=0.001, max_s=0.002),
        on_retry=lambda *a: retries.append(a),
    )
    st.write_bytes("x", b"data")
    failures = [ConnectionResetError(104, "Connection reset by peer"), TimeoutError("timed out")]
    real = st.fs.cat_file

    def flaky(path, *args, **kwargs):
        if failures:
            raise failures.pop(0)
        return real(path, *args, **kwargs)

    st.fs.cat_file = flaky
    torch_state = torch.get_rng_state()
    import random

    random.seed(1234)
    before = random.getstate()
    assert st.read_bytes("x") == b"data"
    assert len(retries) == 2 and random.getstate() == before
    assert torch.equal(torch.get_rng_state(), torch_state)


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_an_s3_retry_leaves_the_training_rng_streams_alone(moto, bucket, mode):
    """Seed 12, run 6 (after the fix above): botocore still retried each S3 request once
    (`max_attempts` counts retries, and 1 was set to mean none), its delay drawn from the global
    `random`: the same Python RNG difference in every checkpoint after an S3 hiccup."""
    import random
    import threading

    from harness.s3 import CREDS, FaultProxy

    proxy = FaultProxy(moto.port)
    proxy.server.handle_error = lambda *a: None  # the resets it makes
    retries = []
    try:
        st = Storage(
            f"s3://{bucket}/run",
            {
                "endpoint_url": proxy.endpoint,
                "key": CREDS["AWS_ACCESS_KEY_ID"],
                "secret": CREDS["AWS_SECRET_ACCESS_KEY"],
            },
            on_retry=lambda *a: retries.append(a),
        )
        st.write_bytes("x", b"before")
        proxy.mode = mode
        threading.Timer(0.5, lambda: setattr(proxy, "mode", "ok")).start()
        random.seed(1234)
        before = random.getstate()
        st.write_bytes("x", b"during")
        assert st.read_bytes("x") == b"during" and retries and proxy.faults
        assert random.getstate() == before
    finally:
        proxy.close()


# -- the small campaign ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_small_seeded_campaign(tmp_path):
    """Seed 5: three runs, two or three fault kinds each and a partition in one of them, every
    kind at least once (see make_plans)."""
    out = tmp_path / "campaign.json"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.campaign",
            "--runs",
            "3",
            "--seed",
            "5",
            "--specs",
            "midepoch",
            "--json",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    result = json.loads(out.read_text())
    t = result["totals"]
    assert (t["runs"], t["finished"], t["failed_runs"]) == (3, 3, 0), result
    assert (t["lost_commits"], t["orphans"], t["bitwise_mismatches"]) == (0, 0, 0), result
    planned = [f["kind"] for run in result["runs"] for f in run["faults"]]
    assert t["faults"] == {k: planned.count(k) for k in campaign.KINDS}, t["faults"]
    assert all(t["faults"][k] >= 1 for k in campaign.KINDS), t["faults"]
    assert t["restarts"] >= 3, t
    assert t["resumes_after_driver_kill"] == planned.count("driver_kill"), t
    assert t["resumes_after_partition"] == planned.count("partition") == 1, t
    for run in result["runs"]:
        assert run["ok"] and all(f["fired"] for f in run["faults"]), run
    # The partition: B took over on the second cluster, A stopped with exit 3.
    (part,) = [f for run in result["runs"] for f in run["faults"] if f["kind"] == "partition"]
    assert "SIGSTOPped" in part["note"] and "A exited 3" in part["note"], part
    assert "| runs | finished |" in p.stdout and "[campaign" in p.stdout

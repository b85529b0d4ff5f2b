"""Storage on a real S3-protocol server (moto over HTTP on loopback)."""

from __future__ import annotations

import json
import time

import pytest

from harness.cli import cli_env, expected_kept, run_cli, start_cli, wait_until
from harness.s3 import FaultProxy
from orchestrator.core.manifest import CHECKPOINTS, CheckpointRecord, FileEntry, read_manifest
from orchestrator.core.storage import Storage, sha256_hex
from orchestrator.core.verify import VerificationError, read_verified


def s3_objects(moto, bucket, prefix=""):
    out = {}
    for page in moto.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = o["Size"]
    return out


def committed(storage, cid="c1", data=b"0123456789" * 100):
    storage.write_bytes(f"{CHECKPOINTS}/{cid}/model.pt", data)
    return CheckpointRecord(
        id=cid,
        epoch=1,
        step_in_epoch=1,
        global_step=1,
        end_of_epoch=True,
        files=[FileEntry(path="model.pt", size=len(data), sha256=sha256_hex(data))],
        world_size=1,
        attempt=1,
    )


@pytest.fixture(params=["local", "s3"])
def any_storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "run"))
    request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("bucket")
    return Storage(f"s3://{bucket}/runs/r")


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete"])
def test_verification_catches_damaged_files(any_storage, damage):
    rec = committed(any_storage)
    assert read_verified(any_storage, rec)["model.pt"] == b"0123456789" * 100
    rel = f"{CHECKPOINTS}/c1/model.pt"
    data = bytearray(any_storage.read_bytes(rel))
    if damage == "truncate":
        any_storage.write_bytes(rel, bytes(data[:500]))
    elif damage == "bitflip":
        data[123] ^= 0x01
        any_storage.write_bytes(rel, bytes(data))
    else:
        any_storage.delete(rel)
    expected = {"truncate": "size 500 != recorded 1000", "bitflip": "sha256", "delete": "missing"}[damage]
    with pytest.raises(VerificationError, match=expected):
        read_verified(any_storage, rec)


def test_s3_manifest_is_one_put_and_readers_never_see_part(s3_env, bucket, moto):
    from test_storage import torn_reads_while_rewriting

    uri = f"s3://{bucket}/runs/atomic"
    reader = Storage(uri, {"skip_instance_cache": True})
    assert torn_reads_while_rewriting(Storage(uri), reader, 1500, writes=15) == []
    assert set(s3_objects(moto, bucket, "runs/atomic/")) == {  # no temp object
        "runs/atomic/manifest.json",
        "runs/atomic/manifest.backup.json",
    }


CANARY_KEY = "AKIACANARY0000000001"
CANARY_SECRET = "canary-secret-5f1e9d0c-never-print-me"


@pytest.mark.e2e
def test_digits_on_s3_survives_kills_collects_orphans_and_keeps_secrets(moto, bucket, tmp_path):
    """The demo with storage on s3://, credentials given only as storage options (canaries),
    rank 0 killed between upload and commit at epoch 3 and rank 1 killed at epoch 5."""
    env = cli_env(AWS_ENDPOINT_URL=moto.endpoint, AWS_DEFAULT_REGION="us-east-1")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k, None)
    kills = "[{rank: 0, epoch: 3, point: after_upload}, {rank: 1, epoch: 5}]"
    p = run_cli(
        "run",
        "configs/digits.yaml",
        "--set",
        f"storage.root=s3://{bucket}/runs",
        "--set",
        "name=s3demo",
        "--set",
        f"storage.options={{key: {CANARY_KEY}, secret: {CANARY_SECRET}}}",
        "--set",
        f"chaos.kills={kills}",
        "--set",
        "epochs=7",
        "--address",
        "local",
        "--verbose",
        env=env,
    )
    assert p.returncode == 0, p.stderr[-5000:]
    prefix = "runs/s3demo/"
    objs = s3_objects(moto, bucket, prefix)
    s3 = moto.client()
    get = lambda key: s3.get_object(Bucket=bucket, Key=prefix + key)["Body"].read()  # noqa: E731
    manifest = json.loads(get("manifest.json"))
    events = [json.loads(x) for x in get("events.jsonl").decode().splitlines()]
    metrics = [json.loads(x) for x in get("metrics.jsonl").decode().splitlines()]

    # boto3, pointed at the same endpoint, lists exactly the checkpoints the manifest names.
    listed = {
        k[len(prefix + "checkpoints/") :].split("/")[0] for k in objs if k.startswith(prefix + "checkpoints/")
    }
    assert listed == {c["id"] for c in manifest["checkpoints"]}
    assert {c["epoch"] for c in manifest["checkpoints"]} == expected_kept(metrics, "val_loss", "min", 3)

    # The upload that never got its commit was deleted when the next attempt started, never loaded.
    fired = [e for e in events if e["kind"] == "chaos_kill"]
    assert len(fired) == 2 and manifest["restarts"] == 2
    orphan_deletes = [e for e in events if e["kind"] == "delete" and e["why"].startswith("orphan")]
    uploaded_not_committed = [e["id"] for e in orphan_deletes if e["id"].startswith("epoch0003")]
    assert len(uploaded_not_committed) == 1
    i_orphan = next(i for i, e in enumerate(events) if e.get("id") == uploaded_not_committed[0])
    assert not any(e["kind"] == "commit" and e["id"] == uploaded_not_committed[0] for e in events[:i_orphan])
    second = [e for e in events if e["kind"] == "attempt_started"][1]
    assert second["restore_epoch"] == 2  # epoch 3 was uploaded but never committed, so never loaded

    # The canary credentials are nowhere: output, events, stored spec, any object.
    everything = (
        p.stdout
        + p.stderr
        + "".join(get(k[len(prefix) :]).decode("latin-1") for k in objs if not k.endswith(".pt"))
    )
    assert CANARY_SECRET not in everything and CANARY_KEY not in everything
    assert "***" in get("spec.yaml").decode()


@pytest.mark.e2e
def test_transient_storage_faults_are_retried_and_training_goes_on(moto, bucket, tmp_path, kill_group):
    proxy = FaultProxy(moto.port)
    env = cli_env(
        AWS_ENDPOINT_URL=proxy.endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        proc = start_cli(
            "run",
            "configs/digits.yaml",
            "--set",
            f"storage.root=s3://{bucket}/runs",
            "--set",
            "name=flaky",
            "--set",
            "chaos.kills=[]",
            "--set",
            "epochs=6",
            "--address",
            "local",
            log=tmp_path / "run.log",
            env=env,
        )
        kill_group(proc)
        s = Storage(
            f"s3://{bucket}/runs/flaky",
            {"endpoint_url": moto.endpoint, "key": "testing", "secret": "testing"},
        )
        wait_until(lambda: (m := read_manifest(s)) is not None and len(m.checkpoints) >= 1, 240, "a commit")
        for mode in ("flaky", "reset", "flaky"):  # 503 SlowDown on every other request; then resets
            proxy.mode = mode
            time.sleep(2.0)
        proxy.mode = "ok"
        assert proc.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-4000:]
    finally:
        proxy.close()
    assert proxy.faults > 0
    events = [json.loads(x) for x in s.read_bytes("events.jsonl").decode().splitlines()]
    retries = [e for e in events if e["kind"] == "storage_retry"]
    assert retries, "faults were injected but no retry was logged"
    assert all(e["attempt"] >= 1 and e["delay_s"] > 0 for e in retries)
    assert read_manifest(s).status == "finished"


@pytest.mark.e2e
def test_persistent_outage_fails_clearly_keeps_commits_and_resume_continues(
    moto, bucket, tmp_path, kill_group
):
    proxy = FaultProxy(moto.port)
    env = cli_env(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    uri = f"s3://{bucket}/runs/outage"
    direct = Storage(uri, {"endpoint_url": moto.endpoint, "key": "testing", "secret": "testing"})
    try:
        proc = start_cli(
            "run",
            "configs/digits.yaml",
            "--set",
            f"storage.root=s3://{bucket}/runs",
            "--set",
            "name=outage",
            "--set",
            "chaos.kills=[]",
            "--set",
            "epochs=8",
            "--set",
            f"storage.options={{endpoint_url: '{proxy.endpoint}'}}",
            "--set",
            "storage.retry={attempts: 3, initial_s: 0.2, max_s: 1}",
            "--set",
            "failure.max_failures=1",
            "--address",
            "local",
            log=tmp_path / "run.log",
            env=env,
        )
        kill_group(proc)
        wait_until(
            lambda: (m := read_manifest(direct)) is not None and len(m.checkpoints) >= 2, 240, "2 commits"
        )
        proxy.mode = "503"
        before = read_manifest(direct)
        rc = proc.wait(timeout=300)
        log = (tmp_path / "run.log").read_text()
        assert rc != 0, log[-3000:]
        assert "giving up" in log and f"orchestrator resume {uri}" in log, log[-3000:]

        # Every checkpoint committed before the outage is still whole in storage.
        after = read_manifest(direct)
        assert {c.id for c in before.checkpoints} <= {c.id for c in after.checkpoints}
        for c in after.checkpoints:
            read_verified(direct, c)

        proxy.mode = "ok"
        # No AWS_ENDPOINT_URL in this environment: the endpoint is needed to read the run at all.
        p = run_cli(
            "resume",
            uri,
            "--storage-option",
            f"endpoint_url={proxy.endpoint}",
            "--address",
            "local",
            "--json",
            env=env,
        )
        assert p.returncode == 0, p.stderr[-4000:]
    finally:
        proxy.close()
    final = read_manifest(direct)
    assert final.status == "finished"
    events = [json.loads(x) for x in direct.read_bytes("events.jsonl").decode().splitlines()]
    resumed = [e for e in events if e["kind"] == "attempt_started"][-1]
    assert resumed["restore"] is not None and resumed["restore_epoch"] >= max(
        c.epoch for c in before.checkpoints
    )
    metrics = [json.loads(x) for x in direct.read_bytes("metrics.jsonl").decode().splitlines()]
    assert [r["epoch"] for r in metrics] == list(range(1, 9))


def test_missing_bucket_is_a_clear_storage_error(s3_env):
    env = cli_env(**s3_env)
    p = run_cli(
        "run",
        "configs/digits.yaml",
        "--set",
        "storage.root=s3://no-such-bucket-here/runs",
        "--address",
        "local",
        env=env,
        timeout=120,
    )
    assert p.returncode == 4, p.stdout + p.stderr
    assert "storage s3://no-such-bucket-here/runs/digits" in p.stderr and "bucket" in p.stderr.lower()
    assert "Traceback" not in p.stderr


def test_the_fault_proxy_passes_an_objects_size_on_head(moto, bucket):
    """A stat through the proxy sees the object's size (it answered HEAD with a length of 0,
    so the shared-copy check found every file through it 'damaged', size 0)."""
    from orchestrator.core.storage import Storage

    proxy = FaultProxy(moto.port)
    try:
        opts = {"endpoint_url": proxy.endpoint, "key": "testing", "secret": "testing"}
        storage = Storage(f"s3://{bucket}/runs/head", opts)
        storage.write_bytes("x.bin", b"12345678")
        assert storage.list_sizes("") == {"x.bin": 8}
        assert storage.fs.info(storage.path("x.bin"))["size"] == 8  # a HEAD
    finally:
        proxy.close()

"""A manifest edited by hand into invalid JSON: every command refuses it clearly (the file, what
is wrong, how to recover), and `orchestrator repair` restores it from the backup the
coordinator keeps, checked against storage: on a local directory and on moto's S3 server."""

from __future__ import annotations

import json
import os

import pytest

from harness.cli import cli_env, run_cli
from orchestrator.coordinator import RetentionConfig, RunLedger
from orchestrator.core.lease import Lease
from orchestrator.core.manifest import (
    BACKUP,
    CHECKPOINTS,
    EVENTS,
    MANIFEST,
    RECORD,
    CheckpointRecord,
    FileEntry,
    ManifestUnreadable,
    read_jsonl,
    read_manifest,
)
from orchestrator.core.storage import Storage, sha256_hex

CFG = RetentionConfig(monitor="val_loss", mode="min", top_k=1, keep_latest=1)
BROKEN = (
    b'{"format": 1, "run": "r", "checkpoints": [ {"id": "epoch0001-step0000010"'  # cut short by an editor
)


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path):
    """(storage, uri, env) of an empty run on a local directory or on moto's S3."""
    if request.param == "local":
        uri = str(tmp_path / "runs" / "r")
        return Storage(uri), uri, cli_env()
    s3_env = request.getfixturevalue("s3_env")
    uri = f"s3://{request.getfixturevalue('bucket')}/runs/r"
    return Storage(uri), uri, cli_env(**s3_env)


def upload(storage, epoch, loss, attempt=1, record=True):
    """What rank 0 does before a commit: the files, then checkpoint.json last."""
    cid = f"epoch{epoch:04d}-step{epoch * 10:07d}-a{attempt}"
    data = f"weights of epoch {epoch}".encode()
    storage.write_bytes(f"{CHECKPOINTS}/{cid}/model.pt", data)
    rec = CheckpointRecord(
        id=cid,
        epoch=epoch,
        step_in_epoch=10,
        global_step=epoch * 10,
        end_of_epoch=True,
        metrics={"val_loss": loss},
        files=[FileEntry(path="model.pt", size=len(data), sha256=sha256_hex(data))],
        world_size=1,
        attempt=attempt,
    )
    if record:
        storage.write_bytes(f"{CHECKPOINTS}/{cid}/{RECORD}", rec.model_dump_json().encode())
    return rec


def trained(storage, losses):
    """A run whose coordinator committed one checkpoint per loss (top_k=1, keep_latest=1)."""
    led = RunLedger(storage, "r", CFG)
    led.start_attempt(1)
    for epoch, loss in enumerate(losses, 1):
        led.commit(upload(storage, epoch, loss))
    return led


def repair(uri, env, *args):
    p = run_cli("repair", uri, *args, env=env, timeout=120)
    return p, (json.loads(p.stdout) if "--json" in args and p.returncode == 0 else None)


def test_the_backup_is_the_manifest_the_coordinator_last_wrote(run):
    storage, _, _ = run
    led = trained(storage, [0.5, 0.9, 0.95])
    assert storage.read_bytes(BACKUP) == storage.read_bytes(MANIFEST)
    assert json.loads(storage.read_bytes(BACKUP))["generation"] == led.manifest.generation


def test_a_manifest_edited_into_invalid_json_is_refused_clearly(run):
    storage, uri, env = run
    trained(storage, [0.5, 0.9])
    storage.write_bytes(MANIFEST, BROKEN)
    with pytest.raises(ManifestUnreadable, match="orchestrator repair"):
        read_manifest(storage)
    for cmd in (["checkpoints"], ["best"], ["export", "--out", os.devnull]):
        p = run_cli(*cmd[:1], uri, *cmd[1:], env=env, timeout=120)
        assert p.returncode == 4, (cmd, p.stderr)
        assert f"{uri}/manifest.json: not a valid manifest" in p.stderr, p.stderr
        assert f"orchestrator repair {uri}" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_repair_restores_the_manifest_and_verifies_its_checkpoints(run):
    storage, uri, env = run
    trained(storage, [0.5, 0.9, 0.95])
    before = read_manifest(storage)
    storage.write_bytes(MANIFEST, BROKEN)

    p, plan = repair(uri, env, "--dry-run", "--json")
    assert p.returncode == 0, p.stderr
    assert (
        plan["action"] == "restore"
        and plan["dry_run"]
        and plan["verified"] == [c.id for c in before.checkpoints]
    )
    assert storage.read_bytes(MANIFEST) == BROKEN  # a dry run writes nothing

    p = run_cli("repair", uri, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "not a valid manifest" in p.stdout and "verified   epoch0001-step0000010-a1" in p.stdout, p.stdout
    assert f"Continue with: orchestrator resume {uri}" in p.stdout
    after = read_manifest(storage)
    assert [c.id for c in after.checkpoints] == [c.id for c in before.checkpoints]
    assert after.kept == before.kept and after.generation == before.generation + 1
    assert storage.read_bytes("manifest.damaged.json") == BROKEN  # what the hand edit left is kept
    assert [e for e in read_jsonl(storage, EVENTS) if e["kind"] == "repaired"][0][
        "backup_generation"
    ] == before.generation
    p = run_cli("checkpoints", uri, "--json", env=env, timeout=120)
    assert p.returncode == 0 and len(json.loads(p.stdout)["checkpoints"]) == 2, p.stderr

    p, again = repair(uri, env, "--json")
    assert p.returncode == 0 and again["action"] == "none", p.stderr  # readable: left alone


def test_a_stale_backup_neither_uncommits_nor_resurrects(run):
    """The backup one generation behind (a crash between the manifest write and its copy):
    a checkpoint retention deleted since is not restored, one committed since is adopted,
    and uploads that were never committed are left to orphan collection."""
    storage, uri, env = run
    led = trained(storage, [0.5, 0.9])  # keeps epoch 1 (best) and 2 (latest)
    stale = storage.read_bytes(BACKUP)
    led.commit(upload(storage, 3, 0.95))  # keeps 1 and 3; 2 is deleted after the manifest is durable
    assert "epoch0002-step0000020-a1" not in storage.list_dirs(CHECKPOINTS)
    storage.write_bytes(BACKUP, stale)
    storage.write_bytes(MANIFEST, b"")  # emptied by hand
    upload(storage, 4, 0.1, record=False)  # an upload cut short: no checkpoint.json
    upload(storage, 9, 0.1, attempt=0)  # complete, but from an attempt before the last one

    p, out = repair(uri, env, "--json")
    assert p.returncode == 0, p.stderr
    assert out["verified"] == ["epoch0001-step0000010-a1"]
    assert [b["id"] for b in out["bad"]] == ["epoch0002-step0000020-a1"]
    assert "missing" in out["bad"][0]["reason"]
    assert out["adopted"] == ["epoch0003-step0000030-a1"]
    assert {x["id"] for x in out["left_out"]} == {"epoch0004-step0000040-a1", "epoch0009-step0000090-a0"}
    m = read_manifest(storage)
    assert [c.id for c in m.checkpoints] == ["epoch0001-step0000010-a1", "epoch0003-step0000030-a1"]
    assert m.kept == {"epoch0001-step0000010-a1": ["best-k"], "epoch0003-step0000030-a1": ["latest"]}
    assert [b.record.id for b in m.bad] == ["epoch0002-step0000020-a1"]
    # The next attempt collects the orphans the repair left, and commits on from the adopted one.
    led = RunLedger(storage, "r", CFG)
    assert led.start_attempt(1)["restore"]["id"] == "epoch0003-step0000030-a1"
    assert set(storage.list_dirs(CHECKPOINTS)) == {"epoch0001-step0000010-a1", "epoch0003-step0000030-a1"}


def test_repair_refuses_a_run_with_a_live_driver(tmp_path):
    storage = Storage(str(tmp_path / "r"))
    trained(storage, [0.5])
    storage.write_bytes(MANIFEST, BROKEN)
    lease = Lease(storage, heartbeat_s=60)
    lease.acquire()  # this test process: a live driver on this host
    try:
        p = run_cli("repair", storage.uri, timeout=120)
    finally:
        lease.release()
    assert p.returncode == 3 and f"pid {os.getpid()}" in p.stderr, p.stderr
    assert storage.read_bytes(MANIFEST) == BROKEN


@pytest.mark.parametrize(
    "setup, code, says",
    [
        ("nothing", 2, "no manifest.json and no manifest.backup.json; is this a run directory?"),
        ("no_backup", 1, "there is no manifest.backup.json to restore it from"),
        ("both_broken", 1, "manifest.backup.json: not a valid manifest"),
        ("newer", 2, "manifest format 99 is newer"),
    ],
)
def test_what_repair_cannot_do_it_says(tmp_path, setup, code, says):
    storage = Storage(str(tmp_path / "r"))
    if setup != "nothing":
        trained(storage, [0.5])
        storage.write_bytes(MANIFEST, b'{"format": 99, "run": "r"}' if setup == "newer" else BROKEN)
    if setup == "no_backup":
        storage.delete(BACKUP)
    if setup == "both_broken":
        storage.write_bytes(BACKUP, BROKEN)
    os.makedirs(storage.uri, exist_ok=True)
    p = run_cli("repair", storage.uri, timeout=120)
    assert p.returncode == code and says in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_resume_refuses_a_damaged_manifest_before_ray_starts(tmp_path):
    from orchestrator.driver import store_spec
    from orchestrator.spec import load_spec

    spec = load_spec("configs/digits.yaml", [f"storage.root={tmp_path}", "name=r"])
    storage = spec.open_run_storage()
    store_spec(storage, spec)
    trained(storage, [0.5])
    storage.write_bytes(MANIFEST, BROKEN)
    p = run_cli("resume", storage.uri, timeout=300)
    assert p.returncode == 4, p.stderr
    assert f"{storage.uri}/manifest.json: not a valid manifest" in p.stderr
    assert f"orchestrator repair {storage.uri}" in p.stderr and "Traceback" not in p.stderr
    assert storage.read_bytes(MANIFEST) == BROKEN

"""End to end (real CLI, real Ray, real files): one byte flipped in the shared copy of the
latest checkpoint's model.pt. A resume served from the node-local tier finds it in the
background and heals the shared copy from the verified local one; with the tier off
(`checkpoint.local_cache: false`) the next resume marks a damaged checkpoint bad and uses the
previous one, which is the healed copy, read from shared storage."""

from __future__ import annotations

import json

import pytest

from harness.cli import cli_env, run_cli
from orchestrator.core.manifest import read_jsonl, read_manifest
from orchestrator.core.storage import Storage
from orchestrator.core.verify import copy_verified

pytestmark = pytest.mark.e2e


def flip_byte(storage: Storage, rel: str) -> None:
    data = bytearray(storage.read_bytes(rel))
    data[len(data) // 2] ^= 0x40
    storage.write_bytes(rel, bytes(data))


def latest_id(storage: Storage) -> str:
    latest = read_manifest(storage).latest()
    assert latest is not None
    return latest.id


def test_a_damaged_shared_copy_is_healed_from_the_tier_or_marked_bad_without_it(tmp_path):
    # A Ray of its own per command (--address local), as in test_e2e_integrity.py: the heal
    # needs rank 0 of the resume on the node whose local disk holds the run's copy, which only
    # a one-node Ray guarantees; on a shared multi-node cluster rank 0 may land on a node
    # without the copy, read shared storage, and (correctly) mark the checkpoint bad instead.
    env, storage = cli_env(), Storage(str(tmp_path / "heal"))
    base = ["--set", "checkpoint.top_k=10", "--json", "--address", "local"]  # every epoch stays kept
    p = run_cli(
        "run",
        "configs/digits.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "name=heal",
        "--set",
        "chaos.kills=[]",
        "--set",
        f"checkpoint.local_cache={tmp_path / 'cache'}",
        "--set",
        "epochs=3",
        *base,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    epoch3 = latest_id(storage)
    flip_byte(storage, f"checkpoints/{epoch3}/model.pt")
    p = run_cli("verify", storage.uri, "--json", env=env)
    assert p.returncode == 1 and json.loads(p.stdout)["damaged"][0]["id"] == epoch3

    p = run_cli("resume", storage.uri, "--set", "epochs=4", *base, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    events = read_jsonl(storage, "events.jsonl")
    assert not [e for e in events if e["kind"] == "verification_failed"]
    found = [e for e in events if e["kind"] in ("shared_copy_damaged", "shared_copy_healed")]
    assert [(e["kind"], e["id"], e["file"]) for e in found] == [
        ("shared_copy_damaged", epoch3, "model.pt"),
        ("shared_copy_healed", epoch3, "model.pt"),
    ]
    assert "sha256" in found[0]["why"]
    m = read_manifest(storage)
    assert m.get(epoch3) is not None and not m.bad  # still kept, never marked bad
    copy_verified(storage, m.get(epoch3), None)  # the shared copy verifies again
    assert run_cli("verify", storage.uri, env=env).returncode == 0
    metrics = read_jsonl(storage, "metrics.jsonl")
    assert [(r["epoch"], r["attempt"]) for r in metrics] == [(1, 1), (2, 1), (3, 1), (4, 2)]

    # The tier off: epoch 4's shared copy damaged is caught on restore, marked bad, and the
    # previous checkpoint (epoch 3, healed above) restored from shared storage.
    epoch4 = latest_id(storage)
    flip_byte(storage, f"checkpoints/{epoch4}/model.pt")
    p = run_cli(
        "resume", storage.uri, "--set", "epochs=5", "--set", "checkpoint.local_cache=false", *base, env=env
    )
    assert p.returncode == 0, p.stderr[-4000:]
    events = read_jsonl(storage, "events.jsonl")
    failed = [e for e in events if e["kind"] == "verification_failed"]
    assert [e["id"] for e in failed] == [epoch4] and "model.pt" in failed[0]["reason"]
    assert len([e for e in events if e["kind"].startswith("shared_copy")]) == 2  # none new
    m = read_manifest(storage)
    assert [b.record.id for b in m.bad] == [epoch4]
    metrics = read_jsonl(storage, "metrics.jsonl")
    assert [(r["epoch"], r["attempt"]) for r in metrics] == [(1, 1), (2, 1), (3, 1), (4, 3), (5, 3)]

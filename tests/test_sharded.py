"""Sharded checkpoints (torch.distributed.checkpoint): every rank writes its own shards, rank 0's
record lists them all, and the coordinator commits only then (workers/sharded.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import pickle

import pytest
import torch
from torch import nn

from harness.cli import jsonl, manifest, run_cli
from orchestrator.coordinator import CommitError, RunLedger
from orchestrator.core.manifest import RECORD, CheckpointRecord, FileEntry
from orchestrator.core.retention import RetentionConfig
from orchestrator.core.storage import Storage
from orchestrator.core.verify import CheckpointRefused
from workers.sharded import apply_state_dict, load_metadata, load_verified, state_dict_of, write_shards
from workers.state import STATE_FILE
from workers.writer import CheckpointWriter

CFG = RetentionConfig("val_loss", "min", top_k=3, keep_latest=1)


def meta(cid: str, epoch: int, world: int = 1) -> dict:
    return {
        "id": cid,
        "epoch": epoch,
        "step_in_epoch": 0,
        "global_step": epoch,
        "end_of_epoch": True,
        "metrics": {"val_loss": 1.0 / epoch},
        "world_size": world,
        "attempt": 1,
        "sharded": True,
    }


def trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    return model, opt


def test_a_changed_shard_fails_verification_and_the_restore_falls_back(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    led = RunLedger(storage, "run", CFG)
    led.start_attempt(1)
    writer = CheckpointWriter(storage, led.commit, async_save=False)
    saved = {}
    for epoch in (1, 2):
        model, opt = trained(epoch)
        cid = f"epoch{epoch:04d}"
        part = write_shards(storage, cid, state_dict_of({"model": model, "optimizer": opt}), rank=0)
        writer.save(meta(cid, epoch), {STATE_FILE: {"epoch": epoch}}, part)
        saved[cid] = {k: v.clone() for k, v in model.state_dict().items()}

    # the record lists DCP's index, this rank's shards and rank 0's train_state.pt, as stored
    latest = led.manifest.latest()
    assert latest.sharded and {f.path for f in latest.files} == {".metadata", "__0_0.distcp", STATE_FILE}
    for f in latest.files:
        data = (tmp_path / "run" / latest.dir / f.path).read_bytes()
        assert (f.size, f.sha256) == (len(data), hashlib.sha256(data).hexdigest())

    # a shard changed in place (same size): the latest fails verification, the one before loads
    shard = tmp_path / "run" / latest.dir / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    model, opt = trained(99)
    sd = state_dict_of({"model": model, "optimizer": opt})
    record, state = load_verified(storage, latest, sd, 0, lambda bad, why: led.next_restore(bad, why))
    apply_state_dict({"model": model, "optimizer": opt}, sd)
    assert record.id == "epoch0001" and torch.load(io.BytesIO(state))["epoch"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved["epoch0001"][k]), k
    assert [b.record.id for b in led.manifest.bad] == ["epoch0002"]
    assert "__0_0.distcp" in led.manifest.bad[0].reason and not (tmp_path / "run" / latest.dir).exists()

    # shards some rank wrote for a checkpoint never committed: never named, collected
    write_shards(storage, "epoch0003", sd, rank=0)
    assert led.manifest.latest().id == "epoch0001"
    assert led.collect_orphans() == ["epoch0003"]
    assert not (tmp_path / "run" / "checkpoints" / "epoch0003").exists()


def test_a_sharded_checkpoint_commits_only_with_every_ranks_part(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    led = RunLedger(storage, "run", CFG)
    led.start_attempt(2)
    entry = lambda path, rank: FileEntry(path=path, size=1, sha256="0" * 64, rank=rank)  # noqa: E731
    record = CheckpointRecord(
        files=[entry(".metadata", 0), entry("__0_0.distcp", 0)], **meta("c1", 1, world=2)
    )
    storage.write_bytes(f"{record.dir}/{RECORD}", record.model_dump_json().encode())
    with pytest.raises(CommitError, match=r"rank\(s\) \[1\]"):
        led.commit(record)
    whole = record.model_copy(update={"files": [*record.files, entry("__1_0.distcp", 1)]})
    for f in whole.files:  # the data (a commit checks every file is there, with its size)
        storage.write_bytes(f"{record.dir}/{f.path}", b"x")
    storage.write_bytes(f"{record.dir}/{RECORD}", whole.model_dump_json().encode())
    led.commit(whole)
    assert led.manifest.latest().id == "c1"


class _Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('ran')",))


def test_dcp_metadata_that_names_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointRefused, match="builtins.exec"):
        load_metadata(pickle.dumps(_Payload()), "checkpoints/x/.metadata")
    assert not (tmp_path / "PWNED").exists()


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(1.0, abs(b))


@pytest.mark.e2e
def test_fsdp_run_killed_mid_save_resumes_2_to_2_then_reshards_2_to_1_and_exports(tmp_path):
    """examples/fsdp: rank 1 is SIGKILLed in the middle of the epoch-2 save; the restarted group
    (2 ranks) loads epoch 1's commit, never the half-written save, which is collected; a resume
    on 1 worker loads the 2 ranks' shards; export consolidates them into one safetensors file."""
    p = run_cli(
        "run", "examples/fsdp/job.yaml", "--set", f"storage.root={tmp_path}", "--address", "local", "--json"
    )
    assert p.returncode == 0, p.stderr[-4000:]
    run_dir = tmp_path / "fsdp-digits"
    events = jsonl(run_dir / "events.jsonl")
    assert [e["kind"] for e in events].count("chaos_kill") == 1
    commits = {e["id"]: e for e in events if e["kind"] == "commit"}
    starts = [e for e in events if e["kind"] == "attempt_started"]
    assert [s["world_size"] for s in starts] == [2, 2] and commits[starts[1]["restore"]]["epoch"] == 1

    # the save the kill interrupted (its shards written by both ranks) was never committed, never
    # loaded, and was collected when the next attempt started
    killed = [e["id"] for e in events if e["kind"] == "delete" and e["why"] == "orphan: never committed"]
    assert len(killed) == 1 and killed[0].startswith("epoch0002-") and killed[0].endswith("-a1")
    assert killed[0] not in commits and not (run_dir / "checkpoints" / killed[0]).exists()
    rows = {r["epoch"]: r for r in jsonl(run_dir / "metrics.jsonl")}
    assert rows[2]["attempt"] == 2 and close(rows[2]["restored_val_loss"], rows[1]["val_loss"]), rows
    for record in manifest(run_dir)["checkpoints"]:  # each lists both ranks' shards
        assert record["sharded"] and {f["rank"] for f in record["files"]} == {0, 1, None}, record

    p = run_cli(
        "resume",
        str(run_dir),
        "--set",
        "epochs=4",
        "--set",
        "scaling.num_workers=1",
        "--set",
        "chaos.kills=[]",
        "--address",
        "local",
        "--json",
    )
    assert p.returncode == 0, p.stderr[-4000:]
    start = [e for e in jsonl(run_dir / "events.jsonl") if e["kind"] == "attempt_started"][-1]
    assert start["world_size"] == 1 and commits[start["restore"]]["epoch"] == 3
    rows = {r["epoch"]: r for r in jsonl(run_dir / "metrics.jsonl")}
    assert rows[4]["attempt"] == 3 and close(rows[4]["restored_val_loss"], rows[3]["val_loss"]), rows

    p = run_cli("export", str(run_dir), "--out", str(tmp_path / "out"), "--json")
    assert p.returncode == 0, p.stderr[-4000:]
    config = json.loads(p.stdout)
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    from safetensors.torch import load_file

    from workers.tasks.digits import datasets

    spec = importlib.util.spec_from_file_location("fsdp_example", "examples/fsdp/train.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.MLP(128)
    model.load_state_dict(load_file(tmp_path / "out" / "model.safetensors"))  # strict: every weight
    val_loss, _ = example.evaluate(model, datasets(0, 0.2)[1])
    assert close(val_loss, config["metrics"]["val_loss"]), (val_loss, config)

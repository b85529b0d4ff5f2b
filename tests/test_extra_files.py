"""A checkpoint's extra files (session.report(..., extra_files=...): a tokenizer, a config).

The pure part (what report() accepts, and its errors) without Ray; then real runs through the
CLI: a train function saves a directory and a file beside its state every epoch, rank 1 is
SIGKILLed, and every rank of the restarted group gets the files back (verified) as a local
directory; they are in each record with sizes and sha256, `best --download` and `export`
carry them, and a damaged or missing one fails verification (locally, and on moto's S3,
where a resume marks the checkpoint bad and uses the previous one)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from harness.cli import cli_env, run_cli
from orchestrator.core.manifest import read_jsonl, read_manifest
from orchestrator.core.storage import Storage
from workers.extras import ExtraFilesError, resolve, snapshot, write_restored

TRAIN = """
import json, os, tempfile
import torch


def _read_all(where):
    out = {}
    for here, _, files in os.walk(where):
        for f in files:
            p = os.path.join(here, f)
            with open(p) as fh:
                out[os.path.relpath(p, where)] = fh.read()
    return out


def train(session):
    ctx = session.context
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    start = 1
    state = session.restore()
    if state is not None:
        model.load_state_dict(state["model"])
        start = state["epoch"] + 1
        seen = {"epoch": state["epoch"], "files": _read_all(state["extra_files"])}
        with open(os.path.join(ctx.options["out"], f"restored-a{ctx.attempt}-r{ctx.rank}.json"), "w") as f:
            json.dump(seen, f)
    work = tempfile.mkdtemp()
    tok, cfg = os.path.join(work, "tok"), os.path.join(work, "cfg.json")
    os.makedirs(os.path.join(tok, "sub"))
    for epoch in range(start, ctx.epochs + 1):
        session.step(epoch, 0, 1, epoch)
        with open(os.path.join(tok, "tokenizer.json"), "w") as f:
            json.dump({"vocab": epoch}, f)
        with open(os.path.join(tok, "sub", "merges.txt"), "w") as f:
            f.write("a b\\n" * epoch)
        with open(cfg, "w") as f:
            json.dump({"epoch": epoch}, f)
        session.report(
            {"val_loss": 1.0 / epoch},
            epoch=epoch,
            state={"model": model.state_dict(), "epoch": epoch},
            extra_files={"tokenizer": tok, "config.json": cfg},
        )
        with open(cfg, "w") as f:  # changed right after: the checkpoint holds what was handed
            f.write("changed after report")
"""

EXTRAS = {"extras/config.json", "extras/tokenizer/tokenizer.json", "extras/tokenizer/sub/merges.txt"}


def files_at(epoch: int) -> dict[str, str]:
    return {
        "config.json": json.dumps({"epoch": epoch}),
        "tokenizer/tokenizer.json": json.dumps({"vocab": epoch}),
        "tokenizer/sub/merges.txt": "a b\n" * epoch,
    }


def write_job(tmp_path: Path, root: str, name: str, kills: str, epochs: int) -> Path:
    (tmp_path / "train_extras.py").write_text(TRAIN)
    (tmp_path / "out").mkdir(exist_ok=True)
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(
        f"name: {name}\n"
        f"storage: {{root: '{root}'}}\n"
        f"task: {{name: '{tmp_path / 'train_extras.py'}:train', options: {{out: '{tmp_path / 'out'}'}}}}\n"
        "scaling: {num_workers: 2}\n"
        "checkpoint: {monitor: val_loss, mode: min, top_k: 10, keep_latest: 1}\n"
        f"epochs: {epochs}\nseed: 0\nchaos: {{kills: {kills}}}\n"
    )
    return spec


# -- what report(extra_files=...) accepts ---------------------------------------------------
def test_a_directory_or_a_mapping_of_files_and_directories(tmp_path):
    (tmp_path / "tok" / "sub").mkdir(parents=True)
    (tmp_path / "tok" / "a.json").write_text("a")
    (tmp_path / "tok" / "sub" / "b.txt").write_text("b")
    (tmp_path / "cfg.json").write_text("{}")
    tok = str(tmp_path / "tok")
    assert resolve(None) == {}
    assert resolve(tok) == {"a.json": f"{tok}/a.json", "sub/b.txt": f"{tok}/sub/b.txt"}
    got = resolve({"tokenizer": tmp_path / "tok", "conf/config.json": str(tmp_path / "cfg.json")})
    assert got == {
        "tokenizer/a.json": f"{tok}/a.json",
        "tokenizer/sub/b.txt": f"{tok}/sub/b.txt",
        "conf/config.json": str(tmp_path / "cfg.json"),
    }
    where, copies = snapshot(got)
    (tmp_path / "cfg.json").write_text("changed")  # the copy keeps what was handed
    assert Path(copies["extras/conf/config.json"]).read_text() == "{}"
    blobs = {p: Path(c).read_bytes() for p, c in copies.items()}
    back = Path(write_restored({**blobs, "model.pt": b"x"}, "ck", 0) or "")
    assert sorted(str(p.relative_to(back)) for p in back.rglob("*") if p.is_file()) == sorted(
        ["tokenizer/a.json", "tokenizer/sub/b.txt", "conf/config.json"]
    )
    assert write_restored({"model.pt": b"x"}, "ck", 0) is None
    with pytest.raises(ExtraFilesError, match="points outside its directory"):
        write_restored({"extras/../../escape": b"y"}, "ck", 0)  # a record someone else wrote


@pytest.mark.parametrize(
    "given, says",
    [
        ("{tmp}/missing", "extra_files '{tmp}/missing': no such directory"),
        ("{tmp}/cfg.json", "extra_files '{tmp}/cfg.json': a file; pass a directory, or {name: path}"),
        (["x"], "extra_files: a directory or a {name: path} mapping, not a list"),
        ({"c.json": "{tmp}/nope.json"}, "extra_files['c.json']: {tmp}/nope.json: no such file or directory"),
        ({"../up": "{tmp}/cfg.json"}, "extra_files: name '../up': a relative path inside the checkpoint"),
        ({"/abs": "{tmp}/cfg.json"}, "extra_files: name '/abs': a relative path inside the checkpoint"),
        ({"": "{tmp}/cfg.json"}, "extra_files: a name must be a non-empty string, not ''"),
        ({"c.json": 3}, "extra_files['c.json']: a path, not a int"),
        ({"t/a.json": "{tmp}/cfg.json", "t": "{tmp}/t"}, "extra_files: 't/a.json' is named twice"),
    ],
)
def test_bad_extra_files_are_refused_naming_the_file(tmp_path, given, says):
    (tmp_path / "cfg.json").write_text("{}")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.json").write_text("a")
    fill = lambda v: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v  # noqa: E731
    if isinstance(given, dict):
        given = {k: fill(v) for k, v in given.items()}
    with pytest.raises(ExtraFilesError) as e:
        resolve(fill(given))
    assert str(e.value).startswith(fill(says)), str(e.value)


# -- real runs ------------------------------------------------------------------------------
def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.e2e
def test_a_dangling_link_or_a_name_under_a_file_is_an_input_error_not_a_crash(tmp_path):
    """Rank 0 turns only ExtraFilesError into a stop every rank hears (exit 2); a bare OSError
    from these two left the other ranks waiting in report()'s broadcast."""
    d = tmp_path / "tok"
    d.mkdir()
    (d / "vocab.txt").write_text("a b")
    (d / "gone.json").symlink_to(tmp_path / "missing.json")
    with pytest.raises(ExtraFilesError, match="gone.json"):
        resolve(str(d))
    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(ExtraFilesError, match="a/b"):
        snapshot({"a": str(f), "a/b": str(f)})


def test_extra_files_are_committed_restored_on_every_rank_downloaded_and_verified(tmp_path):
    spec = write_job(tmp_path, str(tmp_path / "runs"), "extras", "[{rank: 1, epoch: 3}]", epochs=4)
    p = run_cli("run", str(spec), "--address", "local", "--json")
    assert p.returncode == 0, p.stderr[-4000:]
    run = tmp_path / "runs" / "extras"
    m = read_manifest(Storage(str(run)))
    assert m.restarts == 1 and len(m.checkpoints) == 4
    for c in m.checkpoints:  # every extra file is in the record, with its size and sha256
        entries = {f.path: f for f in c.files}
        assert EXTRAS <= set(entries) and c.extra_files == EXTRAS
        for rel in EXTRAS:
            stored = run / "checkpoints" / c.id / rel
            assert (entries[rel].size, entries[rel].sha256) == (stored.stat().st_size, sha(stored))
        assert (run / "checkpoints" / c.id / "extras/config.json").read_text() == json.dumps(
            {"epoch": c.epoch}
        )

    # the restarted group (attempt 2) resumed from the latest commit (epoch 2, or epoch 1 when
    # the kill came before epoch 2's background commit): every rank got that epoch's files as
    # handed to report(), not as changed after it
    started = [e for e in read_jsonl(Storage(str(run)), "events.jsonl") if e["kind"] == "attempt_started"]
    resumed = started[-1]["restore"] or ""
    for rank in (0, 1):
        seen = json.loads((tmp_path / "out" / f"restored-a2-r{rank}.json").read_text())
        assert seen["epoch"] in (1, 2) and f"epoch{seen['epoch']:04d}" in resumed, (seen, resumed)
        assert seen == {"epoch": seen["epoch"], "files": files_at(seen["epoch"])}, seen

    # best --download and export carry them, verified
    dl = tmp_path / "dl"
    p = run_cli("best", str(run), "--download", str(dl), "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["epoch"] == 4 and set(out["downloaded"]) == {"model.pt", *EXTRAS}
    assert (dl / "extras/tokenizer/sub/merges.txt").read_text() == files_at(4)["tokenizer/sub/merges.txt"]
    p = run_cli("export", str(run), "--out", str(tmp_path / "exp"))
    assert p.returncode == 0, p.stderr
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert config["extra_files"] == sorted(EXTRAS)
    assert (tmp_path / "exp" / "extras/config.json").read_text() == json.dumps({"epoch": 4})

    # a damaged extra file fails verification: verify names it, best passes over it
    best = next(c for c in m.checkpoints if c.epoch == 4)
    (run / "checkpoints" / best.id / "extras/tokenizer/tokenizer.json").write_text('{"vocab": 5}')
    p = run_cli("verify", str(run), "--json")
    assert p.returncode == 1, p.stdout
    damaged = json.loads(p.stdout)["damaged"]
    assert [(d["id"], d["file"]) for d in damaged] == [(best.id, "extras/tokenizer/tokenizer.json")], damaged
    p = run_cli("best", str(run), "--download", str(tmp_path / "dl2"), "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["epoch"] == 3, p.stderr
    assert f"{best.id} failed verification" in p.stderr and "extras/tokenizer/tokenizer.json" in p.stderr


@pytest.mark.e2e
def test_a_missing_extra_file_on_s3_fails_verification_and_the_resume_falls_back(
    moto, bucket, s3_env, tmp_path
):
    root = f"s3://{bucket}/runs"
    spec = write_job(tmp_path, root, "s3extras", "[]", epochs=2)
    base = ["--address", "local", "--set", "checkpoint.local_cache=false", "--json"]
    p = run_cli("run", str(spec), *base, env=cli_env(**s3_env))
    assert p.returncode == 0, p.stderr[-4000:]
    storage = Storage(f"{root}/s3extras")
    latest = read_manifest(storage).latest()
    assert latest is not None and latest.epoch == 2 and latest.extra_files == EXTRAS
    storage.delete(f"checkpoints/{latest.id}/extras/config.json")

    p = run_cli("verify", storage.uri, "--json", env=cli_env(**s3_env))
    assert p.returncode == 1 and json.loads(p.stdout)["damaged"][0]["file"] == "extras/config.json", p.stdout
    p = run_cli("resume", storage.uri, "--set", "epochs=3", *base, env=cli_env(**s3_env))
    assert p.returncode == 0, p.stderr[-4000:]
    failed = [e for e in read_jsonl(storage, "events.jsonl") if e["kind"] == "verification_failed"]
    assert [e["id"] for e in failed] == [latest.id] and "extras/config.json: missing" in failed[0]["reason"]
    assert [b.record.id for b in read_manifest(storage).bad] == [latest.id]
    seen = json.loads((tmp_path / "out" / "restored-a2-r0.json").read_text())
    assert seen == {"epoch": 1, "files": files_at(1)}, seen


def test_a_sharded_checkpoints_extra_files_are_recorded_and_checked_with_its_shards(tmp_path):
    """A sharded save (DCP, as report(sharded=...) writes it) with extra files: the record lists
    them beside every rank's shards, and a damaged one fails the sharded restore's verification
    (the coordinator's hash of what no rank reads), which falls back to the previous commit."""
    import torch

    from orchestrator.coordinator import RunLedger
    from orchestrator.core.retention import RetentionConfig
    from workers.sharded import load_verified, state_dict_of, write_shards
    from workers.state import STATE_FILE
    from workers.writer import CheckpointWriter

    storage = Storage(str(tmp_path / "run"))
    led = RunLedger(storage, "run", RetentionConfig("val_loss", "min", top_k=3, keep_latest=1))
    led.start_attempt(1)
    writer = CheckpointWriter(storage, led.commit, async_save=False)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (tmp_path / "cfg.json").write_text("{}")
    for epoch in (1, 2):
        cid = f"epoch{epoch:04d}"
        part = write_shards(storage, cid, state_dict_of({"model": model, "optimizer": opt}), rank=0)
        meta = {
            "id": cid,
            "epoch": epoch,
            "step_in_epoch": 0,
            "global_step": epoch,
            "end_of_epoch": True,
            "metrics": {"val_loss": 1.0 / epoch},
            "world_size": 1,
            "attempt": 1,
            "sharded": True,
        }
        extras = snapshot(resolve({"config.json": tmp_path / "cfg.json"}))
        writer.save(meta, {STATE_FILE: {"epoch": epoch}}, part, extras)
        assert not Path(extras[0]).exists()  # the copies are gone once written
    latest = led.manifest.latest()
    assert latest is not None and latest.extra_files == {"extras/config.json"}
    assert {".metadata", "__0_0.distcp", STATE_FILE, "extras/config.json"} == {f.path for f in latest.files}

    (tmp_path / "run" / latest.dir / "extras/config.json").write_text("[]")  # same size, other bytes
    sd = state_dict_of({"model": model, "optimizer": opt})
    record, _ = load_verified(storage, latest, sd, 0, lambda bad, why: led.next_restore(bad, why))
    assert record is not None and record.id == "epoch0001"
    assert [b.record.id for b in led.manifest.bad] == ["epoch0002"]
    assert "extras/config.json" in led.manifest.bad[0].reason

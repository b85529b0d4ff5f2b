"""The read-side commands on a run written by the real ledger (no Ray needed)."""

from __future__ import annotations

import json
import re

import pytest
from test_ledger import upload

from harness.cli import run_cli
from orchestrator.coordinator import RetentionConfig, RunLedger
from orchestrator.core.manifest import FileEntry
from orchestrator.core.storage import Storage, sha256_hex


@pytest.fixture
def run_dir(tmp_path):
    storage = Storage(str(tmp_path / "r"))
    led = RunLedger(storage, "r", RetentionConfig("val_loss", "min", top_k=1, keep_latest=1))
    led.start_attempt(2)
    for epoch, loss in [(1, 0.9), (2, 0.2), (3, 0.5)]:
        led.commit(upload(storage, epoch, loss))
        led.report_metrics({"epoch": epoch, "val_loss": loss, "attempt": 1})
    return tmp_path / "r"


def test_events_filters_by_kind_and_speaks_json(run_dir):
    p = run_cli("events", str(run_dir), "--json", "--kind", "commit", check=True)
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and {r["kind"] for r in rows} == {"commit"}
    p = run_cli("events", str(run_dir), check=True)
    assert "attempt_started" in p.stdout and "delete" in p.stdout


def test_metrics_and_checkpoints_and_best(run_dir):
    p = run_cli("metrics", str(run_dir), "--json", check=True)
    assert [json.loads(x)["epoch"] for x in p.stdout.splitlines()] == [1, 2, 3]
    p = run_cli("checkpoints", str(run_dir), check=True)
    assert "epoch0002-step0000020" in p.stdout and "best-k" in p.stdout and "latest" in p.stdout
    assert "epoch0001" not in p.stdout
    best = json.loads(run_cli("best", str(run_dir), "--json", check=True).stdout)
    assert best["id"] == "epoch0002-step0000020" and best["value"] == 0.2


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["checkpoints", "{tmp}/nope"], 2, "no manifest.json; is this a run directory"),
        (["best", "{tmp}/nope", "--json"], 2, "no manifest.json"),
        (["events", "{run}", "--storage-option", "endpoint_url"], 2, "expected key=value"),
        (["run", "{tmp}/missing.yaml"], 2, "missing.yaml: cannot read"),
        (["resume", "{tmp}/nope"], 2, "no spec.yaml here"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(run_dir, tmp_path, args, code, message):
    args = [a.format(tmp=tmp_path, run=run_dir) for a in args]
    p = run_cli(*args)
    assert p.returncode == code, p.stdout + p.stderr
    assert message in p.stderr


def test_help_teaches():
    p = run_cli("--help", check=True)
    for cmd in ("run", "resume", "checkpoints", "best", "events", "metrics", "submit", "status", "logs"):
        assert cmd in p.stdout
    p = run_cli("run", "--help", check=True)
    assert "--set" in p.stdout and "--address" in p.stdout


def test_metrics_table_marks_the_best_epoch_and_restarts_and_speaks_csv(tmp_path):
    storage = Storage(str(tmp_path / "r"))
    led = RunLedger(storage, "r", RetentionConfig("val_loss", "min", top_k=1, keep_latest=1))
    for epoch, loss, attempt in [(1, 0.9, 1), (2, 0.2, 1), (3, 0.5, 2)]:
        led.report_metrics({"epoch": epoch, "global_step": 10 * epoch, "attempt": attempt, "val_loss": loss})
    p = run_cli("metrics", str(tmp_path / "r"), check=True)
    lines = p.stdout.splitlines()
    assert lines[0].split()[:3] == ["epoch", "step", "att"] and "val_loss" in lines[0]
    assert [line for line in lines if "<- best val_loss" in line][0].split()[0] == "2"
    assert any("attempt 2 resumed here" in line for line in lines)
    p = run_cli("metrics", str(tmp_path / "r"), "--csv", check=True)
    assert p.stdout.splitlines()[0] == "epoch,global_step,attempt,val_loss"
    assert p.stdout.splitlines()[2] == "2,20,1,0.2"


def test_checkpoints_rank_best_rank_and_runs_under_a_root(run_dir):
    rows = json.loads(run_cli("checkpoints", str(run_dir), "--json", check=True).stdout)["checkpoints"]
    assert {r["id"]: r["rank"] for r in rows} == {"epoch0002-step0000020": 1, "epoch0003-step0000030": 2}
    text = run_cli("checkpoints", str(run_dir), check=True).stdout
    assert "rank" in text.splitlines()[1]
    second = json.loads(run_cli("best", str(run_dir), "--rank", "2", "--json", check=True).stdout)
    assert second["id"] == "epoch0003-step0000030" and second["rank"] == 2
    p = run_cli("best", str(run_dir), "--rank", "3")
    assert p.returncode == 1 and "asked for rank 3" in p.stderr
    listed = json.loads(run_cli("runs", str(run_dir.parent), "--json", check=True).stdout)
    assert [(r["name"], r["status"], r["best"]) for r in listed] == [("r", "running", 0.2)]
    p = run_cli("runs", str(run_dir.parent), check=True)
    assert p.stdout.splitlines()[1].split()[:3] == ["r", "running", "3"]


def test_rough_edges_give_clear_errors(run_dir, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for target in (afile, afile / "below"):
        p = run_cli("best", str(run_dir), "--download", str(target))
        assert p.returncode == 2 and "--download" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = run_cli("events", str(run_dir), "--kind", "comit")
    assert p.returncode == 2 and "--kind comit: unknown" in p.stderr and "commit" in p.stderr
    first = run_cli("events", str(run_dir), check=True).stdout.splitlines()[0]
    assert re.match(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} ", first)  # the date, not only the time
    p = run_cli("--version", check=True)
    assert re.fullmatch(r"orchestrator \d+\.\d+\.\d+\n", p.stdout)
    help_text = " ".join(run_cli("--help", check=True).stdout.split())
    assert "Exit codes: 0 success, 1 the run failed, 2 bad input" in help_text
    assert "5 the Ray cluster or its Jobs API unreachable" in help_text
    assert "130/143 run or resume interrupted by Ctrl-C/SIGTERM" in help_text


def test_best_download_is_weights_only_unless_asked(tmp_path):
    storage = Storage(str(tmp_path / "r"))
    led = RunLedger(storage, "r", RetentionConfig("val_loss", "min", top_k=1, keep_latest=1))
    rec = upload(storage, 1, 0.5)
    storage.write_bytes(f"checkpoints/{rec.id}/train_state.pt", b"state")
    rec = rec.model_copy(
        update={"files": [*rec.files, FileEntry(path="train_state.pt", size=5, sha256=sha256_hex(b"state"))]}
    )
    storage.write_bytes(f"checkpoints/{rec.id}/checkpoint.json", rec.model_dump_json().encode())
    led.commit(rec)
    run_cli("best", str(tmp_path / "r"), "--download", str(tmp_path / "w"), check=True)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["checkpoint.json", "model.pt"]
    run_cli("best", str(tmp_path / "r"), "--download", str(tmp_path / "a"), "--all-files", check=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "checkpoint.json",
        "model.pt",
        "train_state.pt",
    ]


def test_runs_lists_an_unreadable_run_and_events_know_every_kind(run_dir):
    from orchestrator.core.manifest import EVENT_KINDS

    other = run_dir.parent / "newer"
    other.mkdir()
    (other / "manifest.json").write_text('{"format": 99, "run": "newer"}')
    listed = {
        r["name"]: r for r in json.loads(run_cli("runs", str(run_dir.parent), "--json", check=True).stdout)
    }
    assert listed["newer"]["status"] == "unreadable" and "newer" in listed["newer"]["error"]
    assert listed["r"]["status"] == "running"
    p = run_cli("events", str(run_dir), *[a for k in EVENT_KINDS for a in ("--kind", k)])
    assert p.returncode == 0, p.stderr  # tracker_off, stopped, ...: every kind the tool writes

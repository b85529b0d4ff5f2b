"""The read-side commands on a run written by the real ledger (no Ray needed)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from test_ledger import upload

from orchestrator.coordinator import RetentionConfig, RunLedger
from orchestrator.core.storage import Storage


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

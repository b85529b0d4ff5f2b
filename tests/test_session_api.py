"""A hand-written train function on the session API, through the CLI, with a real data
loader (torchdata's StatefulDataLoader, 2 worker processes per rank) and a worker SIGKILLed
in the middle of an epoch."""

from __future__ import annotations

import json

import pytest

from harness.cli import expected_kept, jsonl, manifest, run_cli
from workers.loop import is_train_function

pytestmark = pytest.mark.e2e


def test_train_functions_and_task_builders_are_told_apart():
    def train(session): ...
    def build(options, ctx): ...
    def train_with_default(session, extra=1): ...

    assert is_train_function(train) and is_train_function(train_with_default)
    assert not is_train_function(build)


def test_session_example_survives_a_mid_epoch_kill_and_sees_every_sample_once(tmp_path):
    p = run_cli(
        "run",
        "examples/session_api/job.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--address",
        "local",
        "--json",
    )
    assert p.returncode == 0, p.stderr[-4000:]
    summary = json.loads(p.stdout)
    run_dir = tmp_path / "session-digits"

    # The train function's print() reaches the console, rank 0's only (--json: on stderr), and
    # Ray's own noise does not: the token-auth notice, the raylet's dead-worker paragraph.
    said = [line for line in p.stderr.splitlines() if line.startswith("[rank 0] epoch ")]
    assert said == [f"[rank 0] epoch {e}: 1438 samples seen, 0 twice" for e in (1, 2, 3, 4)], p.stderr[-4000:]
    assert "[rank 1]" not in p.stderr and "RayTrainWorker pid=" not in p.stderr
    assert "Token authentication" not in p.stderr and "A worker died or was killed" not in p.stderr
    events = jsonl(run_dir / "events.jsonl")
    assert [e["kind"] for e in events].count("chaos_kill") == 1 and summary["restarts"] == 1
    # the restart names its cause, as the console's restart line does
    kill = next(e for e in events if e["kind"] == "chaos_kill")
    cause = next(e["cause"] for e in events if e["kind"] == "restart")
    assert cause == f"rank 1 (pid {kill['pid']}) SIGKILLed by chaos.kills at epoch 2 step 13", cause

    # the restarted group resumed from a commit in the middle of epoch 2
    resumed_from = [e for e in events if e["kind"] == "attempt_started"][-1]["restore"]
    commit = next(e for e in events if e["kind"] == "commit" and e["id"] == resumed_from)
    epoch_rows = [r for r in jsonl(run_dir / "metrics.jsonl") if "samples_seen" in r]
    end_of_2 = next(r["global_step"] for r in epoch_rows if r["epoch"] == 2)
    assert commit["epoch"] == 2 and commit["global_step"] < end_of_2, commit
    assert [r["epoch"] for r in epoch_rows] == [1, 2, 3, 4]
    for r in epoch_rows:  # the killed epoch too: nothing skipped, nothing twice
        assert r["samples_seen"] == r["samples_expected"] and r["duplicate_samples"] == 0, r

    kept = {c["epoch"] for c in manifest(run_dir)["checkpoints"]}
    assert kept == expected_kept(epoch_rows, "val_loss", "min", top_k=2)
    best = min(epoch_rows, key=lambda r: r["val_loss"])
    assert summary["best"]["epoch"] == best["epoch"] and summary["best"]["value"] == best["val_loss"]


@pytest.mark.parametrize("stop_on_nan", [False, True])
def test_mid_epoch_saves_without_new_metrics_stay_out_of_best_stop_and_rows(tmp_path, stop_on_nan):
    """The example's mid-epoch reports carry no new metrics: before the first evaluation a NaN
    placeholder, then the last epoch's values. They are not fresh (retention.metrics_fresh), so
    checkpoint.stop_on_nan does not stop at the placeholder, no mid-epoch checkpoint competes
    for best-k, and the console shows each epoch's metrics once, under that epoch."""
    p = run_cli(
        "run",
        "examples/session_api/job.yaml",
        *("--set", f"storage.root={tmp_path}", "--set", "epochs=2", "--set", "chaos.kills=[]"),
        *("--set", "scaling.num_workers=1", "--set", "task.options.num_workers=0"),
        *("--set", f"checkpoint.stop_on_nan={str(stop_on_nan).lower()}", "--address", "local"),
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    run_dir = tmp_path / "session-digits"
    rows = jsonl(run_dir / "metrics.jsonl")
    assert [(r["epoch"], "samples_seen" in r) for r in rows] == [(1, True), (2, True)], rows
    lines = [line for line in p.stdout.splitlines() if line.startswith("[run] epoch ")]
    assert [line.split("  ")[0] for line in lines] == ["[run] epoch 1/2", "[run] epoch 2/2"], lines
    for line, row in zip(lines, rows, strict=True):
        assert f"val_loss {row['val_loss']:.4f}" in line, (line, row)

    commits = [e for e in jsonl(run_dir / "events.jsonl") if e["kind"] == "commit"]
    mid = [c for c in commits if c["global_step"] not in {r["global_step"] for r in rows}]
    assert len(mid) >= 4 and not [c for c in mid if "best-k" in c["kept"]], mid

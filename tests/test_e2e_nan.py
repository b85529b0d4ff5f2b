"""A run whose validation loss turns NaN at epoch 3, end to end through the CLI: every
stored format reads back, best is a finite epoch, and with checkpoint.stop_on_nan the
run stops at once with a message naming the epoch and the metric."""

from __future__ import annotations

import json
import math

import pytest

from harness.cli import ROOT, run_cli

pytestmark = pytest.mark.e2e

NAN_TASK = """
import dataclasses
from workers.tasks.digits import build as digits
from workers.task import classification_eval

def build(options, ctx):
    task = digits(options, ctx)
    evals = {"n": 0}

    def eval_step(model, batch):
        out = classification_eval(model, batch)
        # One call before training checks the metric names; then after FINITE_EPOCHS epochs.
        if evals["n"] >= 1 + evals_per_epoch(task, ctx) * FINITE_EPOCHS:
            out["val_loss"] = float("nan")
        evals["n"] += 1
        return out

    return dataclasses.replace(task, eval_step=eval_step)

def evals_per_epoch(task, ctx):
    n = len(range(ctx.rank, len(task.val_data), ctx.world_size))
    return -(-n // task.batch_size)
"""


def _run(tmp_path, name, *extra, finite_epochs=2):
    """A run of 4 epochs (unless extra says otherwise) whose val_loss is NaN after
    finite_epochs epochs."""
    task = tmp_path / "nantask.py"
    task.write_text(NAN_TASK.replace("FINITE_EPOCHS", str(finite_epochs)))
    return run_cli(
        "run",
        "configs/digits.yaml",
        "--json",
        "--address",
        "local",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        f"name={name}",
        "--set",
        "chaos.kills=[]",
        "--set",
        "scaling.num_workers=1",
        "--set",
        "epochs=4",
        "--set",
        f"task.name={task}:build",
        *extra,
        timeout=400,
    )


def test_a_nan_epoch_leaves_a_readable_run_whose_best_is_finite(tmp_path):
    p = _run(tmp_path, "nanrun")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run_uri = str(tmp_path / "nanrun")
    rows = [json.loads(line) for line in run_cli("metrics", run_uri, "--json").stdout.splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [math.isnan(r["val_loss"]) for r in rows] == [False, False, True, True]
    ck = run_cli("checkpoints", run_uri, "--json")
    assert ck.returncode == 0, ck.stderr
    best = run_cli("best", run_uri, "--json")
    assert best.returncode == 0, best.stderr
    b = json.loads(best.stdout)
    assert b["epoch"] in (1, 2) and math.isfinite(b["value"])
    assert run_cli("events", run_uri, "--json").returncode == 0
    summary = json.loads(p.stdout)
    assert summary["best"]["epoch"] == b["epoch"]
    assert "stop_on_nan" not in p.stderr, p.stderr[-3000:]  # some val_loss was a number: no warning


def test_a_run_whose_monitor_is_nan_in_every_epoch_ends_with_a_warning_naming_stop_on_nan(tmp_path):
    p = _run(tmp_path, "allnan", "--set", "epochs=2", finite_epochs=0)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[run] warning: every val_loss this run reported (2 value(s)) was NaN" in p.stderr, p.stderr[
        -3000:
    ]
    assert "set checkpoint.stop_on_nan: true" in p.stderr, p.stderr[-3000:]
    assert json.loads(p.stdout)["best"] is None


def test_stop_on_nan_stops_the_run_naming_epoch_and_metric(tmp_path):
    p = _run(tmp_path, "nanstop", "--set", "checkpoint.stop_on_nan=true")
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert "epoch 3: val_loss not finite (stop_on_nan)" in p.stderr
    ck = json.loads(run_cli("checkpoints", str(tmp_path / "nanstop"), "--json").stdout)
    assert sorted(r["epoch"] for r in ck["checkpoints"]) == [1, 2]  # every commit intact, no NaN one


def test_a_monitor_the_task_does_not_report_fails_once_before_training(tmp_path):
    args = [
        "run",
        "configs/digits.yaml",
        "--address",
        "local",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "name=badmon",
        "--set",
        "chaos.kills=[]",
        "--set",
        "scaling.num_workers=1",
        "--set",
        "checkpoint.monitor=val_f1",
        "--set",
        "failure.max_failures=3",
    ]
    # The driver builds the task before Ray starts: refused there, nothing stored.
    p = run_cli(*args, timeout=400)
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert "checkpoint.monitor 'val_f1'" in p.stderr and "val_acc" in p.stderr and "val_loss" in p.stderr
    assert "[run] badmon:" not in p.stdout and not (tmp_path / "badmon" / "events.jsonl").exists()
    # A task the driver cannot build (its data only on the workers): the workers check it.
    p = run_cli(*args, "--set", f"task.name={ROOT}/tests/tasks/worker_only.py:build", timeout=400)
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert "checkpoint.monitor 'val_f1'" in p.stderr and "val_acc" in p.stderr and "val_loss" in p.stderr
    events = [json.loads(line) for line in (tmp_path / "badmon" / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["kind"] == "restart"], "retried a spec error"
    assert [e["attempt"] for e in events if e["kind"] == "attempt_started"] == [1]
    assert not (tmp_path / "badmon" / "metrics.jsonl").exists(), "trained an epoch first"

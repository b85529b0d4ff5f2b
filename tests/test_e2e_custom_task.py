"""Bring-your-own training code: a task in a file outside the package, through the CLI,
stopped early on its own metric with the best checkpoint left intact."""

from __future__ import annotations

import json

import pytest
import torch

from harness.cli import jsonl, run_cli
from orchestrator.core.manifest import CheckpointRecord, read_manifest
from orchestrator.core.storage import Storage
from orchestrator.core.verify import read_verified

pytestmark = pytest.mark.e2e


def test_custom_task_from_a_file_runs_and_stops_early(tmp_path):
    # min_delta so large that nothing after epoch 1 counts as improvement: with patience 2
    # every rank must stop together after epoch 3 of 30.
    p = run_cli(
        "run",
        "examples/custom_task/job.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "early_stopping={patience: 2, min_delta: 1000}",
        "--set",
        "epochs=30",
        "--address",
        "local",
        "--json",
    )
    assert p.returncode == 0, p.stderr[-4000:]
    summary = json.loads(p.stdout)
    run_dir = tmp_path / "regression"
    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in metrics] == [1, 2, 3]
    assert {"val_mse", "val_mae", "train_loss"} <= set(metrics[0])
    stops = [e for e in jsonl(run_dir / "events.jsonl") if e["kind"] == "early_stop"]
    assert len(stops) == 1 and stops[0]["epoch"] == 3

    # The best by the task's own metric is kept, whole, and loads without this package.
    best_row = min(metrics, key=lambda r: r["val_mse"])
    assert summary["best"]["monitor"] == "val_mse" and summary["best"]["epoch"] == best_row["epoch"]
    storage = Storage(str(run_dir))
    rec = next(c for c in read_manifest(storage).checkpoints if c.id == summary["best"]["id"])
    blobs = read_verified(storage, CheckpointRecord.model_validate(rec.model_dump()))
    (tmp_path / "m.pt").write_bytes(blobs["model.pt"])
    weights = torch.load(tmp_path / "m.pt", weights_only=True)
    assert weights["0.weight"].shape == (64, 4)

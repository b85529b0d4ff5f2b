"""The example regression task with one corrupt training sample: the step whose batch holds
it raises, at the same epoch and step in every attempt (a deterministic user error)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from orchestrator.core.tasks import resolve_task
from workers.task import Task, TaskContext

build_regression = resolve_task(f"{Path(__file__).parents[2]}/examples/custom_task/regression.py:build")

POISON = 123  # index into the training split


def build(options: dict[str, Any], ctx: TaskContext) -> Task:
    task = build_regression(options, ctx)
    poison = task.train_data.tensors[0][POISON].clone()
    plain_step = task.train_step

    def train_step(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, _ = batch
        if (x == poison).all(dim=1).any():
            raise ValueError(f"training sample {POISON} is corrupt")
        return plain_step(model, batch)

    task.train_step = train_step
    return task

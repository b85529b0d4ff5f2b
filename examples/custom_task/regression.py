"""A task defined outside the package: an MLP regressing y = sin(3 x0) + x1 * x2 - x3^2.

Run it with:
    orchestrator run examples/custom_task/job.yaml

The data is synthetic and seeded, so every rank builds the same dataset. The loop
does everything else: DDP, data order, checkpoints, exact resume, early stopping.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from workers.task import Task, TaskContext


def make_data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.sin(3 * x[:, 0]) + x[:, 1] * x[:, 2] - x[:, 3] ** 2
    return x, y + 0.05 * torch.randn(n, generator=g)


def train_step(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x).squeeze(-1), y)


def eval_step(model: nn.Module, batch: Any) -> dict[str, float]:
    x, y = batch
    err = model(x).squeeze(-1) - y
    return {"val_mse": float((err**2).sum()), "val_mae": float(err.abs().sum()), "count": float(len(y))}


def build(options: dict[str, Any], ctx: TaskContext) -> Task:
    hidden = int(options.get("hidden", 64))
    x, y = make_data(ctx.seed, int(options.get("samples", 4000)))
    n_val = len(y) // 5
    model = nn.Sequential(
        nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)
    )
    return Task(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=float(options.get("lr", 3e-3))),
        train_data=TensorDataset(x[n_val:], y[n_val:]),
        val_data=TensorDataset(x[:n_val], y[:n_val]),
        batch_size=int(options.get("batch_size", 64)),
        train_step=train_step,
        eval_step=eval_step,
    )

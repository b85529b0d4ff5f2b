"""The digits CNN with a grad scaler, for failure.mode replicas (tests/test_replicas.py): each
train_step appends to `step_log`/rank<R>.log the process id, the sample indices of its
batch (which name the step), the scaler's scale and one draw from the torch stream, so the
test can tell that a healed replica got the peer's scaler and kept its own RNG streams.

Options: step_log (a directory), batch_size (8), sleep_s (0: a pause per step, so a
replacement has time to join before the run ends)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from workers.task import Task, TaskContext
from workers.tasks.digits import DigitsCNN, datasets


def build(options: dict[str, Any], ctx: TaskContext) -> Task:
    train, val = datasets(ctx.seed, 0.2)
    x, y = train.tensors
    model = DigitsCNN(16, 64, 0.25)
    # Grows every 5 steps, so a replica that did not get the peer's scale would differ.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=5)
    path = os.path.join(options["step_log"], f"rank{ctx.rank}.log")
    sleep_s = float(options.get("sleep_s", 0.0))

    def step(model: nn.Module, batch: Any) -> torch.Tensor:
        images, labels, index = batch
        row = {"pid": os.getpid(), "index": index.tolist(), "scale": scaler.get_scale()}
        row["draw"] = torch.rand(1).item()  # the step's first draw from this rank's torch stream
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        time.sleep(sleep_s)
        return nn.functional.cross_entropy(model(images), labels)

    return Task(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        train_data=TensorDataset(x, y, torch.arange(len(y))),
        val_data=val,
        train_step=step,
        batch_size=int(options.get("batch_size", 8)),
        grad_scaler=scaler,
    )

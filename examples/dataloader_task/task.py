"""A task builder whose data comes through real DataLoaders, on the built-in loop.

    orchestrator run examples/dataloader_task/job.yaml       # the builder, group restarts
    orchestrator run examples/dataloader_task/replicas.yaml  # train(), failure.mode replicas

The loop takes a `torch.utils.data.DataLoader` as `Task.train_data` / `Task.val_data` as it
is: its sampler, worker processes and collate. Here it is torchdata's `StatefulDataLoader`
with 2 worker processes per rank, sharded by a `DistributedSampler` (required on several
ranks). The loop calls the sampler's `set_epoch(epoch)` each epoch and, in every mid-epoch
checkpoint, keeps each rank's `loader.state_dict()`, so a rank killed mid-epoch resumes at
the next batch without rereading the epoch: every sample is trained on once per epoch.

Option `sample_log` (optional, a directory): each rank appends the indices of every batch it
trains on to `rank<R>.log` there, one line per step with its process id, and its loader's
worker processes append every sample they read to `reads<R>.log`, with the id of the
training process that owns them. The test reads both to show that the resumed epoch saw
every sample exactly once, and that the restarted loader did not read the epoch's head again.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from workers.task import Task, TaskContext
from workers.tasks.digits import DigitsCNN, datasets


class Indexed(Dataset):
    """(image, label, index); with a read log, each read is appended to it (from the loader's
    worker processes), with the id of the training process that built the dataset."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, read_log: str | None) -> None:
        self.x, self.y, self.read_log, self.owner = x, y, read_log, os.getpid()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self.read_log:
            with open(self.read_log, "a") as f:
                f.write(f"{self.owner} {i}\n")
        return self.x[i], self.y[i], i


def build(options: dict[str, Any], ctx: TaskContext) -> Task:
    batch_size, workers = int(options.get("batch_size", 32)), int(options.get("num_workers", 2))
    train, val = datasets(ctx.seed, 0.2)
    log = options.get("sample_log")
    x, y = train.tensors
    indexed = Indexed(x, y, os.path.join(log, f"reads{ctx.rank}.log") if log else None)

    def loader(data: Any, shuffle: bool) -> StatefulDataLoader:
        sampler: DistributedSampler[Any] = DistributedSampler(
            data, ctx.world_size, ctx.rank, shuffle=shuffle, seed=ctx.seed, drop_last=shuffle
        )
        return StatefulDataLoader(
            data, batch_size=batch_size, sampler=sampler, num_workers=workers, persistent_workers=False
        )

    path = os.path.join(log, f"rank{ctx.rank}.log") if log else None

    def step(model: nn.Module, batch: Any) -> torch.Tensor:
        images, labels, index = batch
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "index": index.tolist()}) + "\n")
        return nn.functional.cross_entropy(model(images), labels)

    model = DigitsCNN(16, 64, 0.25)
    return Task(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=float(options.get("lr", 0.05)), momentum=0.9),
        train_data=loader(indexed, shuffle=True),
        val_data=loader(val, shuffle=False),
        train_step=step,
    )


def train(session: Any) -> dict[str, Any]:
    """The same task from a train function, as failure.mode replicas runs one
    (examples/dataloader_task/replicas.yaml): the function builds the task from the session's
    context and hands it to `session.fit`, which trains it on the built-in loop (there, the
    one that can move a healed replica to a live peer's place in its loader) and returns its
    result. The same function runs in failure.mode restart too."""
    ctx = session.context
    task = build(ctx.options, TaskContext(ctx.rank, ctx.world_size, ctx.seed, ctx.device))
    result = session.fit(task)
    print(f"rank {ctx.rank}: trained to global step {result['global_step']}")
    return result

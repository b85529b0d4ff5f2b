"""What an epoch measures: the held-out metrics, the running training loss, early stopping."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from workers.data import shard
from workers.distributed import all_reduce_sum
from workers.task import Task, collate, first_val_batch, is_loader, to_device


def evaluate(
    task: Task, model: torch.nn.Module, device: torch.device, world: int = 1, rank: int = 0
) -> dict[str, float]:
    """Metrics on the held-out split: each rank sums its shard, sums are reduced, then averaged."""
    model.eval()
    if is_loader(task.val_data):  # its sampler shards it (a DistributedSampler pads the last batch)
        batches: Iterable[Any] = (to_device(b, device) for b in task.val_data)
    else:
        idx = shard(len(task.val_data), world, rank)
        batches = (
            collate(task.val_data, idx[i : i + task.batch_size], device)
            for i in range(0, len(idx), task.batch_size)
        )
    sums: dict[str, float] = {}
    with torch.no_grad():
        for batch in batches:
            for k, v in task.eval_step(model, batch).items():
                sums[k] = sums.get(k, 0.0) + float(v)
    keys = sorted(sums)
    totals = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], device), strict=True))
    count = totals.pop("count")
    return {k: v / count for k, v in totals.items()}


def metric_names(task: Task, model: torch.nn.Module, device: torch.device) -> set[str]:
    """The metrics an epoch will report, from one validation batch, before any training:
    a monitor that names none of them is a spec error, found in seconds, not after an epoch.
    The RNG streams are put back, so the check changes nothing that exact resume sees."""
    from workers.rng import capture_rng, restore_rng

    rng = capture_rng()
    model.eval()
    with torch.no_grad():
        names = set(task.eval_step(model, first_val_batch(task, device))) - {"count"}
    restore_rng(rng)
    return names | {"train_loss"}


class RunningLoss:
    """This rank's sum of step losses in the epoch, kept on the device: reading each loss
    with float() would make every step wait for the GPU."""

    def __init__(self, device: torch.device, state: dict[str, float] | None = None) -> None:
        self.device = device
        self.sum = torch.tensor((state or {}).get("loss_sum", 0.0), dtype=torch.float64, device=device)
        self.steps = int((state or {}).get("steps", 0))

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss.detach()
        self.steps += 1

    def state(self) -> dict[str, float]:
        return {"loss_sum": float(self.sum), "steps": self.steps}

    def mean_over_ranks(self) -> float:
        loss_sum, steps = all_reduce_sum(list(self.state().values()), self.device)
        return loss_sum / max(steps, 1)


class EarlyStopping:
    """Stop when `monitor` has not improved by min_delta for `patience` epochs.

    Every rank sees the same all-reduced metric, so every rank decides the same
    without another collective."""

    def __init__(self, mode: str, patience: int, min_delta: float, state: dict[str, Any] | None = None):
        self.mode, self.patience, self.min_delta = mode, patience, min_delta
        self.best: float | None = (state or {}).get("best")
        self.bad_epochs: int = (state or {}).get("bad_epochs", 0)

    @classmethod
    def configured(
        cls, mode: str, settings: tuple[int, float] | None, state: dict[str, Any] | None
    ) -> EarlyStopping | None:
        """From the spec's early_stopping (patience, min_delta); None when it is off."""
        return cls(mode, *settings, state) if settings else None

    def update(self, value: float) -> bool:
        improved = not math.isnan(value) and (
            self.best is None
            or (
                value < self.best - self.min_delta
                if self.mode == "min"
                else value > self.best + self.min_delta
            )
        )
        if improved:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

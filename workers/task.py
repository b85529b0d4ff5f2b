"""The worker API: what a task gives the training loop.

A task is a function `build(options: dict, ctx: TaskContext) -> Task`, named in the
spec as a built-in (`digits`), `package.module:function` or `path/to/file.py:function`.
The loop owns distribution, data order, checkpointing and resume; the task owns the
model, the data and what one step computes. See docs/worker-api.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

if TYPE_CHECKING:  # annotations only: typing has TypeIs from 3.13
    from typing_extensions import TypeIs


@dataclass(frozen=True)
class TaskContext:
    rank: int
    world_size: int
    seed: int
    device: torch.device


Batch = Any


class Dataset(Protocol):
    """What the loop needs of a dataset: a length and samples by index (TensorDataset fits)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def classification_step(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Default train step: (inputs, labels) -> mean cross-entropy."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def classification_eval(model: nn.Module, batch: Batch) -> dict[str, float]:
    """Default eval step: sums over the batch; the loop divides by `count` after reducing."""
    x, y = batch
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y, reduction="sum")
    return {
        "val_loss": float(loss),
        "val_acc": float((logits.argmax(dim=1) == y).sum()),
        "count": float(len(y)),
    }


# The names train_state.pt and a replica's heal already use (workers/state.py,
# workers/replica_state.py).
RESERVED = frozenset(
    {
        "model",
        "optimizer",
        "scheduler",
        "grad_scaler",
        "ranks",
        "progress",
        "data_seed",
        "early_stopping",
        "last_metrics",
        "live",
        "replica",
    }
)


@dataclass
class Task:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    # Either an indexable dataset (data[i] -> a sample; the loop deals the order itself,
    # batch_size per rank) or a torch DataLoader the task built: its sampler, worker processes
    # and collate_fn are used as they are. A DataLoader on several ranks needs a
    # DistributedSampler; torchdata's StatefulDataLoader resumes mid-epoch without rereading.
    train_data: Dataset | DataLoader
    val_data: Dataset | DataLoader
    batch_size: int = 32  # per rank; a DataLoader's own batch_size wins
    train_step: Callable[[nn.Module, Batch], torch.Tensor] = classification_step
    # Returns sums over the batch plus "count"; each metric is reported as sum / count.
    eval_step: Callable[[nn.Module, Batch], dict[str, float]] = classification_eval
    scheduler: Any | None = None  # an LR scheduler, stepped once per epoch
    grad_scaler: Any | None = None  # torch.amp.GradScaler for mixed precision
    # More state to checkpoint, by name: anything with state_dict() and load_state_dict() (EMA
    # weights, a custom counter). Saved, restored and handed to a healing replica with the rest.
    state: dict[str, Any] = field(default_factory=dict)
    # For the export's config.json (Hugging Face's habit), so a server rebuilds the model without
    # this package: the keyword arguments the model's class was built with (model_class(**args)),
    # and in words what the task does to a raw input before the model sees it.
    model_args: dict[str, Any] = field(default_factory=dict)
    preprocessing: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"Task.batch_size must be >= 1, got {self.batch_size}")
        for name, part in self.state.items():
            if not isinstance(name, str) or not name.isidentifier() or name in RESERVED:
                raise ValueError(
                    f"Task.state: {name!r} cannot name a part (an identifier other than "
                    f"{', '.join(sorted(RESERVED))})"
                )
            if not all(callable(getattr(part, m, None)) for m in ("state_dict", "load_state_dict")):
                raise ValueError(
                    f"Task.state[{name!r}]: a {type(part).__name__} has no state_dict() and "
                    "load_state_dict(); wrap it in an object that has both"
                )
        for name in ("train_data", "val_data"):
            data = getattr(self, name)
            try:
                n = len(data)
            except TypeError:  # an IterableDataset, or a DataLoader over one
                raise ValueError(
                    f"Task.{name}: {type(data).__name__} has no length; the loop needs the number "
                    "of batches per epoch (an indexable dataset, or a DataLoader over one)"
                ) from None
            if n == 0:
                raise ValueError(f"Task.{name} is empty")


@dataclass
class Servable:
    """What a train function's `serving_model(options)` gives export and serving: the model as
    training builds it, and one input batch to trace it on (its first dimension the batch)."""

    model: nn.Module
    example: Any
    model_args: dict[str, Any] = field(default_factory=dict)  # as Task's, for config.json
    preprocessing: str | None = None


def example_input(built: Task | Servable, device: torch.device) -> Any:
    """The input export traces the model on: a Servable's example, or the inputs of a task's
    first validation batch."""
    if isinstance(built, Servable):
        return built.example
    batch = first_val_batch(built, device)
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def is_loader(data: Any) -> TypeIs[DataLoader[Any]]:
    return isinstance(data, DataLoader)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """A DataLoader's batch (tensors in tuples, lists and dicts) on the device."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def sampler_of(loader: DataLoader[Any]) -> Any:
    """The sampler that orders a loader's samples (inside a batch_sampler when one is given)."""
    return getattr(loader.batch_sampler, "sampler", None) or loader.sampler


def check_train_loader(data: Any, world_size: int) -> None:
    """Refuse, naming the fix, a training DataLoader that would not train on every sample once
    per epoch: one without a DistributedSampler on several ranks (every rank would train on
    every sample), and a plain one that shuffles with a RandomSampler (its order is drawn from
    the global RNG each time it is iterated, so a mid-epoch resume, which rereads the epoch's
    head, would see another order). torchdata's StatefulDataLoader keeps its sampler's state."""
    if not is_loader(data):
        return
    sampler = sampler_of(data)
    if world_size > 1 and not isinstance(sampler, DistributedSampler):
        raise ValueError(
            f"Task.train_data: a DataLoader on {world_size} ranks needs a DistributedSampler (got "
            f"{type(sampler).__name__}); every rank would train on every sample. Build it with "
            "sampler=DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, seed=ctx.seed)"
        )
    if isinstance(sampler, RandomSampler) and not hasattr(data, "load_state_dict"):
        raise ValueError(
            "Task.train_data: a DataLoader with shuffle=True (a RandomSampler) draws its order anew "
            "each time it is read, so a resume in the middle of an epoch would not continue that "
            "epoch's order. Use torchdata's StatefulDataLoader (same arguments), or "
            "sampler=DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, seed=ctx.seed)"
        )


def collate(data: Dataset, indices: Sequence[int], device: torch.device) -> Batch:
    tensors = getattr(data, "tensors", None)
    if tensors is not None:  # TensorDataset: one gather per tensor instead of per sample
        idx = torch.as_tensor(indices)
        return tuple(t[idx].to(device) for t in tensors)
    items = torch.utils.data.default_collate([data[i] for i in indices])
    if isinstance(items, (list, tuple)):
        return type(items)(t.to(device) if torch.is_tensor(t) else t for t in items)
    return items.to(device) if torch.is_tensor(items) else items


def first_val_batch(task: Task, device: torch.device) -> Batch:
    """The first validation batch: what the loop checks metric names on, what export traces with."""
    if is_loader(task.val_data):
        return to_device(next(iter(task.val_data)), device)
    return collate(task.val_data, list(range(min(task.batch_size, len(task.val_data)))), device)

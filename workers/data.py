"""Data order: a pure function of (seed, epoch, world size), so resume is exact.

An indexable dataset: each epoch is one permutation of it, padded to a multiple of the
world size the way torch's DistributedSampler pads, and dealt round-robin to ranks.
Resuming mid-epoch skips the first `step` batches by index: nothing is loaded.

A DataLoader the task built: its sampler's set_epoch(epoch) fixes the order. Resuming
mid-epoch, a loader with load_state_dict (torchdata's StatefulDataLoader) is put back
where the checkpoint's copy of its state_dict() left it, worker processes included; any
other loader is read from the epoch's start and its first `step` batches dropped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch

from workers.task import Batch, Task, collate, is_loader, sampler_of, to_device

log = logging.getLogger(__name__)


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=g).tolist()


def rank_batches(
    n: int, batch_size: int, seed: int, epoch: int, world_size: int, rank: int
) -> list[list[int]]:
    """The index batches rank trains on in epoch; every rank gets the same count."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    perm = epoch_permutation(n, seed, epoch)
    per_rank = math.ceil(n / world_size)
    total = per_rank * world_size
    perm += perm[: total - n]
    mine = perm[rank:total:world_size]
    return [mine[i : i + batch_size] for i in range(0, per_rank, batch_size)]


def shard(n: int, world_size: int, rank: int) -> list[int]:
    """Evaluation shard: every index exactly once across ranks, no padding."""
    return list(range(rank, n, world_size))


def train_batches(
    task: Task,
    seed: int,
    epoch: int,
    world_size: int,
    rank: int,
    device: torch.device,
    first: int = 0,
    loader_state: Any = None,
) -> tuple[int, Iterator[tuple[int, Batch]]]:
    """This rank's number of steps in epoch, and (step, batch) for steps first, first + 1, ..."""
    data = task.train_data
    if is_loader(data):
        return len(data), _loader_batches(data, epoch, rank, device, first, loader_state)
    batches = rank_batches(len(data), task.batch_size, seed, epoch, world_size, rank)
    return len(batches), ((step, collate(data, batches[step], device)) for step in range(first, len(batches)))


def _loader_batches(
    data: Any, epoch: int, rank: int, device: torch.device, first: int, loader_state: Any
) -> Iterator[tuple[int, Batch]]:
    sampler = sampler_of(data)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    skip = first
    if first and loader_state is not None and hasattr(data, "load_state_dict"):
        data.load_state_dict(loader_state)  # the next batch it yields is step `first`
        skip = 0
    elif first and rank == 0:
        why = f"{type(data).__name__} keeps no position (torchdata's StatefulDataLoader does)"
        if hasattr(data, "load_state_dict"):
            why = "its saved position was for another world size"
        log.info(
            f"[data] resuming epoch {epoch} at step {first}: {why}, so the epoch's first {first} "
            "batches are read and dropped"
        )
    for i, batch in enumerate(data):
        if i >= skip:
            yield first + i - skip, to_device(batch, device)

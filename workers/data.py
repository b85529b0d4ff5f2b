"""Data order: a pure function of (seed, epoch, world size), so resume is exact.

Each epoch is one permutation of the dataset, padded to a multiple of the world
size the way torch's DistributedSampler pads, and dealt round-robin to ranks.
Resuming mid-epoch skips the first `step` batches by index: nothing is loaded.
"""

from __future__ import annotations

import math

import torch


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

"""failure.mode replicas: each rank's random streams, a pure function of (seed, rank, global step).

Why not the streams a rank carries along, as a group restart does: a replica group's streams
live in its process alone. When it dies they are gone (a peer holds only its own, and
handing the peer's on would make two ranks draw the same dropout masks and augmentations),
and rank 0 cannot gather the others' for a checkpoint without a collective that a dead
replica breaks. So every replica seeds its streams before each step from
stream_seed(seed, rank, global step):

- a replacement healed at a step draws exactly what the replica it replaces would have, and
  never what a peer draws (the rank is in the seed);
- a step trained again (its all-reduce failed) draws the same numbers again;
- rank 0 knows every rank's streams at any step, so a checkpoint holds each rank's own
  (replica_parts), and a resume in failure.mode restart gives each rank its own.

A DataLoader's worker processes are seeded from a base seed its iterator draws from the
torch stream when an epoch starts (torch's _BaseDataLoaderIter); torchdata's
StatefulDataLoader keeps that seed in its state_dict. A loader position handed from another
rank (a heal, a checkpoint written by rank 0) gets the receiving rank's own base seed back
(own_loader_state), the one its loader drew at the epoch's first step.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import torch

from workers.rng import capture_rng, restore_rng, seed_all

BASE_SEED = ("_snapshot", "_main_snapshot", "_base_seed")  # torchdata 0.11's multi-process loader state


def stream_seed(seed: int, rank: int, global_step: int) -> int:
    """The seed of rank's streams for the step after `global_step` steps."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{global_step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # below 2**63: every library's seed range


def seed_step(seed: int, rank: int, global_step: int) -> None:
    seed_all(stream_seed(seed, rank, global_step))


def streams_at(seed: int, rank: int, global_step: int) -> dict[str, Any]:
    """Rank's streams as its next step (after `global_step` steps) starts them, captured
    without touching this process's own."""
    mine = capture_rng()
    try:
        seed_step(seed, rank, global_step)
        return capture_rng()
    finally:
        restore_rng(mine)


def loader_base_seed(seed: int, rank: int, epoch_start: int) -> int:
    """The base seed rank's loader drew at the first step of the epoch that started after
    `epoch_start` global steps: the first int64 of that step's torch stream."""
    g = torch.Generator().manual_seed(stream_seed(seed, rank, epoch_start))
    return int(torch.empty((), dtype=torch.int64).random_(generator=g).item())


def own_loader_state(state: Any, seed: int, rank: int, epoch_start: int) -> Any:
    """A loader state from another rank, with this rank's own base seed (a copy; a state
    without one, a single-process loader's, is returned as it is)."""
    inner = state
    for key in BASE_SEED[:-1]:
        inner = inner.get(key) if isinstance(inner, dict) else None
    if not isinstance(inner, dict) or BASE_SEED[-1] not in inner:
        return state
    out = copy.deepcopy(state)
    out[BASE_SEED[0]][BASE_SEED[1]][BASE_SEED[2]] = loader_base_seed(seed, rank, epoch_start)
    return out


def replica_parts(
    mine: dict[str, Any], seed: int, world: int, global_step: int, step: int
) -> list[dict[str, Any]]:
    """Every rank's share of a replica checkpoint taken after `global_step` steps (`step` of
    them in the epoch), from the writer's own: replica groups train the same steps and hold the
    same running loss and position in their shards, but each rank's streams are its own."""
    parts = []
    for rank in range(world):
        part = {**mine, "rng": streams_at(seed, rank, global_step)}
        if part.get("loader") is not None:
            part["loader"] = own_loader_state(part["loader"], seed, rank, global_step - step)
        parts.append(part)
    return parts

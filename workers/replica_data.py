"""failure.mode replicas: a replica's batches, by (epoch, step), from a dataset or a DataLoader.

Each replica group reads its own shard: a dataset's by workers/data.py's rank_batches (rank
= replica group), a DataLoader's by its DistributedSampler (num_replicas = the replica
groups, rank = this one's; torchft's own DistributedSampler does the same with a group of
one rank). Every shard has the same number of batches, of the same sizes, so replicas train
the same steps.

The replicas loop asks for a step's batch after its quorum, and may ask for the same step
again (its all-reduce failed, or the word held it): a DataLoader's batch is kept until the
next step is asked for. A heal moves the replica to the peer's (epoch, step): the loader is
put there from the position the heal hands on (hand), the peer's StatefulDataLoader state
(the sampler's count is the same in every shard; the base seed is made this rank's own,
workers/replica_streams.py), or, for a loader without state, by reading the epoch's head
and dropping it. The steps a replica was dead for are its shard's share of those steps,
skipped, not trained later (Skipped counts them).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from workers.data import rank_batches
from workers.replica_streams import own_loader_state
from workers.task import Batch, Task, collate, is_loader, sampler_of, to_device

log = logging.getLogger(__name__)


class ReplicaBatches:
    """This replica's batch for each (epoch, step), and where its loader is (position)."""

    def __init__(self, task: Task, seed: int, world: int, rank: int, device: torch.device) -> None:
        self.data: Any = task.train_data
        self.batch_size = task.batch_size
        self.seed, self.world, self.rank, self.device = seed, world, rank, device
        self.loader = is_loader(self.data)
        self.indices: tuple[int, list[list[int]]] | None = None  # a dataset's epoch, its batches
        self.it: Any = None  # the loader's iterator
        self.next_at: tuple[int, int] | None = None  # the (epoch, step) the iterator yields next
        self.kept: tuple[tuple[int, int], Batch, Any] | None = None  # the last batch, the state before it
        # a position to start from: epoch, step, the global step the epoch began at, loader state
        self.handed: tuple[int, int, int, Any] | None = None

    def steps(self, epoch: int) -> int:
        return len(self.data) if self.loader else len(self._indices(epoch))

    def batch(self, epoch: int, step: int) -> Batch:
        if not self.loader:
            return collate(self.data, self._indices(epoch)[step], self.device)
        if self.kept is not None and self.kept[0] == (epoch, step):
            return self.kept[1]  # the same step again
        if self.next_at != (epoch, step):
            self._seek(epoch, step)
        before = copy.deepcopy(self.data.state_dict()) if hasattr(self.data, "state_dict") else None
        batch = to_device(next(self.it), self.device)
        self.kept, self.next_at = ((epoch, step), batch, before), (epoch, step + 1)
        return batch

    def position(self, epoch: int, step: int) -> Any:
        """The loader's state from which its next batch is `step` of `epoch` (what a mid-epoch
        checkpoint and a heal hand on), or None: a dataset's, or a loader without state."""
        if not self.loader or not hasattr(self.data, "state_dict"):
            return None
        if self.kept is not None and self.kept[0] == (epoch, step):
            return self.kept[2]
        if self.it is not None and self.next_at == (epoch, step):
            return copy.deepcopy(self.data.state_dict())
        if self.handed is not None and self.handed[:2] == (epoch, step):
            return self.handed[3]
        return None

    def hand(self, epoch: int, step: int, epoch_start: int, state: Any) -> None:
        """Start from (epoch, step) at the next batch, from a restored or healed position
        (another rank's: made this rank's own); epoch_start: the global step the epoch began at."""
        if state is not None:
            state = own_loader_state(state, self.seed, self.rank, epoch_start)
        self.handed = (epoch, step, epoch_start, state)
        self.kept, self.next_at = None, None

    def _indices(self, epoch: int) -> list[list[int]]:
        if self.indices is None or self.indices[0] != epoch:
            batches = rank_batches(len(self.data), self.batch_size, self.seed, epoch, self.world, self.rank)
            self.indices = (epoch, batches)
        return self.indices[1]

    def _seek(self, epoch: int, step: int) -> None:
        data = self.data
        sampler = sampler_of(data)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        handed = self.handed if self.handed is not None and self.handed[:2] == (epoch, step) else None
        skip = step
        if step and handed is not None and handed[3] is not None and hasattr(data, "load_state_dict"):
            data.load_state_dict(handed[3])  # the next batch it yields is `step`
            skip = 0
        elif step:
            why = f"{type(data).__name__} keeps no position (torchdata's StatefulDataLoader does)"
            log.info(
                f"[data] rank {self.rank} starts epoch {epoch} at step {step}: {why}, so the "
                f"epoch's first {step} batches are read and dropped"
            )
        self.it = iter(data)
        for _ in range(skip):
            next(self.it)
        self.next_at, self.kept = (epoch, step), None


def batch_len(batch: Any, default: int) -> int:
    """The number of samples in a batch: the first dimension of its first tensor."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.dim() else default
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for item in items:
        if (n := batch_len(item, -1)) >= 0:
            return n
    return default


class Skipped:
    """The samples of this epoch that were in the shares of replicas missing from a trained
    step's quorum (every shard's batch at a step is as large as this replica's). Every replica
    counts alike (the same quorums), so a heal hands the count on; the writer reports it at the
    epoch's end (a `replica_skipped` event) and every replica starts the next epoch at 0."""

    def __init__(self, world: int) -> None:
        self.world, self.samples, self.steps = world, 0, 0

    def committed(self, participants: int, batch: Any, default: int) -> None:
        if (missing := self.world - participants) > 0:
            self.samples += missing * batch_len(batch, default)
            self.steps += 1

    def state(self) -> dict[str, int]:
        return {"samples": self.samples, "steps": self.steps}

    def load(self, state: dict[str, int] | None) -> None:
        self.samples, self.steps = (state or {}).get("samples", 0), (state or {}).get("steps", 0)

    def end_epoch(self, session: Any, epoch: int) -> None:
        if session.is_writer and self.samples:
            session.coord.event("replica_skipped", {"epoch": epoch, **self.state()})
            log.info(
                f"[replicas] epoch {epoch}: {self.samples} samples in {self.steps} steps skipped "
                "(the shares of replicas missing from those steps' quorums)"
            )
        self.samples = self.steps = 0

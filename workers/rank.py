"""What the modules below the session need of it, as protocols: `Session` (workers/session.py,
the user's API) satisfies them, and the modules that restore (resume.py, sharded.py) and save
(state.py, sharded.py) name these instead of importing the session, so the session builds on
them and none of them imports it back (tests/test_layers.py fails on any import cycle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from orchestrator.core.manifest import CheckpointRecord
    from orchestrator.core.storage import Storage
    from workers.calls import Coordinator
    from workers.chaos import Chaos
    from workers.config import WorkerConfig


class Rank(Protocol):
    """This rank's place in the run."""

    cfg: WorkerConfig
    coord: Coordinator  # the run's coordinator, as a rank calls it
    storage: Storage
    rank: int
    world: int
    device: torch.device


class Restoring(Rank, Protocol):
    """A rank with this attempt's restore plan (made once, on rank 0, with the coordinator)."""

    attempt: int

    def restored_record(self) -> CheckpointRecord | None: ...

    def restored_files(self) -> dict[str, bytes] | None: ...


class Saving(Rank, Protocol):
    """A rank that hands a checkpoint's files to the one commit path (rank 0 writes)."""

    chaos: Chaos
    writer: Any  # workers.writer.CheckpointWriter on rank 0, None elsewhere

    def save_files(
        self,
        epoch: int,
        step_in_epoch: int,
        global_step: int,
        end_of_epoch: bool,
        metrics: dict[str, float],
        files: dict[str, Any],
        *,
        fresh: bool,
    ) -> None: ...

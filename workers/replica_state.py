"""failure.mode replicas: a replica's TrainState, with what a heal and a replica checkpoint
hand on beyond a group restart's: the position of this replica's DataLoader (from
ReplicaBatches, which knows which step its kept batch is) and the epoch's count of skipped
samples (workers/replica_data.py). The grad scaler is a TrainState part like the optimizer:
healed and checkpointed with no edit here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.format import STATE_FILE, Position
from workers.replica_data import ReplicaBatches, Skipped
from workers.replica_streams import streams_at
from workers.state import TrainState

REPLICA = "replica"  # the heal's and the checkpoint's own entry


@dataclass
class ReplicaState(TrainState):
    rank: int = 0
    world: int = 1
    batches: ReplicaBatches = field(init=False)
    skipped: Skipped = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.batches = ReplicaBatches(self.task, self.cfg.seed, self.world, self.rank, self.device)
        self.skipped = Skipped(self.world)

    # -- a heal ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        mine = {"skipped": self.skipped.state(), "loader": self.batches.position(self.epoch, self.step)}
        return {**super().state_dict(), REPLICA: mine}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        mine = sd.get(REPLICA) or {}
        self.skipped.load(mine.get("skipped"))
        self.batches.hand(self.epoch, self.step, self.global_step - self.step, mine.get("loader"))

    # -- a checkpoint ---------------------------------------------------------------------
    def rank_part(self, at: Position) -> dict[str, Any]:
        """The writer's share, from which every rank's is made (workers/replica_streams.py): its
        streams as its next step starts them, and its loader's position before that step
        (not the loader's own state, which is past a batch kept for a step to train again)."""
        mine: dict[str, Any] = {
            "rng": streams_at(self.cfg.seed, self.rank, at.global_step),
            "epoch_acc": self.epoch_loss.state(),
        }
        if at.step_in_epoch and not at.end_of_epoch:
            if (loader := self.batches.position(at.epoch, at.step_in_epoch)) is not None:
                mine["loader"] = loader
        return mine

    def files(self, at: Position, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().files(at, ranks)
        if not at.end_of_epoch:
            out[STATE_FILE][REPLICA] = {"skipped": self.skipped.state()}
        return out

    def load_files(self, model: dict[str, Any], state: dict[str, Any]) -> Position:
        at = super().load_files(model, state)
        self.skipped.load((state.get(REPLICA) or {}).get("skipped") if self.step else None)
        return at

    def resumed_at(self, loader_state: Any) -> None:
        """Rank 0 restored a checkpoint: its loader starts where the checkpoint left it."""
        self.batches.hand(self.epoch, self.step, self.global_step - self.step, loader_state)

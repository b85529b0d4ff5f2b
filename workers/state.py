"""What a task's checkpoint holds, named once: TrainState.

Every part exact resume needs lives on one object, in torch's Stateful shape
(state_dict() / load_state_dict()), and every way state leaves or enters a rank goes
through it: a save (the checkpoint's two files), a restore (workers/resume.py loads them
back through it), the node-local tier (the same files) and a replica's heal
(workers/replicas.py hands a peer TrainState.state_dict()). A new part is a Task.state
entry: saved, restored and healed with no other edit.

    model.pt         the model's state_dict alone (loads with weights_only=True, without
                     this package)
    train_state.pt   the parts (optimizer, scheduler, grad scaler, each Task.state entry),
                     the position in the data, early stopping, the last epoch's metrics and
                     every rank's RNG streams and running loss (and, mid-epoch, its
                     StatefulDataLoader's state_dict)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.core.retention import metrics_fresh
from workers.distributed import gather
from workers.format import MODEL_FILE, STATE_FILE, Position, load_tensor_file  # noqa: F401  # re-exported
from workers.metrics import EarlyStopping, RunningLoss
from workers.replica_streams import replica_parts
from workers.rng import capture_rng
from workers.task import Task, is_loader

if TYPE_CHECKING:
    from workers.config import WorkerConfig
    from workers.rank import Saving


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


@dataclass
class TrainState:
    """A task's whole training state on one rank: the model, the Task's stateful parts and
    where the loop is (the next step, the epoch's running loss, the last metrics, early
    stopping, the last epoch rank 0 reported)."""

    task: Task
    model: torch.nn.Module  # the bare model (not a DDP wrapper)
    cfg: WorkerConfig
    device: torch.device
    epoch: int = 1  # the epoch of the next step (1-based)
    step: int = 0  # the next step of it
    global_step: int = 0
    epoch_loss: RunningLoss = field(init=False)
    metrics: dict[str, float] = field(default_factory=dict)  # the last epoch's
    stopper: EarlyStopping | None = field(init=False)
    reported: int = 0  # the last epoch rank 0 reported

    def __post_init__(self) -> None:
        self.epoch_loss = RunningLoss(self.device)
        self.stopper = EarlyStopping.configured(self.cfg.mode, self.cfg.early_stopping, None)

    # -- the parts ------------------------------------------------------------------------
    def parts(self) -> dict[str, Any]:
        """Every stateful object of the task by the name it is stored under (None: absent)."""
        t = self.task
        return {"optimizer": t.optimizer, "scheduler": t.scheduler, "grad_scaler": t.grad_scaler, **t.state}

    def _parts_state(self) -> dict[str, Any]:
        return {name: None if p is None else p.state_dict() for name, p in self.parts().items()}

    def _load_parts(self, saved: dict[str, Any]) -> None:
        for name, part in self.parts().items():
            if part is not None and saved.get(name) is not None:  # a part a checkpoint predates stays fresh
                part.load_state_dict(saved[name])

    def loop_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "epoch_acc": self.epoch_loss.state(),
            "metrics": dict(self.metrics),
            "stopper": self.stopper.state() if self.stopper else None,
            "reported": self.reported,
        }

    def _load_loop(self, s: dict[str, Any]) -> None:
        self.epoch, self.step, self.global_step = s["epoch"], s["step"], s["global_step"]
        self.epoch_loss, self.metrics = RunningLoss(self.device, s["epoch_acc"]), dict(s["metrics"])
        self.stopper = EarlyStopping.configured(self.cfg.mode, self.cfg.early_stopping, s["stopper"])
        self.reported = max(self.reported, s["reported"])

    # -- a replica's heal: the whole live state, from a peer ------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), **self._parts_state(), "live": self.loop_state()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.model.load_state_dict(sd["model"])
        self._load_parts(sd)
        self._load_loop(sd["live"])

    # -- a checkpoint: two files ----------------------------------------------------------
    def files(self, at: Position, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint taken at `at`: the model alone, and everything else (`ranks`: every
        rank's own RNG streams, running loss and loader position)."""
        return {
            MODEL_FILE: self.model.state_dict(),
            STATE_FILE: {
                **self._parts_state(),
                "ranks": ranks,
                "progress": at.as_dict(),
                "data_seed": self.cfg.seed,
                "early_stopping": self.stopper.state() if self.stopper else None,
                "last_metrics": dict(self.metrics),
            },
        }

    def load_files(self, model: dict[str, Any], state: dict[str, Any]) -> Position:
        """Put a checkpoint's two files back (the per-rank part is workers/resume.py's); returns
        where it was taken. The loop continues at its resume point."""
        self.model.load_state_dict(model)
        self._load_parts(state)
        at = Position(**state["progress"])
        self.epoch, self.step = at.resume_point()
        self.global_step, self.metrics = at.global_step, dict(state.get("last_metrics") or {})
        stopping = state.get("early_stopping")
        self.stopper = EarlyStopping.configured(self.cfg.mode, self.cfg.early_stopping, stopping)
        self.reported = at.epoch if at.end_of_epoch else at.epoch - 1
        return at

    def rank_part(self, at: Position) -> dict[str, Any]:
        """This rank's own share of a checkpoint."""
        mine: dict[str, Any] = {"rng": capture_rng(), "epoch_acc": self.epoch_loss.state()}
        data = self.task.train_data
        if at.step_in_epoch and not at.end_of_epoch and is_loader(data) and hasattr(data, "state_dict"):
            mine["loader"] = data.state_dict()  # where this rank's StatefulDataLoader is
        return mine


class Saver:
    """One save of a TrainState: a collective (every rank hands rank 0 its own part at the same
    step), then rank 0 hands the files to the session's writer."""

    def __init__(self, state: TrainState, session: Saving) -> None:
        self.state, self.session = state, session

    def save(self, at: Position) -> None:
        mine = self.state.rank_part(at)
        cfg = self.session.cfg
        # Replica groups hold equal state and train the same steps per rank as a group does:
        # the writer's part stands for every rank but for the RNG streams, each rank's own, so a
        # resume in either mode finds one per rank (workers/replica_streams.py).
        if cfg.replicas:
            ranks = replica_parts(mine, cfg.seed, self.session.world, at.global_step, at.step_in_epoch)
        else:
            ranks = gather(mine)
        if self.session.writer is None:
            return
        files = self.state.files(at, ranks)
        metrics = self.state.metrics
        # The loop evaluates at each epoch's end only: a save within an epoch carries the last.
        fresh = metrics_fresh(
            metrics, self.session.cfg.monitor, end_of_epoch=at.end_of_epoch, evaluated=at.end_of_epoch
        )
        self.session.save_files(
            at.epoch, at.step_in_epoch, at.global_step, at.end_of_epoch, metrics, files, fresh=fresh
        )

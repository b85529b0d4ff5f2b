"""What a checkpoint holds, and the save every rank takes part in.

model.pt holds the model's state_dict alone (it loads with weights_only=True and
without this package); train_state.pt holds everything else that exact resume
needs: optimizer, scheduler, grad scaler, every rank's RNG streams and running
loss (and, mid-epoch, its StatefulDataLoader's state_dict), the position in the
data and the early-stopping state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from workers.distributed import gather
from workers.format import MODEL_FILE, STATE_FILE, Position, load_tensor_file  # noqa: F401  # re-exported
from workers.metrics import EarlyStopping, RunningLoss
from workers.rng import capture_rng
from workers.task import Task, is_loader

if TYPE_CHECKING:
    from workers.rank import Saving

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


class Saver:
    """One save of a Task: a collective (every rank hands rank 0 its RNG streams and running
    loss at the same step), then rank 0 hands the files to the session's writer."""

    def __init__(self, task: Task, model: torch.nn.Module, session: Saving) -> None:
        self.task, self.model, self.session = task, model, session

    def save(
        self,
        at: Position,
        epoch_loss: RunningLoss,
        metrics: dict[str, float],
        stopper: EarlyStopping | None,
    ) -> None:
        mine = {"rng": capture_rng(), "epoch_acc": epoch_loss.state()}
        data = self.task.train_data
        if at.step_in_epoch and not at.end_of_epoch and is_loader(data) and hasattr(data, "state_dict"):
            mine["loader"] = data.state_dict()  # where this rank's StatefulDataLoader is
        # Replica groups hold equal state and train the same steps per rank as a group does:
        # rank 0's part stands for every rank, so a resume in either mode finds one per rank.
        ranks = [mine] * self.session.world if self.session.cfg.replicas else gather(mine)
        if self.session.writer is None:
            return
        task = self.task
        files = {
            MODEL_FILE: unwrap(self.model).state_dict(),
            STATE_FILE: {
                "optimizer": task.optimizer.state_dict(),
                "scheduler": task.scheduler.state_dict() if task.scheduler is not None else None,
                "grad_scaler": task.grad_scaler.state_dict() if task.grad_scaler is not None else None,
                "ranks": ranks,
                "progress": at.as_dict(),
                "data_seed": self.session.cfg.seed,
                "early_stopping": stopper.state() if stopper else None,
                "last_metrics": metrics,
            },
        }
        self.session.save_files(at.epoch, at.step_in_epoch, at.global_step, at.end_of_epoch, metrics, files)

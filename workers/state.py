"""What a checkpoint holds, and the save every rank takes part in.

model.pt holds the model's state_dict alone (it loads with weights_only=True and
without this package); train_state.pt holds everything else that exact resume
needs: optimizer, scheduler, grad scaler, every rank's RNG streams and running
loss (and, mid-epoch, its StatefulDataLoader's state_dict), the position in the
data and the early-stopping state.
"""

from __future__ import annotations

import io
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from workers.distributed import gather
from workers.metrics import EarlyStopping, RunningLoss
from workers.rng import capture_rng
from workers.task import Task, is_loader

if TYPE_CHECKING:
    from workers.session import Session

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


@dataclass
class Position:
    """Where in training a checkpoint was taken."""

    epoch: int = 1  # the epoch being trained (1-based)
    step_in_epoch: int = 0  # steps of it already trained
    global_step: int = 0
    end_of_epoch: bool = False

    def resume_point(self) -> tuple[int, int]:
        """(epoch, step) where training continues after this checkpoint."""
        return (self.epoch + 1, 0) if self.end_of_epoch else (self.epoch, self.step_in_epoch)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def load_tensor_file(
    data: bytes | str, device: str | torch.device = "cpu", name: str = "checkpoint file"
) -> Any:
    """A checkpoint file's tensors (bytes, or a local path), loaded weights-only: a pickle that
    names code (a `__reduce__` payload) is refused before anything in it runs, and the
    refusal is a CheckpointRefused naming the file, not torch's advice to load it unsafely."""
    import pickle

    from orchestrator.core.verify import CheckpointRefused

    try:
        return torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, map_location=device,
                          weights_only=True)  # fmt: skip
    except pickle.UnpicklingError as e:
        found = re.search(r"(Trying to load unsupported GLOBAL \S+|Unsupported [^\n]+)", str(e))
        raise CheckpointRefused(
            f"{name}: refused to load: it is not plain tensors ({found.group(1) if found else e}). "
            "Checkpoints are loaded weights-only, so nothing in the file ran. This project never "
            "writes such a file: someone else wrote it; do not load it with weights_only=False"
        ) from None


class Saver:
    """One save of a Task: a collective (every rank hands rank 0 its RNG streams and running
    loss at the same step), then rank 0 hands the files to the session's writer."""

    def __init__(self, task: Task, model: torch.nn.Module, session: Session) -> None:
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

"""What a checkpoint holds, and how a worker puts it back.

model.pt holds the model's state_dict alone (it loads with weights_only=True and
without this package); train_state.pt holds everything else that exact resume
needs: optimizer, scheduler, grad scaler, every rank's RNG streams, the position
in the data and the early-stopping state.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


@dataclass
class Progress:
    epoch: int = 1  # the epoch being trained (1-based)
    step_in_epoch: int = 0  # steps of it already trained
    global_step: int = 0
    end_of_epoch: bool = False

    def resume_point(self) -> tuple[int, int]:
        """(epoch, step) where training continues after this checkpoint."""
        return (self.epoch + 1, 0) if self.end_of_epoch else (self.epoch, self.step_in_epoch)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    # numpy's state holds an ndarray, which weights_only loading refuses: store a tensor.
    np_state: Any = np.random.get_state()
    out: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)

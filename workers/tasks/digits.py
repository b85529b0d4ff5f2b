"""Built-in task `digits`: a small CNN on scikit-learn's 8x8 digits (1797 real images).

The data ships inside scikit-learn, so nothing is downloaded. The train/val split
is fixed by the run's seed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from workers.task import Task, TaskContext

DEFAULTS: dict[str, Any] = {
    "batch_size": 32,
    "lr": 0.05,
    "momentum": 0.9,
    "channels": 16,
    "hidden": 64,
    "dropout": 0.25,
    "val_fraction": 0.2,
    "lr_step_epochs": 4,
    "lr_gamma": 0.5,
}

# What each option may be (lower bound, upper bound, in words): the workers would fail on the
# rest, each restart alike.
RANGES: dict[str, tuple[Any, Any, str]] = {
    "batch_size": (lambda v: v >= 1, lambda v: v <= 1 << 20, "from 1 to 1048576"),
    "lr": (lambda v: v > 0, lambda v: True, "a finite number > 0"),
    "momentum": (lambda v: v >= 0, lambda v: True, "a finite number >= 0"),
    "channels": (lambda v: v >= 1, lambda v: v <= 4096, "from 1 to 4096"),
    "hidden": (lambda v: v >= 1, lambda v: v <= 1 << 16, "from 1 to 65536"),
    "dropout": (lambda v: v >= 0, lambda v: v < 1, ">= 0 and < 1"),
    "val_fraction": (lambda v: v > 0, lambda v: v < 1, "> 0 and < 1"),
    "lr_step_epochs": (lambda v: v >= 1, lambda v: True, ">= 1"),
    "lr_gamma": (lambda v: v > 0, lambda v: True, "a finite number > 0"),
}


class DigitsCNN(nn.Module):
    def __init__(self, channels: int = 16, hidden: int = 64, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * channels * 16, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def options_with_defaults(options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(
            f"task.options: unknown option(s) {sorted(unknown)} for digits; known: {sorted(DEFAULTS)}"
        )
    return {**DEFAULTS, **options}


def check_options(options: dict[str, Any]) -> None:
    """Unknown options, wrong types and values out of range, found before Ray starts (the spec
    check calls it)."""
    o = options_with_defaults(options)
    for k, default in DEFAULTS.items():
        v = o[k]
        want = (int, float) if isinstance(default, float) else int
        if isinstance(v, bool) or not isinstance(v, want):
            kind = "a number" if isinstance(default, float) else "an integer"
            raise ValueError(f"{k}: expected {kind} (got {v!r})")
        low, high, says = RANGES[k]
        if not (_finite(v) and low(v) and high(v)):
            raise ValueError(f"{k}: must be {says} (got {v!r})")


def _finite(v: float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int past a float's range
        return False


PREPROCESSING = (
    "an 8x8 grayscale digit (scikit-learn's load_digits: pixel values 0-16) divided by 16.0: "
    "float32 in [0, 1], shape (batch, 1, 8, 8); the output is 10 logits, one per digit"
)


def datasets(seed: int, val_fraction: float) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_val = int(len(y) * val_fraction)
    val, train = perm[:n_val], perm[n_val:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def build_model(options: dict[str, Any]) -> DigitsCNN:
    o = options_with_defaults(options)
    return DigitsCNN(o["channels"], o["hidden"], o["dropout"])


def build(options: dict[str, Any], ctx: TaskContext) -> Task:
    o = options_with_defaults(options)
    train, val = datasets(ctx.seed, o["val_fraction"])
    model = build_model(o)
    opt = torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=o["lr_step_epochs"], gamma=o["lr_gamma"])
    return Task(
        model=model,
        optimizer=opt,
        train_data=train,
        val_data=val,
        batch_size=o["batch_size"],
        scheduler=sched,
        model_args={"channels": o["channels"], "hidden": o["hidden"], "dropout": o["dropout"]},
        preprocessing=PREPROCESSING,
    )

"""What ends an epoch, the same in every loop (the built-in one, workers/loop.py, and the
replica groups', workers/replicas.py): the monitor check before training, the epoch's
metrics, whether a save is due, the early stop's event. Both loops import this; neither
imports the other's helpers.
"""

from __future__ import annotations

import math

import torch

from workers.config import WorkerConfig
from workers.metrics import EarlyStopping, RunningLoss, evaluate, metric_names
from workers.session import Session, StopRun
from workers.task import Task


def check_monitor(cfg: WorkerConfig, task: Task, model: torch.nn.Module, device: torch.device) -> None:
    if cfg.monitor not in (names := metric_names(task, model, device)):
        why = f"checkpoint.monitor {cfg.monitor!r} is not a metric of task {cfg.task!r}"
        raise StopRun(f"{why}; it reports {sorted(names)}", "input")


def epoch_metrics(
    session: Session,
    task: Task,
    model: torch.nn.Module,
    epoch: int,
    epoch_loss: RunningLoss,
    world: int,
    rank: int,
) -> dict[str, float]:
    """The end of an epoch: the scheduler's step, the held-out metrics and the training loss;
    with checkpoint.stop_on_nan, a StopRun at the first metric that is not finite."""
    if task.scheduler is not None:
        task.scheduler.step()
    metrics = evaluate(task, model, session.device, world, rank)
    metrics["train_loss"] = epoch_loss.mean_over_ranks()
    if session.cfg.stop_on_nan and not all(math.isfinite(v) for v in metrics.values()):
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        raise StopRun(f"epoch {epoch}: {', '.join(bad)} not finite (stop_on_nan)", "nan")
    return metrics


def epoch_save_due(cfg: WorkerConfig, epoch: int, stopped_early: bool) -> bool:
    return epoch % cfg.every_n_epochs == 0 or epoch == cfg.epochs or stopped_early


def note_early_stop(session: Session, epoch: int, stopper: EarlyStopping | None) -> None:
    if session.is_writer:
        session.coord.event("early_stop", {"epoch": epoch, "best": stopper and stopper.best})

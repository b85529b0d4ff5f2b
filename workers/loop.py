"""The training loop each Ray Train worker runs, top to bottom.

    restore the latest committed checkpoint (verified; a bad one is marked and skipped)
    for each epoch: the batches of (seed, epoch, world, rank), skipping those already trained
        step; maybe save mid-epoch (every_n_steps)
        evaluate on the held-out split, reduced across ranks; report; maybe save; maybe stop
    wait for the last checkpoint to be committed

Rank 0 writes checkpoints; every rank contributes its RNG streams to them. Restore is in
workers/resume.py, what a checkpoint holds in workers/state.py.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch

from orchestrator.core.tasks import TaskError, resolve_task, user_frames
from workers.calls import StepTicker, call, send
from workers.chaos import Chaos
from workers.config import WorkerConfig
from workers.data import rank_batches
from workers.distributed import broadcast, gather, is_distributed
from workers.failures import is_infrastructure, signature, user_traceback
from workers.metrics import EarlyStopping, RunningLoss, evaluate, metric_names
from workers.resume import restore
from workers.rng import seed_all
from workers.state import Position, Saver, unwrap
from workers.stopping import PREEMPT, Preempted, StopCheck
from workers.task import Task, TaskContext, collate
from workers.writer import CheckpointWriter


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's entry point on every rank. An exception from the user's code is reported
    to the coordinator before Ray Train sees it (workers/failures.py: the same one twice
    stops the run instead of spending every restart)."""
    coord = config["coordinator"]
    where = ["setup"]  # the position in training, for the failure's signature
    try:
        return _train(config, where)
    except Exception as e:
        if not is_infrastructure(e):
            with contextlib.suppress(Exception):  # the original error matters more
                call(coord.record_failure, signature(e, where[0]), user_traceback(e), timeout=30)
        raise


def _train(config: dict[str, Any], where: list[str]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    cfg: WorkerConfig = config["worker"]
    coord = config["coordinator"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if gave_up := call(coord.gave_up):  # the last attempts failed the same way: stop, do not retry
        return stop_run(coord, rank, gave_up, "user_error")
    torch.set_num_threads(int(config.get("threads_per_worker", 1)))
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    storage = cfg.open_storage(on_retry=_retry_reporter(coord, rank))
    seed_all(cfg.seed + rank)
    build, cannot = _import_task(cfg.task, rank)
    if problems := [p for p in gather(cannot) if p]:  # every rank learns it, before any other collective
        return stop_run(coord, rank, problems[0], "input")
    task: Task = build(
        dict(cfg.task_options), TaskContext(rank=rank, world_size=world, seed=cfg.seed, device=device)
    )
    model = task.model.to(device)
    resumed = restore(coord, storage, task, model, device, cfg.seed, rank, world)
    if resumed.taken_over:  # another driver owns the run now: end quietly, the driver says why
        return {"stopped": resumed.taken_over}
    ddp = torch.nn.parallel.DistributedDataParallel(model) if is_distributed() else model
    prior = resumed.train_state
    stopper = EarlyStopping.configured(cfg.mode, cfg.early_stopping, prior.get("early_stopping"))
    metrics: dict[str, float] = dict(prior.get("last_metrics", {}))
    chaos = Chaos(cfg.kills, rank, lambda key: call(coord.claim_chaos, key, os.getpid()))
    commit = lambda r: call(coord.commit, r.model_dump())  # noqa: E731
    writer = CheckpointWriter(storage, commit, cfg.async_save, chaos.after_upload) if rank == 0 else None
    saver = Saver(task, ddp, writer, resumed.attempt, world, cfg.seed)
    epoch_loss = RunningLoss(device, resumed.epoch_acc)
    ticker = StepTicker((lambda at: send(coord.tick, at)) if rank == 0 else None)
    stop_check = StopCheck(ticker.stop_asked, device)
    global_step, stopped_early = resumed.global_step, False
    if cfg.monitor not in (names := metric_names(task, unwrap(ddp), device)):
        why = f"checkpoint.monitor {cfg.monitor!r} is not a metric of task {cfg.task!r}"
        return stop_run(coord, rank, f"{why}; it reports {sorted(names)}", "input")

    for epoch in range(resumed.start_epoch, cfg.epochs + 1):
        batches = rank_batches(len(task.train_data), task.batch_size, cfg.seed, epoch, world, rank)
        first = resumed.start_step if epoch == resumed.start_epoch else 0
        if first == 0:
            epoch_loss = RunningLoss(device)
        ddp.train()
        for step in range(first, len(batches)):
            where[0] = f"epoch {epoch} step {step}"
            chaos.before_step(epoch, step)
            loss = train_step(task, ddp, collate(task.train_data, batches[step], device))
            epoch_loss.add(loss)
            global_step += 1
            ticker(epoch, step + 1, len(batches), global_step)
            if halt := stop_check(global_step):
                at = Position(epoch, step + 1, global_step, False)
                return stop_now(halt, at, saver, writer, epoch_loss, metrics, stopper, coord, rank)
            if cfg.every_n_steps and global_step % cfg.every_n_steps == 0 and step + 1 < len(batches):
                saver.save(Position(epoch, step + 1, global_step, False), epoch_loss, metrics, stopper)
        if task.scheduler is not None:
            task.scheduler.step()

        where[0] = f"epoch {epoch} evaluation"
        metrics = evaluate(task, unwrap(ddp), device, world, rank)
        metrics["train_loss"] = epoch_loss.mean_over_ranks()
        if cfg.stop_on_nan and not all(math.isfinite(v) for v in metrics.values()):
            # Every rank sees the same all-reduced metrics, so every rank stops here.
            bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
            stop_run(coord, rank, f"epoch {epoch}: {', '.join(bad)} not finite (stop_on_nan)", "nan")
            break
        stopped_early = stopper.update(metrics[cfg.monitor]) if stopper else False
        if rank == 0:
            call(
                coord.report_metrics,
                {"epoch": epoch, "global_step": global_step, "attempt": resumed.attempt, **metrics},
            )
        ray.train.report({"epoch": epoch, "global_step": global_step, **metrics})
        at = Position(epoch, len(batches), global_step, True)
        if epoch % cfg.every_n_epochs == 0 or epoch == cfg.epochs or stopped_early:
            saver.save(at, epoch_loss, metrics, stopper)
        elif halt := stop_check(global_step, end_of_epoch=True):
            return stop_now(halt, at, saver, writer, epoch_loss, metrics, stopper, coord, rank)
        if stopped_early:
            if rank == 0:
                call(coord.event, "early_stop", {"epoch": epoch, "best": stopper and stopper.best})
            break

    if writer is None:
        return {"global_step": global_step}
    writer.close()
    return {"global_step": global_step, "stopped_early": stopped_early, "saves": writer.saves,
            "ckpt_blocked_s": writer.blocked_s, "pid": os.getpid()}  # fmt: skip


def _import_task(name: str, rank: int) -> tuple[Any, str | None]:
    """The task's builder, or why this rank cannot import it. The spec check imported it where
    the run was started, so a failure here is this node's (a package missing there): no restart
    can fix it, and the user needs their own error and frames, not ours."""
    try:
        return resolve_task(name), None
    except TaskError as e:
        import ray.util

        node = ray.util.get_node_ip_address()
        return None, (
            f"task.name: {name!r} cannot be imported on rank {rank} (node {node}), though it imported "
            f"where the run was started; install what it needs on every node (the nodes' image, or "
            f"a runtime_env). The task's own error:\n{user_frames(e)}"
        )


def stop_run(coord: Any, rank: int, reason: str, kind: str) -> dict[str, Any]:
    """End the run on purpose, not as a failure Ray Train would retry: every rank reaches this
    at the same point (the metrics are all-reduced, the check is the same on every rank)."""
    if rank == 0:
        call(coord.stop, reason, kind)
    return {"stopped": reason}


def stop_now(
    why: int,
    at: Position,
    saver: Saver,
    writer: CheckpointWriter | None,
    epoch_loss: RunningLoss,
    metrics: dict[str, float],
    stopper: EarlyStopping | None,
    coord: Any,
    rank: int,
) -> dict[str, Any]:
    """Stop where every rank agreed to (see workers/stopping.py): save here, wait until the
    checkpoint is committed, then end the run (the driver asked) or raise Preempted (a
    preemption notice: Ray Train restarts the group from this checkpoint)."""
    saver.save(at, epoch_loss, metrics, stopper)
    if writer is not None:
        writer.close()
    broadcast(None)  # no rank leaves before rank 0's commit is done
    where = f"epoch {at.epoch} step {at.step_in_epoch} (global step {at.global_step})"
    if why == PREEMPT:
        raise Preempted(f"a preemption notice (SIGTERM) reached a worker; checkpoint at {where} committed")
    return stop_run(coord, rank, f"interrupted; checkpoint at {where} committed", "interrupt")


def train_step(task: Task, model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """One optimizer step (through the grad scaler under mixed precision); returns the loss."""
    task.optimizer.zero_grad(set_to_none=True)
    loss = task.train_step(model, batch)
    if task.grad_scaler is not None:
        task.grad_scaler.scale(loss).backward()
        task.grad_scaler.step(task.optimizer)
        task.grad_scaler.update()
    else:
        loss.backward()
        task.optimizer.step()
    return loss


def _retry_reporter(coord: Any, rank: int) -> Any:
    """Storage retries on this rank become events in the run's log."""

    def report(what: str, exc: BaseException, attempt: int, delay: float) -> None:
        send(coord.event, "storage_retry", {"op": what, "attempt": attempt, "delay_s": round(delay, 3),
                                            "error": type(exc).__name__, "rank": rank})  # fmt: skip

    return report

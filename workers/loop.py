"""The training loop each Ray Train worker runs, top to bottom.

    a hand-written train function (it takes the session): call it, wait for its commits
        (one that builds a Task and calls session.fit(task) runs the loop below on it)
    a task (a builder returning a Task):
        restore the latest committed checkpoint (verified; a bad one is marked and skipped)
        for each epoch: the batches of (seed, epoch, world, rank), skipping those already trained
            step; maybe save mid-epoch (every_n_steps); every 10 steps, agree whether to stop
            evaluate on the held-out split, reduced across ranks; report; maybe save; maybe stop
        wait for the last checkpoint to be committed

Both run on the same session (workers/session.py), which owns the restore plan, the one
way a checkpoint is written and committed, metrics reports and stopping. Rank 0 writes
checkpoints; every rank contributes its RNG streams to a task's. Restore is in
workers/resume.py; what a task's checkpoint holds is workers/state.py's TrainState.
"""

from __future__ import annotations

import contextlib
import traceback
from typing import Any

import torch

from orchestrator.core import console
from orchestrator.core.manifest import StopKind
from orchestrator.core.tasks import TaskError, is_train_function, resolve_task, user_frames
from workers.cadence import SaveClock
from workers.calls import Coordinator
from workers.config import WorkerConfig
from workers.data import train_batches
from workers.distributed import broadcast, gather, is_distributed
from workers.epoch import check_monitor, epoch_metrics, epoch_save_due, note_early_stop
from workers.failures import is_infrastructure, signature, user_traceback
from workers.metrics import RunningLoss
from workers.output import label_output
from workers.rank_log import RankLog
from workers.resume import restore
from workers.session import Session, StopRun, TakenOver
from workers.state import Position, Saver, TrainState
from workers.task import Task, TaskContext, check_train_loader


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's entry point on every rank. An exception from the user's code is reported
    to the coordinator before Ray Train sees it (workers/failures.py: the same one twice
    stops the run instead of spending every restart)."""
    import ray.train
    import ray.train.torch

    cfg: WorkerConfig = config["worker"]
    coord = Coordinator(config["coordinator"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    label_output(rank)  # the driver's console shows rank 0's own lines (workers/output.py)
    rank_log = RankLog(cfg.run_uri, cfg.storage_options, rank)  # every line, kept in RUN_URI/logs/
    console.configure()  # this project's `[tag] message` lines, unlabeled (orchestrator/core/console.py)
    where = ["setup"]  # the position in training, for a failure's signature
    session: Session | None = None
    try:
        # The last attempts failed the same way: do not retry. Rank 0 asks, every rank hears.
        if gave_up := broadcast(coord.gave_up() if rank == 0 or cfg.replicas else None):
            return stop_run(coord, rank, gave_up, "user_error", cfg.replicas)
        torch.set_num_threads(int(config.get("threads_per_worker", 1)))
        device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
        fn, cannot = _import_task(cfg.task, rank)
        if problems := [p for p in gather(cannot) if p]:  # every rank learns it, before any other collective
            return stop_run(coord, rank, problems[0], "input", cfg.replicas)
        session = Session(cfg, coord, rank, world, ctx.get_local_rank(), device)
        session.restored_record()  # the restore plan: this attempt's number, for a failure's record
        rank_log.attempt = session.attempt
        loop = train_task
        if cfg.replicas:
            from workers.replicas import train_task_replicas as loop
        if is_train_function(fn):
            return run_train_function(session, fn, loop, where)
        return loop(session, fn, where)
    except TakenOver as e:  # another driver owns the run now: end quietly, the driver says why
        return {"stopped": str(e)}
    except StopRun as stop:
        if session is not None:
            session.close()  # what was saved before the stop is committed
        return stop_run(coord, rank, stop.reason, stop.kind, cfg.replicas)
    except Exception as e:
        kept = rank_log.failed(traceback.format_exc())  # uploaded now: the group may be torn down next
        if not is_infrastructure(e):
            with contextlib.suppress(Exception):  # the original error matters more
                attempt = session.attempt if session is not None and session.attempt else None
                coord.record_failure(signature(e, where[0]), user_traceback(e), attempt, rank, kept)
        raise
    finally:
        rank_log.close()


def run_train_function(session: Session, fn: Any, loop: Any, where: list[str]) -> dict[str, Any]:
    """A train function, its session.fit(task) wired to `loop` (train_task, or in failure.mode
    replicas train_task_replicas): the session does not import the loops that run on it."""

    def fit(task: Task) -> dict[str, Any]:
        try:
            return loop(session, lambda _options, _ctx: task, where)
        finally:
            where[0] = "the train function"  # a failure after fit is the function's own

    where[0] = "the train function"
    session.runner = fit
    fn(session)
    if session.fit_error is not None:  # the function caught what ended the loop: it ends the attempt
        raise session.fit_error
    if session.cfg.replicas and session.fitted is None:
        raise StopRun(
            f"failure.mode replicas: the train function {session.cfg.task!r} (task.name) returned "
            "without session.fit(task); in this mode a train function trains by handing a Task to it",
            "input",
        )
    return {**(session.fitted or {}), **session.close()}


def train_task(session: Session, build: Any, where: list[str]) -> dict[str, Any]:
    """The built-in loop over a Task: every epoch, every step, on top of the session."""
    cfg, device, rank, world = session.cfg, session.device, session.rank, session.world
    task: Task = build(
        dict(cfg.task_options), TaskContext(rank=rank, world_size=world, seed=cfg.seed, device=device)
    )
    try:  # a validation loader without a DistributedSampler is only redundant: sums are reduced
        check_train_loader(task.train_data, world)
    except ValueError as e:  # the same on every rank and every restart: an input error
        raise StopRun(str(e), "input") from None
    state = TrainState(task, task.model.to(device), cfg, device)
    resumed = restore(session, state)
    ddp = torch.nn.parallel.DistributedDataParallel(state.model) if is_distributed() else state.model
    saver, stopped_early = Saver(state, session), False
    clock = SaveClock(cfg, rank, session.coord)
    check_monitor(cfg, task, state.model, device)

    for epoch in range(resumed.start_epoch, cfg.epochs + 1):
        first = resumed.start_step if epoch == resumed.start_epoch else 0
        if first == 0:
            state.epoch_loss = RunningLoss(device)
        ddp.train()
        where[0] = f"epoch {epoch} step {first}"
        loader_state = resumed.loader_state if epoch == resumed.start_epoch else None
        steps, batches = train_batches(task, cfg.seed, epoch, world, rank, device, first, loader_state)
        for step, batch in batches:
            where[0] = f"epoch {epoch} step {step}"
            session.chaos.before_step(epoch, step)
            loss = train_step(task, ddp, batch)
            state.epoch_loss.add(loss)
            state.epoch, state.step, state.global_step = epoch, step + 1, state.global_step + 1
            lr = task.optimizer.param_groups[0]["lr"]  # a dict lookup: the trackers' step/lr
            session.ticker(epoch, step + 1, steps, state.global_step, loss, lr)
            at = Position(epoch, step + 1, state.global_step, False)
            if halt := session.stop_check(state.global_step):
                saver.save(at)
                session.finish_stop(halt, f"epoch {epoch} step {step + 1} (global step {state.global_step})")
            if clock.step_done(state.global_step) and step + 1 < steps:
                clock.save(lambda: saver.save(at), state.global_step, session.writer)  # noqa: B023

        where[0] = f"epoch {epoch} evaluation"
        # Every rank sees the same all-reduced metrics, so every rank decides the same.
        state.metrics = epoch_metrics(session, task, state.model, epoch, state.epoch_loss, world, rank)
        stopped_early = state.stopper.update(state.metrics[cfg.monitor]) if state.stopper else False
        session.report_metrics({"epoch": epoch, "global_step": state.global_step, **state.metrics})
        at = Position(epoch, steps, state.global_step, True)
        state.reported = epoch
        if epoch_save_due(cfg, epoch, stopped_early):
            saver.save(at)
        elif halt := session.stop_check(state.global_step, end_of_epoch=True):
            saver.save(at)
            session.finish_stop(halt, f"the end of epoch {epoch} (global step {state.global_step})")
        if stopped_early:
            note_early_stop(session, epoch, state.stopper)
            break

    return {"global_step": state.global_step, "stopped_early": stopped_early, **session.close()}


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


def stop_run(
    coord: Coordinator, rank: int, reason: str, kind: StopKind, replicas: bool = False
) -> dict[str, Any]:
    """End the run on purpose, not as a failure Ray Train would retry: every rank reaches this
    at the same point (the metrics are all-reduced, the check is the same on every rank).
    Replica groups do not reach it together: a replica other than rank 0 that finds a reason
    of its own (not rank 0's interrupt) records it and asks rank 0 to stop, as a driver would."""
    if rank == 0:
        coord.stop(reason, kind)
    elif replicas and kind != "interrupt":
        coord.stop(reason, kind)
        coord.request_stop(f"rank {rank} stopped the run: {kind}")
    return {"stopped": reason}


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

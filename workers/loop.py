"""The training loop each Ray Train worker runs, top to bottom.

    restore the latest committed checkpoint (verified; a bad one is marked and skipped)
    for each epoch: the batches of (seed, epoch, world, rank), skipping those already trained
        step; maybe save mid-epoch (every_n_steps)
        evaluate on the held-out split, reduced across ranks; report; maybe save; maybe stop
    wait for the last checkpoint to be committed

Rank 0 writes checkpoints; every rank contributes its RNG streams to them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.manifest import CheckpointRecord
from orchestrator.spec import JobSpec, resolve_task
from workers.chaos import Chaos
from workers.data import rank_batches, shard
from workers.restore import VerificationError, load_tensor_file, read_verified
from workers.state import (
    MODEL_FILE,
    STATE_FILE,
    Progress,
    capture_rng,
    restore_rng,
    seed_all,
    unwrap,
)
from workers.task import Task, TaskContext, collate
from workers.writer import CheckpointWriter


class EarlyStopping:
    """Stop when `monitor` has not improved by min_delta for `patience` epochs.

    Every rank sees the same all-reduced metric, so every rank decides the same
    without another collective."""

    def __init__(self, mode: str, patience: int, min_delta: float, state: dict[str, Any] | None = None):
        self.mode, self.patience, self.min_delta = mode, patience, min_delta
        self.best: float | None = (state or {}).get("best")
        self.bad_epochs: int = (state or {}).get("bad_epochs", 0)

    def update(self, value: float) -> bool:
        improved = not math.isnan(value) and (
            self.best is None
            or (
                value < self.best - self.min_delta
                if self.mode == "min"
                else value > self.best + self.min_delta
            )
        )
        if improved:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}


class RunningLoss:
    """This rank's sum of step losses in the epoch, kept on the device: reading each loss
    with float() would make every step wait for the GPU."""

    def __init__(self, device: torch.device, state: dict[str, float] | None = None) -> None:
        self.sum = torch.tensor((state or {}).get("loss_sum", 0.0), dtype=torch.float64, device=device)
        self.steps = int((state or {}).get("steps", 0))

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss.detach()
        self.steps += 1

    def state(self) -> dict[str, float]:
        return {"loss_sum": float(self.sum), "steps": self.steps}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast(obj: Any) -> Any:
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(t)
    return t.tolist()


def evaluate(
    task: Task, model: torch.nn.Module, device: torch.device, world: int = 1, rank: int = 0
) -> dict[str, float]:
    """Metrics on the held-out split: each rank sums its shard, sums are reduced, then averaged."""
    model.eval()
    idx = shard(len(task.val_data), world, rank)
    sums: dict[str, float] = {}
    with torch.no_grad():
        for i in range(0, len(idx), task.batch_size):
            for k, v in task.eval_step(
                model, collate(task.val_data, idx[i : i + task.batch_size], device)
            ).items():
                sums[k] = sums.get(k, 0.0) + float(v)
    keys = sorted(sums)
    totals = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], device), strict=True))
    count = totals.pop("count")
    return {k: v / count for k, v in totals.items()}


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    spec = JobSpec.model_validate(config["spec"])
    coord = config["coordinator"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config.get("threads_per_worker", 1)))
    device = ray.train.torch.get_device() if spec.scaling.use_gpu else torch.device("cpu")
    storage = spec.open_run_storage(
        on_retry=lambda what, exc, n, delay: coord.event.remote(
            "storage_retry",
            {"op": what, "attempt": n, "delay_s": round(delay, 3), "error": type(exc).__name__, "rank": rank},
        )
    )
    ckpt = spec.checkpoint

    seed_all(spec.seed + rank)
    task: Task = resolve_task(spec.task.name)(
        dict(spec.task.options),
        TaskContext(rank=rank, world_size=world, seed=spec.seed, device=device),
    )
    model = task.model.to(device)

    # -- restore -------------------------------------------------------------
    plan: dict[str, Any] | None = None
    blobs: dict[str, bytes] | None = None
    if rank == 0:
        plan = ray.get(coord.start_attempt.remote(world))
        rec = plan["restore"]
        while rec is not None:
            try:
                blobs = read_verified(storage, CheckpointRecord.model_validate(rec))
                break
            except VerificationError as e:
                print(f"[restore] checkpoint {rec['id']} failed verification: {e}", flush=True)
                rec = ray.get(coord.next_restore.remote(rec["id"], str(e)))
        plan["restore"] = rec
    plan = broadcast(plan)
    assert plan is not None
    attempt: int = plan["attempt"]
    progress = Progress()
    train_state: dict[str, Any] = {}
    epoch_loss = RunningLoss(device)
    if plan["restore"] is not None:
        record = CheckpointRecord.model_validate(plan["restore"])
        if blobs is None:  # rank 0 has it verified already; the others read and check their own
            blobs = read_verified(storage, record)
        model.load_state_dict(load_tensor_file(blobs[MODEL_FILE], device))
        train_state = load_tensor_file(blobs[STATE_FILE], device)
        progress = Progress(**train_state["progress"])
        if rank == 0:
            print(
                f"[restore] attempt {attempt}: resumed from {record.id} "
                f"(epoch {record.epoch}, step {record.global_step})",
                flush=True,
            )

    ddp = torch.nn.parallel.DistributedDataParallel(model) if _distributed() else model
    optimizer = task.optimizer
    if train_state:
        optimizer.load_state_dict(train_state["optimizer"])
        if task.scheduler is not None and train_state.get("scheduler") is not None:
            task.scheduler.load_state_dict(train_state["scheduler"])
        if task.grad_scaler is not None and train_state.get("grad_scaler") is not None:
            task.grad_scaler.load_state_dict(train_state["grad_scaler"])
        ranks = train_state["ranks"]
        if len(ranks) == world:
            restore_rng(ranks[rank]["rng"])
            epoch_loss = RunningLoss(device, ranks[rank]["epoch_acc"])
        else:  # elastic resume: per-rank streams cannot map onto a new world size
            seed_all(spec.seed + rank + 7919 * progress.global_step)

    stopper = (
        EarlyStopping(
            ckpt.mode,
            spec.early_stopping.patience,
            spec.early_stopping.min_delta,
            train_state.get("early_stopping"),
        )
        if spec.early_stopping
        else None
    )
    last_metrics: dict[str, float] = dict(train_state.get("last_metrics", {}))
    chaos = Chaos(spec.chaos.kills, rank, lambda key: ray.get(coord.claim_chaos.remote(key, os.getpid())))
    writer = (
        CheckpointWriter(
            storage,
            commit=lambda r: ray.get(coord.commit.remote(r.model_dump())),
            async_save=ckpt.async_save,
            after_upload=chaos.after_upload,
        )
        if rank == 0
        else None
    )

    def save(epoch: int, step_in_epoch: int, global_step: int, end_of_epoch: bool) -> None:
        # A collective: every rank reaches it at the same step and hands rank 0 its own streams.
        ranks = gather({"rng": capture_rng(), "epoch_acc": epoch_loss.state()})
        if writer is None:
            return
        meta = {
            # Unique per attempt: a redone epoch never reuses the name of one marked bad.
            "id": f"epoch{epoch:04d}-step{global_step:07d}-a{attempt}",
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "end_of_epoch": end_of_epoch,
            "metrics": last_metrics,
            "metrics_fresh": end_of_epoch,
            "world_size": world,
            "attempt": attempt,
        }
        state = {
            MODEL_FILE: unwrap(ddp).state_dict(),
            STATE_FILE: {
                "optimizer": optimizer.state_dict(),
                "scheduler": task.scheduler.state_dict() if task.scheduler is not None else None,
                "grad_scaler": task.grad_scaler.state_dict() if task.grad_scaler is not None else None,
                "ranks": ranks,
                "progress": Progress(epoch, step_in_epoch, global_step, end_of_epoch).as_dict(),
                "data_seed": spec.seed,
                "early_stopping": stopper.state() if stopper else None,
                "last_metrics": last_metrics,
            },
        }
        writer.save(meta, state)

    # -- train ---------------------------------------------------------------
    start_epoch, start_step = progress.resume_point() if plan["restore"] else (1, 0)
    saved_world = len(train_state["ranks"]) if train_state else world
    if start_step and saved_world != world:
        # Elastic resume mid-epoch: keep the number of samples the epoch has seen, not the
        # step index (a step of 2 ranks covers twice the samples of a step of 1).
        start_step = start_step * saved_world // world
    global_step = progress.global_step
    stopped_early = False
    for epoch in range(start_epoch, spec.epochs + 1):
        batches = rank_batches(len(task.train_data), task.batch_size, spec.seed, epoch, world, rank)
        first = start_step if epoch == start_epoch else 0
        if first == 0:
            epoch_loss = RunningLoss(device)
        ddp.train()
        for step in range(first, len(batches)):
            chaos.before_step(epoch, step)
            batch = collate(task.train_data, batches[step], device)
            optimizer.zero_grad(set_to_none=True)
            loss = task.train_step(ddp, batch)
            if task.grad_scaler is not None:
                task.grad_scaler.scale(loss).backward()
                task.grad_scaler.step(optimizer)
                task.grad_scaler.update()
            else:
                loss.backward()
                optimizer.step()
            epoch_loss.add(loss)
            global_step += 1
            if ckpt.every_n_steps and global_step % ckpt.every_n_steps == 0 and step + 1 < len(batches):
                save(epoch, step + 1, global_step, end_of_epoch=False)
        if task.scheduler is not None:
            task.scheduler.step()

        metrics = evaluate(task, unwrap(ddp), device, world, rank)
        loss_sum, steps = all_reduce_sum(list(epoch_loss.state().values()), device)
        metrics["train_loss"] = loss_sum / max(steps, 1)
        if ckpt.monitor not in metrics:
            raise ValueError(
                f"checkpoint.monitor {ckpt.monitor!r} is not a metric of task {spec.task.name!r}; "
                f"it reports {sorted(metrics)}"
            )
        last_metrics = metrics
        if stopper is not None and ckpt.monitor in metrics:
            stopped_early = stopper.update(metrics[ckpt.monitor])
        if rank == 0:
            row = {"epoch": epoch, "global_step": global_step, "attempt": attempt, **metrics}
            ray.get(coord.report_metrics.remote(row))
        ray.train.report({"epoch": epoch, "global_step": global_step, **metrics})
        if epoch % ckpt.every_n_epochs == 0 or epoch == spec.epochs or stopped_early:
            save(epoch, len(batches), global_step, end_of_epoch=True)
        if stopped_early:
            if rank == 0:
                ray.get(
                    coord.event.remote(
                        "early_stop", {"epoch": epoch, "best": stopper.best if stopper else None}
                    )
                )
            break

    if writer is not None:
        writer.close()
        return {
            "global_step": global_step,
            "stopped_early": stopped_early,
            "saves": writer.saves,
            "ckpt_blocked_s": writer.blocked_s,
            "pid": os.getpid(),
        }
    return {"global_step": global_step}

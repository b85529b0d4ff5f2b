"""failure.mode replicas: each worker is a torchft replica group of one rank (Ray Train's
TorchftConfig). A failed worker is replaced alone; the others keep training, and the
replacement heals from a live peer instead of reading storage.

    every step:  quorum of the live replicas (torchft's lighthouse)  -> a replica that is
                 behind (a replacement) loads a peer's whole state: model, optimizer,
                 scheduler, position in the data, running loss, early stopping
                 -> forward, backward, gradients averaged over the quorum
                 -> commit the step only if every replica in it got this far (else redo it)
    every epoch: every replica evaluates the whole held-out split on its own (their weights
                 are equal), so every one decides the same; rank 0 reports and saves

What reaches storage goes through the same session, writer and commit protocol as a group
restart: rank 0 writes, and a new rank 0 starts an attempt (orphans collected) and restores
the latest commit before healing to its peers' newer state. The step counters agree:
torchft's step is the global step + 1 on every replica that holds state, and 0 on a new
replica that holds none, which trains only once it has healed from one that does: so a
group whose rank 0 is still restoring never trains ahead from a fresh start.

Not a collective of Ray Train's: nothing here calls ray.train.report, which waits for every
worker of every replica group and so hangs on a dead one (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from workers.calls import call
from workers.data import rank_batches
from workers.metrics import EarlyStopping, RunningLoss, evaluate, metric_names
from workers.resume import restore
from workers.session import Session, StopRun
from workers.state import Position, Saver
from workers.stopping import NONE
from workers.task import Task, TaskContext, collate, is_loader

TIMEOUT = timedelta(seconds=30)  # a collective, a heal's transfer, a commit vote
QUORUM_TIMEOUT = timedelta(seconds=120)  # a replacement's first quorum waits for its start-up
WAIT_FOR_STATE_S = 0.1  # a new replica's poll while no replica in the quorum holds state


@dataclass
class Live:
    """What a replica hands a healing peer besides model and optimizer."""

    epoch: int  # the epoch of the next step
    step: int  # the next step of it
    global_step: int
    epoch_loss: RunningLoss
    metrics: dict[str, float]
    stopper: EarlyStopping | None


def train_task_replicas(session: Session, build: Any, where: list[str]) -> dict[str, Any]:
    from torchft import Manager, ProcessGroupGloo

    cfg, device, rank, world = session.cfg, session.device, session.rank, session.world
    task: Task = build(
        dict(cfg.task_options), TaskContext(rank=rank, world_size=world, seed=cfg.seed, device=device)
    )
    if is_loader(task.train_data) or task.grad_scaler is not None:
        what = "a DataLoader as train_data" if is_loader(task.train_data) else "a grad scaler"
        raise StopRun(f"failure.mode replicas: task {cfg.task!r} uses {what}, which replicas do not "
                      "support yet; use failure.mode restart", "input")  # fmt: skip
    model = task.model.to(device)
    resumed = restore(session, task, model)  # rank 0 only: the others heal from a peer
    prior = resumed.train_state
    stopper = EarlyStopping.configured(cfg.mode, cfg.early_stopping, prior.get("early_stopping"))
    epoch_loss = RunningLoss(device, resumed.epoch_acc)
    metrics = dict(prior.get("last_metrics", {}))
    live = Live(resumed.start_epoch, resumed.start_step, resumed.global_step, epoch_loss, metrics, stopper)
    if cfg.monitor not in (names := metric_names(task, model, device)):
        why = f"checkpoint.monitor {cfg.monitor!r} is not a metric of task {cfg.task!r}"
        raise StopRun(f"{why}; it reports {sorted(names)}", "input")

    def state_dict() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": task.optimizer.state_dict(),
            "scheduler": task.scheduler.state_dict() if task.scheduler is not None else None,
            "live": {"epoch": live.epoch, "step": live.step, "global_step": live.global_step,
                     "epoch_acc": live.epoch_loss.state(), "metrics": live.metrics,
                     "stopper": live.stopper.state() if live.stopper else None},  # fmt: skip
        }

    def load_state_dict(sd: dict[str, Any]) -> None:
        model.load_state_dict(sd["model"])
        task.optimizer.load_state_dict(sd["optimizer"])
        if task.scheduler is not None and sd["scheduler"] is not None:
            task.scheduler.load_state_dict(sd["scheduler"])
        s = sd["live"]
        live.epoch, live.step, live.global_step = s["epoch"], s["step"], s["global_step"]
        live.epoch_loss, live.metrics = RunningLoss(device, s["epoch_acc"]), dict(s["metrics"])
        live.stopper = EarlyStopping.configured(cfg.mode, cfg.early_stopping, s["stopper"])
        print(f"[replicas] rank {rank} healed from a live peer: epoch {live.epoch} step {live.step} "
              f"(global step {live.global_step})", flush=True)  # fmt: skip

    # torchft logs every quorum and commit at INFO; its warnings and errors still show.
    logging.getLogger("torchft").setLevel(logging.WARNING)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=TIMEOUT),
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=1,
        use_async_quorum=False,  # heal before the forward pass, so every step trains from the live state
        rank=0,
        world_size=1,
        replica_id=f"replica_{rank}",  # torchft reads the trailing number
        timeout=TIMEOUT,
        quorum_timeout=QUORUM_TIMEOUT,
        connect_timeout=TIMEOUT,
    )
    if rank == 0:  # the state it restored (or a fresh model) is the one the others heal from
        manager.load_state_dict({"step": live.global_step + 1, "batches_committed": 0})
    session.stop_check.reduce_max = lambda v: _max_over_replicas(manager, v)
    saver = Saver(task, model, session)
    batches: tuple[int, list[list[int]]] | None = None
    waited = Waiting(session)
    ended = False
    try:
        while live.epoch <= cfg.epochs:
            task.optimizer.zero_grad(set_to_none=True)
            manager.start_quorum()  # may heal: `live`, model and optimizer are a peer's now
            # Wait, without training: while this replica holds no state and no replica in the
            # quorum does, or while rank 0 (the one that reports and saves) is not in it, so no
            # epoch is trained that nobody reports or checkpoints. Rank 0's replacement then heals
            # from the replicas that waited for it.
            if manager.current_step() == 0 or not _rank0_in_quorum(manager, rank):
                if waited.poll():
                    break
                time.sleep(WAIT_FOR_STATE_S)
                continue
            epoch, step = live.epoch, live.step
            if batches is None or batches[0] != epoch:
                n = len(task.train_data)
                batches = (epoch, rank_batches(n, task.batch_size, cfg.seed, epoch, world, rank))
            steps = len(batches[1])
            at = Position(epoch, step, live.global_step, False)
            if (halt := session.stop_check(live.global_step)) != NONE:  # the driver asked (Ctrl-C)
                saver.save(at, live.epoch_loss, live.metrics, live.stopper)
                session.finish_stop(halt, f"epoch {epoch} step {step} (global step {live.global_step})")
            where[0] = f"epoch {epoch} step {step}"
            session.chaos.before_step(epoch, step)
            model.train()
            loss = task.train_step(model, collate(task.train_data, batches[1][step], device))
            loss.backward()
            _average_gradients(manager, model)
            if not manager.should_commit():  # a replica failed in this step: redo it with the others
                continue
            task.optimizer.step()
            live.epoch_loss.add(loss)
            live.step, live.global_step = step + 1, live.global_step + 1
            session.ticker(epoch, live.step, steps, live.global_step)
            if live.step < steps:
                if cfg.every_n_steps and live.global_step % cfg.every_n_steps == 0:
                    saver.save(Position(epoch, live.step, live.global_step, False), live.epoch_loss,
                               live.metrics, live.stopper)  # fmt: skip
                continue
            if end_of_epoch(session, task, model, saver, live, steps):
                break
        ended = True
    except StopRun:
        ended = True
        raise
    finally:
        if ended and rank == 0:  # a replacement still waiting for state must not wait for it
            call(session.coord.end_training)
        manager.shutdown(wait=False)
    return {"global_step": live.global_step, **session.close()}


class Waiting:
    """A replica waiting for state or for rank 0: it asks the coordinator, at most once a
    second, whether rank 0 already left its loop (the run trained to its end while this
    replica was being started), and then leaves too."""

    def __init__(self, session: Session) -> None:
        self.session, self.asked = session, 0.0

    def poll(self) -> bool:
        if time.monotonic() - self.asked < 1.0:
            return False
        self.asked = time.monotonic()
        if ended := bool(call(self.session.coord.training_ended)):
            print(f"[replicas] rank {self.session.rank}: rank 0 trained the run to its end; nothing left "
                  "to do", flush=True)  # fmt: skip
        return ended


def end_of_epoch(session: Session, task: Task, model: Any, saver: Saver, live: Live, steps: int) -> bool:
    """Evaluate, report and save the epoch just trained; move `live` to the next. True: stop early."""
    import math

    cfg, epoch = session.cfg, live.epoch
    if task.scheduler is not None:
        task.scheduler.step()
    # The whole held-out split on each replica (world 1): no collective, the same answer everywhere.
    metrics = evaluate(task, model, session.device)
    metrics["train_loss"] = live.epoch_loss.mean_over_ranks()  # this replica's own
    if cfg.stop_on_nan and not all(math.isfinite(v) for v in metrics.values()):
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        raise StopRun(f"epoch {epoch}: {', '.join(bad)} not finite (stop_on_nan)", "nan")
    stopped_early = live.stopper.update(metrics[cfg.monitor]) if live.stopper else False
    live.metrics = metrics
    session.report_metrics({"epoch": epoch, "global_step": live.global_step, **metrics})
    if epoch % cfg.every_n_epochs == 0 or epoch == cfg.epochs or stopped_early:
        saver.save(Position(epoch, steps, live.global_step, True), live.epoch_loss, metrics, live.stopper)
    live.epoch, live.step, live.epoch_loss = epoch + 1, 0, RunningLoss(session.device)
    if stopped_early and session.rank == 0:
        best = live.stopper and live.stopper.best
        call(session.coord.event, "early_stop", {"epoch": epoch, "best": best})
    return stopped_early


def _average_gradients(manager: Any, model: torch.nn.Module) -> None:
    """Every gradient averaged over the quorum in one all-reduce (torchft's DDP wrapper asserts
    in its comm hook when an all-reduce fails, in 0.2.0: a replica killed inside the step's
    quorum crashed the survivor here). A failed all-reduce leaves the step uncommitted."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    manager.allreduce(flat).wait()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _rank0_in_quorum(manager: Any, rank: int) -> bool:
    """Whether rank 0 is in this step's quorum (one 1-element all-reduce). A failed all-reduce
    (a replica died in the quorum) reads as no: the step is tried again with a new quorum."""
    from torch.distributed import ReduceOp

    t = torch.tensor([1.0 if rank == 0 else 0.0])
    manager.allreduce(t, reduce_op=ReduceOp.MAX).wait()
    return not manager.errored() and t.item() > 0


def _max_over_replicas(manager: Any, value: int) -> int:
    """The stop agreement over the quorum (a float max: torchft's all-reduce). A failed
    all-reduce reads as no stop; the step is not committed and comes round again."""
    from torch.distributed import ReduceOp

    t = torch.tensor([float(value)])
    manager.allreduce(t, reduce_op=ReduceOp.MAX).wait()
    return NONE if manager.errored() else int(t.item())

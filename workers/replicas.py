"""failure.mode replicas: each worker is a torchft replica group of one rank (Ray Train's
TorchftConfig). A failed worker is replaced alone; the others keep their state, and the
replacement heals from a live peer instead of reading storage.

    every step:  quorum of the live replicas (torchft's lighthouse); a replica that is behind
                 (a replacement) loads a peer's whole state: model, optimizer, scheduler,
                 position in the data, running loss, early stopping, last metrics
                 -> rank 0's word: is rank 0 here, stop, done, hold, the last epoch it
                 reported; in a full quorum mid-epoch it rides on the gradients' all-reduce,
                 otherwise (an epoch's first step, a replica missing) in one small all-reduce
                 before the step
                 -> forward, backward, gradients averaged over the quorum in buckets whose
                 all-reduces overlap backward (workers/replica_grads.py)
                 -> torchft's commit (a step whose all-reduce failed is trained again)
    every epoch: each replica evaluates its own copy (the weights are equal), so a heal hands
                 the metrics on; rank 0 reports, saves and decides early stopping, and the
                 others follow its word

The writer (rank 0 at a group's start) reports and writes checkpoints, through the same
session, writer and commit protocol as a group restart. When it leaves the quorum, the
lowest-ranked replica holding the live state takes its place at once (Coordinator.take_writer
starts a new attempt, which fences the old writer's late commits), reports and saves an epoch
end the old one died in, and the others train on; rank 0's replacement heals from them as an
ordinary replica. A replica that holds no state (torchft's step 0) trains nothing until it
has healed; the writer at a group's start sets its step to the global step + 1.

Nothing here calls ray.train.report, which waits for every worker of every replica group and
so hangs on a dead one (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import Any

import torch

from orchestrator.core.manifest import CheckpointRecord
from workers.data import rank_batches
from workers.epoch import check_monitor, epoch_metrics, epoch_save_due, note_early_stop
from workers.metrics import RunningLoss
from workers.replica_comms import process_group, replica_comms, transport
from workers.replica_grads import GradBuckets
from workers.replica_state import ReplicaState
from workers.replica_streams import seed_step
from workers.resume import restore
from workers.session import Session, StopRun
from workers.state import Position, Saver, TrainState
from workers.stopping import NONE, PREEMPT
from workers.task import Task, TaskContext, check_train_loader, is_loader

log = logging.getLogger(__name__)

WAIT_S = 0.1  # a waiting replica's pause between quorums
RETRY_S = 0.5  # a lighthouse that does not answer a quorum is asked again this often
CLAIM_EVERY_S = 0.5  # a survivor asks to take a missing writer's place at most this often
HOLD_S = 60.0  # rank 0 waits this long at its start for every replica, so a fault-free run trains all shards

# The writer's word each step, as read: is the writer (rank 0, or the survivor that took its
# place) in the quorum, the stop asked (the highest code any replica sends), "done" (any
# replica: one that ended first sends it on), hold, the last epoch the writer reported, its
# attempt, and the ranks in the quorum that hold the live state (who may take its place).
PRESENT, STOP, DONE, HOLD, REPORTED, ATTEMPT, HOLDERS = range(7)
# As sent: every element a sum over the quorum (Manager.allreduce averages; the readers
# multiply back), so it can ride on the gradients' all-reduce. The writer alone sends
# PRESENT, HOLD, REPORTED and ATTEMPT; every replica its "done", a 1 at its stop code's place
# (codes 1 and 2) and a 1 at its rank's place after those if it holds state.
S_PRESENT, S_HOLD, S_REPORTED, S_ATTEMPT, S_DONE, S_STOP = range(6)
S_HOLDERS = S_STOP + PREEMPT  # one element per stop code above NONE, then one per rank
# What a replica does with the step, once it has the word; TAKE: it became the writer.
TRAIN, AGAIN, END, TAKE = "train", "again", "end", "take"


def word_size(world: int) -> int:
    return S_HOLDERS + world


def train_task_replicas(session: Session, build: Any, where: list[str]) -> dict[str, Any]:
    cfg, rank, world = session.cfg, session.rank, session.world
    live = _build(session, build)
    task, model = live.task, live.model
    healed: list[bool] = []
    manager = _manager(session, live, healed)
    grads = GradBuckets(model, manager, word_size(world))  # hooks on the parameters
    saver, waiting = EpochSaver(live, session), Waiting(session)
    done, holding, hold_until = False, session.is_writer, time.monotonic() + HOLD_S
    ended = False
    try:
        while True:
            task.optimizer.zero_grad(set_to_none=True)
            manager.start_quorum()  # may heal: `live`, model and optimizer are a peer's now
            just_healed = bool(healed)
            healed.clear()
            if just_healed and session.is_writer:  # the epoch end the writer it replaces died in
                done = saver.fill_in(live) or done  # before the word below, which carries it
            # Rank 0 starting the group's training (a new run, a resume, a whole restart) holds
            # it until every replica has joined, so a fault-free run trains every shard.
            alone = manager.num_participants() < world
            holding = holding and not just_healed and alone and time.monotonic() < hold_until
            mine = _mine(session, manager, live, done, holding)
            # The word rides on the gradients' all-reduce (one set of collectives a step) where
            # training the step before reading it is safe: a full quorum (rank 0 in it, not
            # holding), mid-epoch (no end, no early stop), state held. Every replica of the
            # quorum decides alike: after the heal they hold the same step and position.
            rides = not alone and live.step > 0 and manager.current_step() > 0
            if not rides and (act := _heed(_control(manager, mine), manager, live, saver, waiting)) != TRAIN:
                if act == END:
                    break
                if act == TAKE:  # the writer left: the epoch end it may have died in, first
                    done = saver.fill_in(live) or done
                continue
            epoch, step = live.epoch, live.step
            steps = live.batches.steps(epoch)
            where[0] = f"epoch {epoch} step {step}"
            session.chaos.before_step(epoch, step)
            seed_step(cfg.seed, rank, live.global_step)  # its own streams (workers/replica_streams.py)
            batch = live.batches.batch(epoch, step)  # the same again for a step trained again
            model.train()
            loss = task.train_step(model, batch)
            sums = grads.reduce(_scaled(task, loss), mine if rides else None)  # backward, the all-reduces
            if rides and (act := _heed(_read(sums), manager, live, saver, waiting)) != TRAIN:
                if act == END:  # the step trained is dropped: it is never committed
                    break
                if act == TAKE:
                    done = saver.fill_in(live) or done
                continue
            if not manager.should_commit():  # a replica failed in this step: train it again
                continue
            _optimizer_step(task)
            live.skipped.committed(manager.num_participants(), batch, task.batch_size)
            live.epoch_loss.add(loss)
            live.step, live.global_step = step + 1, live.global_step + 1
            lr = task.optimizer.param_groups[0]["lr"]
            session.ticker(epoch, live.step, steps, live.global_step, loss, lr)
            if live.step < steps:
                if cfg.every_n_steps and live.global_step % cfg.every_n_steps == 0:
                    saver.save(Position(epoch, live.step, live.global_step, False))
                continue
            where[0] = f"epoch {epoch} evaluation"
            live.skipped.end_epoch(session, epoch)
            stopped_early = saver.end_epoch(live, steps)
            done = session.is_writer and stopped_early  # its word ends every replica at the next step
        if not session.is_writer:
            _serve_until_the_end(manager, waiting, session, live)
        ended = True
    except StopRun:
        ended = True
        raise
    finally:
        # Out of the quorums first (the others must not wait on it while it commits). The last
        # checkpoint committed before the others are told the run ended: if that fails, they
        # stay, and rank 0's replacement heals from them and saves it again (fill_in).
        manager.shutdown(wait=False)
        if ended and session.is_writer:
            session.close()
            session.coord.end_training()
    return {"global_step": live.global_step, **session.close()}


def _build(session: Session, build: Any) -> ReplicaState:
    """The task, built and refused (with a reason naming the field) where replicas cannot run
    it; on rank 0 its state restored from the latest commit (the others heal from a peer)."""
    cfg, device, rank, world = session.cfg, session.device, session.rank, session.world
    try:
        import torchft  # noqa: F401
    except ImportError as e:
        raise StopRun(
            f"failure.mode replicas: torchft cannot be imported on rank {rank} ({e}); install "
            "'torchft>=0.2,<0.3' on every node",
            "input",
        ) from None
    task: Task = build(
        dict(cfg.task_options), TaskContext(rank=rank, world_size=world, seed=cfg.seed, device=device)
    )
    try:  # each replica group's shard: a DistributedSampler over the replica groups
        check_train_loader(task.train_data, world)
    except ValueError as e:  # the same on every replica and every restart: an input error
        raise StopRun(str(e), "input") from None
    live = ReplicaState(task, task.model.to(device), cfg, device, rank=rank, world=world)
    resumed = restore(session, live)  # rank 0 only: the others heal from a peer
    if resumed.restored:
        live.resumed_at(resumed.loader_state)
    check_monitor(cfg, task, live.model, device)
    return live


def _manager(session: Session, live: TrainState, healed: list[bool]) -> Any:
    """This replica group's torchft Manager: a heal loads a peer's TrainState (and notes it in
    `healed`); the writer's restored state is the one the others heal from. Its process group,
    heal transport and timeouts by device: workers/replica_comms.py (on cuda, NCCL for the
    gradients, gloo for `_control`'s CPU word, heals device to device)."""
    from torchft import Manager

    from workers.replica_pg import key_to_quorums

    rank, cfg = session.rank, session.cfg
    comms = replica_comms(session.device.type, cfg.replica_timeout_s, cfg.replica_quorum_timeout_s)
    os.environ.update(comms.env)  # read when the first NCCL group is made (none on cpu)
    if session.device.type == "cuda" and session.device.index is not None:
        torch.cuda.set_device(session.device)  # the device torchft's NCCL group connects on

    def load_state_dict(sd: dict[str, Any]) -> None:
        live.load_state_dict(sd)
        healed.append(True)
        log.info(
            f"[replicas] rank {rank} healed from a live peer: epoch {live.epoch} step {live.step} "
            f"(global step {live.global_step})"
        )

    # torchft logs every quorum and commit at INFO; its warnings and errors still show.
    logging.getLogger("torchft").setLevel(logging.WARNING)
    timeout = timedelta(seconds=comms.timeout_s)  # failure.replica_timeout_s (on cuda, <= quorum's / 2)
    pg = process_group(comms)
    manager = Manager(
        pg=pg,
        load_state_dict=load_state_dict,
        state_dict=live.state_dict,
        min_replica_size=1,
        use_async_quorum=False,  # heal before the forward pass, so every step trains from the live state
        rank=0,
        world_size=1,
        replica_id=f"replica_{rank}",  # torchft reads the trailing number
        timeout=timeout,
        quorum_timeout=timedelta(seconds=cfg.replica_quorum_timeout_s),
        connect_timeout=timeout,
        checkpoint_transport=transport(comms, pg, session.device),  # None on cpu: torchft's HTTPTransport
        # A quorum the lighthouse could not answer (killed: Ray restarts it at the same address)
        # is asked again every RETRY_S until the quorum timeout, not failed at once.
        quorum_retries=quorum_retries(cfg.replica_quorum_timeout_s),
        init_sync=False,  # a replica at step 0 heals only from one ahead of it (rank 0 starts at 1)
    )
    key_to_quorums(manager, pg)  # a restarted lighthouse counts quorum ids from 1 again
    if session.is_writer:  # the state it restored (or a fresh model) is the one the others heal from
        manager.load_state_dict({"step": live.global_step + 1, "batches_committed": 0})
    return manager


def quorum_retries(quorum_timeout_s: float) -> int:
    """How many times a replica's manager asks the lighthouse again for a quorum it could not
    answer: torchft spreads them evenly over the quorum timeout, so one every RETRY_S."""
    return max(1, int(quorum_timeout_s / RETRY_S))


def _scaled(task: Task, loss: torch.Tensor) -> torch.Tensor:
    """The loss backward starts from: scaled by the task's grad scaler, if it has one."""
    return loss if task.grad_scaler is None else task.grad_scaler.scale(loss)


def _optimizer_step(task: Task) -> None:
    """The optimizer's step on the averaged gradients (through the grad scaler: it unscales
    them and skips a step whose gradients are not finite; every replica decides alike, as
    the gradients and the scaler's state are the same on each)."""
    if task.grad_scaler is None:
        task.optimizer.step()
    else:
        task.grad_scaler.step(task.optimizer)
        task.grad_scaler.update()


class EpochSaver:
    """The writer's saves and reports (the others only keep what a heal hands on)."""

    def __init__(self, state: TrainState, session: Session) -> None:
        self.task, self.model, self.session = state.task, state.model, session
        self.saver = Saver(state, session)
        self.last_saved: int | None = None  # the global step of the last save: never twice

    def save(self, at: Position) -> None:
        if at.global_step != self.last_saved:
            self.last_saved = at.global_step
            self.saver.save(at)

    def end_epoch(self, live: TrainState, steps: int) -> bool:
        """Evaluate, report and save the epoch just trained; move `live` to the next. True:
        the writer stops early. Every replica evaluates (a heal hands its metrics and
        early-stopping state on); only the writer acts on them."""
        session, epoch = self.session, live.epoch
        writer = session.is_writer
        cfg = session.cfg
        try:  # world 1: each replica's whole held-out split, no collective
            live.metrics = epoch_metrics(session, self.task, self.model, epoch, live.epoch_loss, 1, 0)
        except StopRun:
            if writer:
                raise
            live.metrics = {}  # rank 0 stops the run; this replica waits for its word
        stopped_early = bool(live.stopper and live.metrics and live.stopper.update(live.metrics[cfg.monitor]))
        at = Position(epoch, steps, live.global_step, True)
        if writer:
            self.report(at, live, stopped_early)
        live.epoch, live.step, live.epoch_loss = epoch + 1, 0, RunningLoss(session.device)
        return stopped_early

    def report(self, at: Position, live: TrainState, stopped_early: bool, save: bool = True) -> None:
        self.session.report_metrics({"epoch": at.epoch, "global_step": at.global_step, **live.metrics})
        if save and epoch_save_due(self.session.cfg, at.epoch, stopped_early):
            self.save(at)
        live.reported = at.epoch
        if stopped_early:
            note_early_stop(self.session, at.epoch, live.stopper)

    def fill_in(self, live: TrainState) -> bool:
        """The writer healed (or took the writer's place) at the start of an epoch: the end
        of the one before may be what the writer it replaces died in, after the others had
        moved on. Report it if that one did not (a report replaces the epoch's row), and save
        it if it was due and is not the latest commit (a save the old writer handed to its
        background writer may never have been committed), from the state the heal handed on.
        True: it was the early stop."""
        epoch, cfg = live.epoch - 1, self.session.cfg
        if live.step != 0 or epoch < 1 or not live.metrics:
            return False
        stopped_early = bool(live.stopper and live.stopper.bad_epochs >= live.stopper.patience)
        restored = self.session.restored_record()
        saved = restored is not None and restored.epoch == epoch and restored.end_of_epoch
        report, save = live.reported < epoch, epoch_save_due(cfg, epoch, stopped_early) and not saved
        if report or save:
            log.info(
                f"[replicas] rank 0 records the end of epoch {epoch}, which the rank 0 it replaces did not"
            )
            data, world = self.task.train_data, self.session.world
            steps = (
                len(data)
                if is_loader(data)
                else len(rank_batches(len(data), self.task.batch_size, cfg.seed, epoch, world, 0))
            )
            at = Position(epoch, steps, live.global_step, True)
            if report:
                self.report(at, live, stopped_early, save=save)
            elif save:
                self.save(at)
        return stopped_early


class Waiting:
    """A replica waiting for state or for the writer: it asks the coordinator, at most once a
    second, whether the writer left its loop for good (the run trained to its end, or
    stopped). It also remembers the writer's attempt, as the word last said it, which a
    survivor names when it takes the writer's place (Coordinator.take_writer)."""

    def __init__(self, session: Session) -> None:
        self.session, self.asked, self.over = session, 0.0, False
        self.attempt: int | None = None  # the writer's, as last heard
        self.claimed = 0.0  # when this replica last asked to take the writer's place

    def ended(self) -> bool:
        if self.over or time.monotonic() - self.asked < 1.0:
            return self.over
        self.asked = time.monotonic()
        if ended := self.session.coord.training_ended():
            log.info(f"[replicas] rank {self.session.rank}: the writer ended the run; nothing left")
        self.over = ended
        return ended


def _serve_until_the_end(manager: Any, waiting: Waiting, session: Session, live: TrainState) -> None:
    """A replica other than the writer at the end (of the epochs, or an early stop): it stays
    in the quorums, saying "done", so a writer replaced during its last save or report heals
    from it and ends too, until the writer says the run ended."""
    while not waiting.ended():
        manager.start_quorum()
        if _control(manager, _mine(session, manager, live, True, False, stop=NONE)) is None:
            manager.should_commit()
        time.sleep(WAIT_S)


def _mine(
    session: Session, manager: Any, live: TrainState, done: bool, hold: bool, stop: int | None = None
) -> list[float]:
    """This replica's share of the word now (the stop it asks, unless given)."""
    return _word(
        session.world,
        session.rank,
        writer=session.is_writer,
        attempt=session.attempt,
        stop=session.stop_check.local() if stop is None else stop,
        done=done,
        hold=hold,
        reported=live.reported,
        holds=manager.current_step() > 0,  # it holds the live state: it may take the writer's place
    )


def _word(
    world: int,
    rank: int,
    *,
    writer: bool,
    attempt: int,
    stop: int,
    done: bool,
    hold: bool,
    reported: int,
    holds: bool,
) -> list[float]:
    """A replica's share of the word, as sent (S_*)."""
    mine = [0.0] * word_size(world)
    mine[S_DONE] = float(done)
    if stop != NONE:
        mine[S_STOP + stop - 1] = 1.0
    if holds:
        mine[S_HOLDERS + rank] = 1.0
    if writer:
        mine[S_PRESENT], mine[S_HOLD], mine[S_REPORTED] = 1.0, float(hold), float(reported)
        mine[S_ATTEMPT] = float(attempt)
    return mine


def _read(sums: list[float] | None) -> list[Any] | None:
    """The word as read (PRESENT...HOLDERS) from its sums over the quorum; None stays None
    (the all-reduce failed)."""
    if sums is None:
        return None
    stop = max((code for code in range(1, PREEMPT + 1) if sums[S_STOP + code - 1] > 0), default=NONE)
    holders = [r for r, v in enumerate(sums[S_HOLDERS:]) if v > 0]
    return [
        sums[S_PRESENT] > 0,
        stop,
        sums[S_DONE] > 0,
        sums[S_HOLD] > 0,
        sums[S_REPORTED],
        int(sums[S_ATTEMPT]),
        holders,
    ]


def _control(manager: Any, mine: list[float]) -> list[float] | None:
    """The word in an all-reduce of its own (the steps it cannot ride on the gradients); None
    when the all-reduce failed (a replica died in the quorum), so the step is not trained."""
    t = torch.tensor(mine, dtype=torch.float64)
    manager.allreduce(t).wait()
    if manager.errored():
        return None
    return _read((t * manager.num_participants()).round().tolist())


def _take_writer(word: list[Any], manager: Any, session: Session, waiting: Waiting) -> bool:
    """The writer is not in the quorum: the lowest rank that holds the live state takes its
    place at once (issue: a dead rank 0 used to stop every replica until its replacement had
    started and healed). The coordinator decides (take_writer): only if the writer's attempt,
    as this replica last heard it, is still the current one. True: this replica writes now."""
    holders = word[HOLDERS]
    if waiting.attempt is None or manager.current_step() == 0 or not holders or holders[0] != session.rank:
        return False
    if time.monotonic() - waiting.claimed < CLAIM_EVERY_S:
        return False
    waiting.claimed = time.monotonic()
    answer = session.coord.take_writer(session.rank, waiting.attempt)
    if not answer["ok"]:  # the writer lives (only late for this quorum), or its replacement
        waiting.attempt = answer["attempt"]  # started an attempt first: it writes
        return False
    latest = CheckpointRecord.model_validate(answer["latest"]) if answer["latest"] else None
    session.become_writer(answer["attempt"], latest)
    log.info(
        f"[replicas] rank {session.rank} writes the run's checkpoints from now on, in the place of "
        f"the writer of attempt {waiting.attempt}, which left the quorum (attempt {answer['attempt']})"
    )
    return True


def _heed(
    word: list[float] | None, manager: Any, live: TrainState, saver: EpochSaver, waiting: Waiting
) -> str:
    """What the word says to do with this step: TRAIN it, do it AGAIN (after a failed
    all-reduce, on a new quorum; or while it waits for rank 0 or for state), or END."""
    if word is None:  # a replica died in this quorum
        manager.should_commit()  # records the failure, so the next quorum reconfigures
        return AGAIN
    if word[PRESENT]:
        waiting.attempt = int(word[ATTEMPT])
    elif _take_writer(word, manager, saver.session, waiting):
        return TAKE
    if manager.current_step() == 0 or not word[PRESENT] or word[HOLD]:
        if waiting.ended():  # the writer trained to the end (or stopped) while this one waited
            return END
        time.sleep(WAIT_S)
        return AGAIN
    live.reported = max(live.reported, int(word[REPORTED]))
    if word[DONE] or live.epoch > live.cfg.epochs:  # the end beats a stop asked with it
        return END
    if word[STOP] != NONE:  # the driver asked (Ctrl-C): a checkpoint here, then stop
        saver.save(Position(live.epoch, live.step, live.global_step, False))
        saver.session.finish_stop(
            int(word[STOP]), f"epoch {live.epoch} step {live.step} (global step {live.global_step})"
        )
    return TRAIN

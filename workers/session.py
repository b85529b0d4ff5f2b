"""The session: what every rank of a run holds, and the API of a hand-written train function.

A train function takes one argument, the session, and is named in the spec like a task
(`task.name: package.module:function` or `path/to/file.py:function`):

    def train(session):
        ctx = session.context                       # rank, world_size, device, seed, options
        model = ...; opt = ...
        state = session.restore()                   # the latest committed, verified checkpoint
        if state is not None:                       # (loaded to host memory), or None
            model.load_state_dict(state["model"]); opt.load_state_dict(state["optimizer"])
        for epoch in range(start, ctx.epochs + 1):
            ...train, evaluate (reduce metrics across ranks yourself)...
            session.report({"val_loss": v}, epoch=epoch,
                           state={"model": model.state_dict(), "optimizer": opt.state_dict(),
                                  "epoch": epoch})

Every rank calls `report` at the same points (like `ray.train.report`); rank 0's metrics
and state are what count. A state is written in the background through the same commit
protocol as the built-in loop (docs/architecture.md): the coordinator keeps the top-k by
the monitor plus the latest, verifies on restore and falls back past a damaged one,
collects orphans, and Ray Train restarts a failed group, whose ranks then `restore()` the
latest commit. `state["model"]`, when present, is stored as the checkpoint's model.pt (what
`orchestrator best --download`, export and the Serve app load); the rest as train_state.pt.

A train function may also build a Task (workers/task.py) and hand it to the built-in loop,
`session.fit(task)`: the one way a train function trains in failure.mode replicas.

The built-in Task loop (workers/loop.py) is a layer on this: it uses the same session to
plan its restore, to save (`save_files`), to report metrics and to agree on stopping.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.core.heal import start_shared_check
from orchestrator.core.manifest import EXTRAS_DIR, CheckpointRecord, StopKind
from orchestrator.core.names import checkpoint_id
from orchestrator.core.retention import metrics_fresh, not_finite
from orchestrator.core.storage import Storage
from orchestrator.core.verify import copy_verified, read_verified
from workers import extras as extras_mod
from workers.calls import Coordinator, StepTicker
from workers.chaos import Chaos
from workers.config import WorkerConfig
from workers.distributed import broadcast, gather
from workers.resume import plan_restore
from workers.rng import seed_all
from workers.state import MODEL_FILE, STATE_FILE, load_tensor_file
from workers.stopping import NONE, PREEMPT, Preempted, StopCheck
from workers.writer import CheckpointWriter

if TYPE_CHECKING:
    from workers.task import Task

log = logging.getLogger(__name__)

# How long the end of an attempt waits for rank 0's background check of the shared copy it
# restored from (orchestrator/core/heal.py): a preempted one does not wait at all.
SHARED_CHECK_WAIT_S = 120.0


class StopRun(Exception):
    """Raised inside a train function to end the run on purpose (kind: nan, input, interrupt,
    user_error: orchestrator.core.manifest.StopKind);
    the orchestrator catches it, so Ray Train does not count it as a failure."""

    def __init__(self, reason: str, kind: StopKind) -> None:
        super().__init__(reason)
        self.reason, self.kind = reason, kind


class TakenOver(Exception):
    """Another driver owns the run now: this attempt ends quietly; the driver says why."""


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    seed: int  # the spec's seed; every rank is seeded with seed + rank before the function runs
    epochs: int  # the spec's epochs: the last epoch to train (1-based)
    attempt: int  # 1 for the first group, +1 for each restart (and each resume); replicas: 0 but the writer's
    options: dict[str, Any] = field(default_factory=dict)  # the spec's task.options


class Session:
    def __init__(
        self,
        cfg: WorkerConfig,
        coord: Coordinator,
        rank: int,
        world: int,
        local_rank: int,
        device: torch.device,
    ) -> None:
        self.cfg, self.coord = cfg, coord
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device
        self.storage: Storage = cfg.open_storage(on_retry=_retry_reporter(coord, rank))
        seed_all(cfg.seed + rank)
        self.attempt = 0
        claim = lambda key, what: coord.claim_chaos(key, os.getpid(), what)  # noqa: E731
        self.chaos = Chaos(cfg.kills, rank, claim)
        # Rank 0 writes the checkpoints and reports. In a replicas run the writer is chosen
        # when the attempt is planned, and may move to a survivor (become_writer).
        self.writer: CheckpointWriter | None = None
        self.ticker = StepTicker(None)
        if rank == 0 and not cfg.replicas:
            self.become_writer()
        self._asked = False  # the driver's stop request, as rank 0 last asked the coordinator
        self.stop_check = StopCheck(lambda: self._asked or self.ticker.stop_asked(), device)
        self._planned: tuple[CheckpointRecord | None, dict[str, bytes] | None] | None = None
        self._last_id: str | None = None
        self._monitor_checked = False
        self._last_value: float | None = None  # the monitor last reported (or restored), finite
        self._last_seeded = False
        self._shared_check: threading.Thread | None = None
        self._extras_dirs: list[str] = []  # restored extra files, removed at close()
        # The built-in loop for fit(): the harness hands it in (workers/loop.py), so the
        # session does not import the loops that run on it. Its result, once fit() ran.
        self.runner: Callable[[Task], dict[str, Any]] | None = None
        self.fitted: dict[str, Any] | None = None
        self.fit_error: BaseException | None = None  # what ended fit(): the attempt's end, caught or not

    @property
    def is_writer(self) -> bool:
        """This rank writes the checkpoints, commits them and reports the metrics."""
        return self.writer is not None

    def become_writer(self, attempt: int | None = None, restored: CheckpointRecord | None = None) -> None:
        """Write the run's checkpoints from here on: rank 0 from its start, or, in a replicas
        run, a survivor that took over (`attempt`, the one take_writer started; `restored`, the
        latest commit then, what fill-ins compare with). Its writer discards what this node's
        tier staged and never committed (a dead writer's, if it ran here)."""
        coord = self.coord
        self.writer = CheckpointWriter(
            self.storage, coord.commit, self.cfg.async_save, self.chaos.after_upload
        )
        self.ticker = StepTicker(coord.tick)
        if attempt is not None:
            self.attempt, self._planned, self._last_id = attempt, (restored, None), None

    # -- for train functions ------------------------------------------------------------
    @property
    def context(self) -> Context:
        self._plan()  # the attempt number comes with the restore plan
        return Context(
            self.rank,
            self.world,
            self.local_rank,
            self.device,
            self.cfg.seed,
            self.cfg.epochs,
            self.attempt,
            dict(self.cfg.task_options),
        )

    def fit(self, task: Task) -> dict[str, Any]:
        """Train `task` (workers/task.py) on the built-in loop, in this process, and return
        when it is done: resume, every epoch, checkpoints, early stopping, as a task builder
        named in the spec gets. The one way a train function trains in failure.mode replicas,
        where a heal moves a replica to a live peer's place in the data, which only a loop that
        owns the iteration can follow (step(), report() and restore() are refused there).
        Once per attempt, and the session's last use: the loop has committed its last
        checkpoint and closed the writer when it returns, so only code of your own may follow.
        The result: the loop's, `global_step` on every rank (the writer's also has `saves`).
        Whatever ends it (a stop, a failure) ends the attempt, even if the function catches it."""
        if self.runner is None:
            raise RuntimeError(
                "session.fit() trains inside a run the orchestrator started (orchestrator run)"
            )
        if self.fitted is not None:
            raise ValueError(
                "session.fit(task): a task is trained once per attempt (fit() was called before)"
            )
        self.fitted = {}  # before it runs: a second call after it failed is refused too
        try:
            self.fitted = self.runner(task)
        except BaseException as e:
            self.fit_error = e  # the harness raises it again if the function swallowed it
            raise
        return self.fitted

    def _hand_written(self, call: str) -> None:
        """The session's own loop API, refused after fit() (the loop closed the writer) and in
        failure.mode replicas (see fit())."""
        if self.fitted is not None:
            raise StopRun(
                f"session.{call}() after session.fit(): the loop has committed its last checkpoint and "
                "closed the session; fit() is a train function's last use of the session",
                "input",
            )
        if self.cfg.replicas:
            raise StopRun(
                f"failure.mode replicas: a train function's session.{call}() is refused: a heal moves a "
                "replica to a live peer's place in the data, which only the built-in loop can follow; "
                "build a Task and call session.fit(task), or use failure.mode restart",
                "input",
            )

    def restore(self, sharded: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """What the latest committed, verified checkpoint holds (on host memory), or None
        at the start of a run: state.pt's tree, with model.pt's weights under "model".
        With `sharded` ({"model": module, "optimizer": optimizer}, as report() was given it),
        every rank loads its shards into them in place, resharded for this world size
        (workers/sharded.py), and gets the rest of the state back. A checkpoint saved with
        extra files has state["extra_files"]: a local directory holding them, verified (this
        rank's own, removed when the attempt ends). Refused in failure.mode replicas (fit())."""
        self._hand_written("restore")
        if sharded is not None:
            from workers.sharded import restore_shards

            record, data = restore_shards(self, sharded)
            self._planned = (record, None)
            blobs = {STATE_FILE: data} if data is not None else None
        else:
            blobs = self.restored_files()
        if blobs is None:
            return None
        state = dict(load_tensor_file(blobs[STATE_FILE])) if STATE_FILE in blobs else {}
        if MODEL_FILE in blobs:
            state["model"] = load_tensor_file(blobs[MODEL_FILE])
        if (where := self._restore_extras(blobs)) is not None:
            state[extras_mod.STATE_KEY] = where
        if "rank_states" in state:  # each rank's own part; none after a change of world size
            ranks = state.pop("rank_states")
            state["rank_state"] = ranks[self.rank] if len(ranks) == self.world else None
        return state

    def _restore_extras(self, blobs: dict[str, bytes]) -> str | None:
        """The restored checkpoint's extra files, verified, in a local directory of this rank's
        (removed when the session closes); None when it has none."""
        record = self._plan()[0]
        if record is None or not record.extra_files:
            return None
        if record.sharded:  # rank 0 hashed them with the shards; every rank copies its own, verified
            where = tempfile.mkdtemp(prefix=f"orchestrator-{record.id}-r{self.rank}-extras-")
            copy_verified(self.storage, record, where, only=record.extra_files)
            self._extras_dirs.append(where)
            return os.path.join(where, EXTRAS_DIR)
        written = extras_mod.write_restored(blobs, record.id, self.rank)
        if written is not None:
            self._extras_dirs.append(written)
        return written

    def step(
        self,
        epoch: int,
        step: int,
        steps: int = 0,
        global_step: int = 0,
        loss: Any = None,
        lr: float | None = None,
    ) -> None:
        """Optional, before each step: the live progress line, and the spec's fault injection
        (`chaos.kills` at this epoch and step). Cheap, and no collective. `loss`, the latest
        step's train loss (a tensor or a number), becomes rank 0's per-step `step/train_loss`
        in TensorBoard and MLflow (read about once a second), and `lr`, the learning rate, its
        `step/lr`. Refused in failure.mode replicas (fit())."""
        self._hand_written("step")
        self.chaos.before_step(epoch, step)
        self.ticker(epoch, step, steps, global_step, loss, lr)

    def report(
        self,
        metrics: dict[str, float],
        *,
        epoch: int,
        state: dict[str, Any] | None = None,
        rank_state: Any = None,
        step: int | None = None,
        end_of_epoch: bool = True,
        sharded: dict[str, Any] | None = None,
        fresh: bool | None = None,
        extra_files: Any = None,
    ) -> None:
        """Report rank 0's metrics for an epoch (or, with end_of_epoch=False, within it) and,
        with `state`, checkpoint it in the background. Every rank calls it at the same points.
        `step` is the global step (default: the epoch), which names the checkpoint.
        `rank_state` is each rank's own part (a data loader's position, say): gathered into
        the checkpoint, and `restore()` hands each rank its own back as state["rank_state"].
        `sharded` ({"model": module, "optimizer": optimizer}): every rank writes its own shards
        of them (FSDP2; workers/sharded.py) into the same checkpoint as `state`.
        `fresh`: True when `metrics` were just evaluated on the state reported, False when they
        are carried over; None lets the session decide (orchestrator.core.retention.metrics_fresh:
        an epoch's end is fresh; mid-epoch, a finite monitor other than the last one reported).
        Only fresh metrics compete for best-k, become their epoch's metrics row (the console's
        line) and are looked at by checkpoint.stop_on_nan.
        `extra_files` (a directory, or {name: file or directory}): files the checkpoint carries
        beside the state (a tokenizer, a config; rank 0's count), checked like the state's, and
        given back by `restore()` as a local directory, state["extra_files"] (workers/extras.py).
        Refused in failure.mode replicas (fit())."""
        self._hand_written("report")
        if taken := sorted(set(metrics) & {"epoch", "global_step", "attempt"}):
            raise ValueError(f"report(): metric names {taken} are the session's own (pass epoch= and step=)")
        if fresh is not None and not isinstance(fresh, bool):
            raise TypeError(f"report(fresh=...): expected True, False or None, got {fresh!r}")
        if fresh and self.cfg.monitor not in metrics:
            raise ValueError(
                f"report(fresh=True): metrics lack checkpoint.monitor {self.cfg.monitor!r} "
                f"(got {sorted(metrics)})"
            )
        metrics = {k: float(v) for k, v in metrics.items()}
        # Rank 0's metrics count: every decision to stop is rank 0's, broadcast, so no rank
        # leaves while the others wait in a collective.
        if not self._monitor_checked:
            self._monitor_checked = True
            if missing := broadcast(None if self.cfg.monitor in metrics else sorted(metrics)):
                raise StopRun(
                    f"checkpoint.monitor {self.cfg.monitor!r} is not among the reported metrics {missing}",
                    "input",
                )
        fresh = self._judge(metrics, end_of_epoch, fresh, epoch)
        global_step = epoch if step is None else step
        if fresh:  # carried metrics are not this epoch's: no row for them (metrics.jsonl, the console)
            self.report_metrics({"epoch": epoch, "global_step": global_step, **metrics})
        # Rank 0's choice, on every rank: a rank that passed no state still takes part in the
        # collectives of a save (rank_state's gather, the stop agreement) instead of hanging.
        saving, extras = self._saving(state, sharded, extra_files)
        if saving:
            state = state or {}
            files = {MODEL_FILE: state["model"]} if "model" in state else {}
            rest = {k: v for k, v in state.items() if k != "model"}
            if broadcast(rank_state is not None):  # rank 0's choice: the gather is a collective
                rest["rank_states"] = gather(rank_state)
            if rest or sharded is not None:
                files[STATE_FILE] = rest
            in_epoch = 0 if end_of_epoch else global_step
            self.save_files(
                epoch, in_epoch, global_step, end_of_epoch, metrics, files, sharded, extras, fresh=fresh
            )
        if saving and self.rank == 0 and not self._asked:
            # A train function may not call step(), whose ticks carry the driver's request.
            self._asked = self.coord.stop_asked()
        if saving and (why := self.stop_check(global_step, end_of_epoch=True)) != NONE:
            self.finish_stop(why, f"epoch {epoch} (global step {global_step})")

    def _judge(
        self, metrics: dict[str, float], end_of_epoch: bool, evaluated: bool | None, epoch: int
    ) -> bool:
        """Whether a report's metrics are fresh (orchestrator.core.retention.metrics_fresh), rank
        0's verdict on every rank. With checkpoint.stop_on_nan, non-finite metrics stop the run
        (retention.not_finite); the monitor's NaN placeholder of a save before any evaluation
        does not."""
        monitor = self.cfg.monitor
        if not self._last_seeded:  # after a resume: what the restored checkpoint carried
            self._last_seeded = True
            record = self._plan()[0]
            self._last_value = record.metrics.get(monitor) if record is not None else None
        fresh = metrics_fresh(
            metrics, monitor, end_of_epoch=end_of_epoch, evaluated=evaluated, last_value=self._last_value
        )
        if (value := metrics.get(monitor)) is not None and math.isfinite(value):
            self._last_value = value
        bad = not_finite(metrics, monitor, fresh=fresh) if self.cfg.stop_on_nan else []
        fresh, bad = broadcast((fresh, bad))
        if bad:
            raise StopRun(f"epoch {epoch}: {', '.join(bad)} not finite (stop_on_nan)", "nan")
        return bool(fresh)

    def _saving(
        self, state: dict[str, Any] | None, sharded: dict[str, Any] | None, extra_files: Any
    ) -> tuple[bool, tuple[str, dict[str, str]] | None]:
        """Whether this report saves (rank 0's choice, on every rank: a rank that passed no state
        still takes part in the collectives of a save instead of hanging), and rank 0's extra
        files, copied aside. A bad extra_files stops the run on every rank, naming the file."""
        problem, extras = None, None
        if self.rank == 0:
            try:
                if state is not None and extras_mod.STATE_KEY in state:
                    raise extras_mod.ExtraFilesError(
                        f"report(state=...): the key {extras_mod.STATE_KEY!r} is the session's own "
                        "(restore() puts the extra files' directory there); pass the files as extra_files="
                    )
                found = extras_mod.resolve(extra_files)
                extras = extras_mod.snapshot(found) if found else None
            except extras_mod.ExtraFilesError as e:
                problem = str(e)
        wants = state is not None or sharded is not None or extra_files is not None
        saving, problem = broadcast((wants, problem))
        if problem is not None:
            raise StopRun(f"report(): {problem}", "input")
        return bool(saving), extras

    # -- shared with the Task loop ------------------------------------------------------
    def _plan(self) -> tuple[CheckpointRecord | None, dict[str, bytes] | None]:
        if self._planned is None:
            replicas = self.cfg.replicas
            if replicas and self.rank != 0:  # it heals from a peer instead (workers/replicas.py)
                self._planned = (None, None)
                return self._planned
            plan, blobs = plan_restore(
                self.coord, self.storage, self.rank, self.world, self._check_shared, replica=replicas
            )
            if plan.get("taken_over"):
                raise TakenOver(plan["taken_over"])
            self.attempt = plan["attempt"]
            if replicas and plan.get("writer") is None:
                self.become_writer()
            record = CheckpointRecord.model_validate(plan["restore"]) if plan["restore"] else None
            self._planned = (record, blobs)
        return self._planned

    def _check_shared(self, record: CheckpointRecord) -> None:
        """Rank 0 restored from this node's copy: check (and heal) the shared copy, off the
        restore's path; what it finds goes into the run's event log."""
        coord = self.coord
        report = lambda kind, fields: coord.event(kind, fields, timeout=60)  # noqa: E731
        self._shared_check = start_shared_check(self.storage, record, report)

    @property
    def restored_from(self) -> str | None:
        """The id of the committed checkpoint this attempt resumed from (None: the start)."""
        record = self._plan()[0]
        return record.id if record else None

    def restored_record(self) -> CheckpointRecord | None:
        return self._plan()[0]

    def restored_files(self) -> dict[str, bytes] | None:
        """The verified bytes of the checkpoint this attempt resumes from (rank 0 verified it
        while planning; the other ranks read and verify their own copy)."""
        record, blobs = self._plan()
        if record is None:
            return None
        if record.sharded:
            raise ValueError(
                f"checkpoint {record.id} is sharded (every rank wrote its own shards): restore "
                "it with session.restore(sharded={'model': ..., 'optimizer': ...})"
            )
        if blobs is None:
            blobs = read_verified(self.storage, record)
        if self.rank == 0:
            log.info(
                f"[restore] attempt {self.attempt}: resumed from {record.id} "
                f"(epoch {record.epoch}, step {record.global_step})"
            )
        self._planned = (record, None)  # the bytes are not kept alive past the restore
        return blobs

    def save_files(
        self,
        epoch: int,
        step_in_epoch: int,
        global_step: int,
        end_of_epoch: bool,
        metrics: dict[str, float],
        files: dict[str, Any],
        sharded: dict[str, Any] | None = None,
        extras: tuple[str, dict[str, str]] | None = None,
        *,
        fresh: bool,
    ) -> None:
        """Rank 0 hands `files` (name -> state tree) and `extras` (extra files copied aside) to
        the background writer: the one way a checkpoint is written and committed. Other ranks
        return at once, or, with `sharded`, once every rank has written its shards (their list
        goes into rank 0's record). `fresh`: the metrics were measured on this state
        (retention.metrics_fresh)."""
        # Unique per attempt: a redone epoch never reuses the name of one marked bad.
        cid = checkpoint_id(epoch, global_step, self.attempt)
        if cid == self._last_id:
            extras_mod.discard(extras)
            raise ValueError(
                f"a second checkpoint at epoch {epoch}, step {global_step} in one attempt; "
                "pass a growing step= to report()"
            )
        self._last_id = cid
        written = None
        if sharded is not None:
            from workers.sharded import save_shards

            written = save_shards(self, cid, epoch, sharded)
        if self.writer is None:
            return
        meta = {
            "id": cid,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "end_of_epoch": end_of_epoch,
            "metrics": metrics,
            "metrics_fresh": fresh,
            "world_size": self.world,
            "attempt": self.attempt,
            "sharded": sharded is not None,
        }
        self.writer.save(meta, files, written, extras)

    def report_metrics(self, row: dict[str, Any]) -> None:
        import ray.train

        if self.is_writer:
            self.coord.report_metrics({**row, "attempt": self.attempt})
        if not self.cfg.replicas:  # there, report would wait for every replica: a dead one hangs it
            ray.train.report(row)

    def finish_stop(self, why: int, where: str) -> None:
        """Every rank agreed to stop (workers/stopping.py) right after a save: wait until it is
        committed, then end the run (the driver asked) or raise Preempted."""
        self.close(check_wait_s=0.0 if why == PREEMPT else SHARED_CHECK_WAIT_S)
        broadcast(None)  # no rank leaves before rank 0's commit is done
        if why == PREEMPT:
            raise Preempted(
                f"a preemption notice (SIGTERM) reached a worker; checkpoint at {where} committed"
            )
        raise StopRun(f"interrupted; checkpoint at {where} committed", "interrupt")

    def close(self, check_wait_s: float = SHARED_CHECK_WAIT_S) -> dict[str, Any]:
        """Wait for every checkpoint handed to the writer to be committed, and (at most
        check_wait_s) for the background check of the shared copy this attempt restored from."""
        out: dict[str, Any] = {}
        if self.writer is not None:
            self.writer.close()
            out = {"saves": self.writer.saves, "ckpt_blocked_s": self.writer.blocked_s, "pid": os.getpid()}
        if (check := self._shared_check) is not None:
            check.join(check_wait_s)
            if check.is_alive():
                log.info("[restore] the shared copy's check is still running; not waited for")
            self._shared_check = None
        for where in self._extras_dirs:
            shutil.rmtree(where, ignore_errors=True)
        self._extras_dirs = []
        return out


def _retry_reporter(coord: Coordinator, rank: int) -> Any:
    """Storage retries on this rank become events in the run's log."""

    def report(what: str, exc: BaseException, attempt: int, delay: float) -> None:
        coord.note(
            "storage_retry",
            {
                "op": what,
                "attempt": attempt,
                "delay_s": round(delay, 3),
                "error": type(exc).__name__,
                "rank": rank,
            },
        )

    return report

"""`Coordinator`: the run's coordinator, one class whose public methods are exactly the remote
API (what workers/calls.py's client, the driver and ray_compat call). The Ray actor is this
class itself, `ray.remote(**ACTOR_OPTIONS)(Coordinator)`: no forwarders to drift.

The actor restarts itself if it dies (max_restarts=-1) and rebuilds its state from storage,
and calls are retried (max_task_retries=-1) with the same arguments, so every method is
idempotent; every mutating call takes the caller's request id (rid) last.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from orchestrator.coordinator.commits import Commits
from orchestrator.coordinator.ownership import Ownership
from orchestrator.coordinator.runlog import RunLog
from orchestrator.coordinator.signals import Signals
from orchestrator.core.manifest import CheckpointRecord, Manifest, StopKind
from orchestrator.core.retention import RetentionConfig
from orchestrator.core.storage import Storage
from orchestrator.story import failure_cause
from orchestrator.tracking import Trackers

# How the driver's actor runs: on no CPU, restarted forever, its calls retried, one at a time.
ACTOR_OPTIONS: dict[str, Any] = {
    "num_cpus": 0,
    "max_restarts": -1,
    "max_task_retries": -1,
    "max_concurrency": 1,
}


class Coordinator:
    """One run's coordinator, made of its parts: `ownership` (the claim, the fence, the
    manifest), `log` (events and metrics), `signals` (in memory) and `commits` (commits,
    retention, deletions). Plain Python over a `Storage`; Ray hosts it as is."""

    def __init__(
        self,
        storage: Storage,
        run: str,
        cfg: RetentionConfig,
        owner: str | None = None,
        tracking: dict[str, Any] | None = None,
    ) -> None:
        self.storage = storage
        self.cfg = cfg
        self.ownership = Ownership(storage, owner)
        self.signals = Signals()
        self.log = RunLog(storage, self.ownership)
        self.ownership.open(run, cfg, self.log.backup_failed)
        self.log.track(tracking)
        self.commits = Commits(storage, cfg, self.ownership, self.log)
        best = self.commits.best()  # the best committed before this coordinator: a resumed run's best so far
        self.best_at_start = {"epoch": best.epoch, "metrics": best.metrics} if best else None
        self._started()

    def _started(self) -> None:
        """Say in the run's log that a coordinator (re)started, in which process."""
        self.log.event("coordinator_started", pid=os.getpid())

    # -- what the parts hold, read in this process (properties: not remote methods)
    @property
    def manifest(self) -> Manifest:
        return self.ownership.manifest

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.log.events

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return self.log.metrics

    @property
    def owner(self) -> str | None:
        return self.ownership.owner

    @property
    def fenced(self) -> str | None:
        return self.ownership.fenced

    @property
    def trackers(self) -> Trackers | None:
        return self.log.trackers

    # -- the remote API -------------------------------------------------------
    def ping(self) -> int:
        return os.getpid()

    def fence(self, reason: str) -> None:
        """The driver's heartbeat found the lease taken over: refuse every write from now on."""
        self.ownership.fence(reason)

    def start_attempt(
        self, world_size: int, rid: str | None = None, replica: bool = False, writer: Any = None
    ) -> dict[str, Any]:
        """Called by rank 0 when a worker group starts: count it, collect orphans,
        and say which checkpoint to restore (the latest committed one).

        replica (failure.mode replicas): a rank 0 that starts while a surviving replica
        writes the run's checkpoints (take_writer) is a replacement, an ordinary replica:
        no attempt starts, and the answer names the writer ({"writer": rank}). `writer`: the
        caller's actor handle, which take_writer asks whether it is alive.

        Idempotent under retry: the event is logged once (by rid), then the manifest records
        the count and the answer in one write; a retry finds the answer there."""
        done, answer = self.ownership.answered(rid)
        if done:
            return dict(answer)
        m = self.manifest
        if replica and self.signals.writer not in (None, 0):
            return {"attempt": m.attempts, "restore": None, "writer": self.signals.writer}
        self.signals.writer, self.signals.writer_actor = 0, writer
        attempt = m.attempts + 1
        latest = m.latest()
        result = {"attempt": attempt, "restore": latest.model_dump() if latest else None}
        self.log.event(
            "attempt_started",
            rid,
            attempt=attempt,
            world_size=world_size,
            restore=latest.id if latest else None,
            restore_epoch=latest.epoch if latest else None,
        )
        update = {
            "attempts": attempt,
            "resumed_from": latest.id if latest else None,
            "status": "running",
            "stopped": None,
        }
        # The compare-and-swap first: a coordinator whose run was taken over is fenced here,
        # before it could take the new owner's commits for orphans.
        self.ownership.save(self.ownership.remember(self.manifest.model_copy(update=update), rid, result))
        self.signals.note_attempt(attempt, latest.id if latest else None)
        self.commits.collect_orphans()
        return result

    def take_writer(
        self, rank: int, attempt: int, rid: str | None = None, writer: Any = None
    ) -> dict[str, Any]:
        """failure.mode replicas: the writer (the replica that reports, saves and commits) left
        the quorum, and `rank`, the lowest surviving replica that holds the live state, takes its
        place, if `attempt` is still the current one (else the writer's replacement started an
        attempt first, and it stays the writer: {"ok": False}) and the writer's process is dead
        (a live writer only late for a quorum, which torchft's lighthouse forms about 100 ms
        after the first replica asks, stays the writer: {"ok": False, "alive": True}).
        `writer`: the caller's actor handle.

        Taking over starts an attempt without a restore: a late commit of the old writer is
        then refused and its upload deleted (Commits.commit), and orphan collection removes
        what it left half-written, so the new writer's commits follow the old one's with no
        hole and nothing of a dead writer is read. Idempotent under retry (by rid)."""
        done, answer = self.ownership.answered(rid)
        if done:
            return dict(answer)
        m = self.manifest
        if m.attempts != attempt or self.signals.ended:
            return {"ok": False, "attempt": m.attempts, "writer": self.signals.writer}
        if (old := self.signals.writer_actor) is not None and self._alive(old):
            return {"ok": False, "attempt": m.attempts, "writer": self.signals.writer, "alive": True}
        latest = m.latest()
        result = {"ok": True, "attempt": attempt + 1, "latest": latest.model_dump() if latest else None}
        self.log.event("writer_moved", rid, rank=rank, attempt=attempt + 1, after_attempt=attempt)
        self.ownership.save(
            self.ownership.remember(m.model_copy(update={"attempts": attempt + 1}), rid, result)
        )
        self.signals.note_writer(rank, attempt + 1)
        self.signals.writer_actor = writer
        self.commits.collect_orphans()
        return result

    @staticmethod
    def _alive(actor: Any) -> bool:
        from orchestrator.ray_compat import actor_alive

        return actor_alive(actor)

    def next_restore(self, bad_id: str, reason: str, rid: str | None = None) -> dict[str, Any] | None:
        """Mark a checkpoint that failed verification bad, and name the next newest good one."""
        self.commits.mark_bad(bad_id, reason)
        latest = self.manifest.latest()
        self.ownership.save(self.manifest.model_copy(update={"resumed_from": latest.id if latest else None}))
        return latest.model_dump() if latest else None

    def commit(
        self, record: dict[str, Any] | CheckpointRecord, rid: str | None = None
    ) -> dict[str, list[str]]:
        """Add an uploaded checkpoint to the manifest (idempotent by its id, not by rid)."""
        if not isinstance(record, CheckpointRecord):
            record = CheckpointRecord.model_validate(record)
        return self.commits.commit(record)

    def report_metrics(self, row: dict[str, Any], rid: str | None = None) -> None:
        """One row per (epoch) as reported by rank 0; a redone epoch replaces its row (so a
        retried report changes nothing)."""
        self.ownership.check()
        self.signals.add_report(row, rid)
        self.log.metrics_row(row)

    def tick(self, position: dict[str, Any], rid: str | None = None) -> bool:
        """Rank 0's position (in memory only, for the live display; its train loss, if it
        came, goes to the trackers); the answer says whether the driver asked the workers
        to stop."""
        self.signals.live = position
        self.log.step_row(position)
        return self.signals.stop_requested is not None

    def request_stop(self, reason: str, rid: str | None = None) -> None:
        """The driver was interrupted (or a replica stopped for a reason of its own): the workers
        save, wait for the commit and stop. Idempotent without rid: the first reason stands."""
        if self.signals.ask_stop(reason):
            self.log.event("stop_requested", reason=reason)

    def stop_asked(self, rid: str | None = None) -> bool:
        return self.signals.stop_requested is not None

    def end_training(self, rid: str | None = None) -> None:
        self.signals.ended = True

    def training_ended(self, rid: str | None = None) -> bool:
        return self.signals.ended or self.fenced is not None

    def record_failure(
        self,
        sig: str,
        trace: str,
        attempt: int | None = None,
        rid: str | None = None,
        rank: int | None = None,
        log: str | None = None,
    ) -> None:
        """A rank's exception from user code (workers/failures.py). The same signature (type,
        message, line, epoch and step) ending two attempts is deterministic: the next attempt
        stops the run with this traceback instead of Ray Train spending every restart. `rank`
        and `log` (its output, RUN_URI/logs/...: workers/rank_log.py) go into the event."""
        if attempt is None:  # failed before its restore plan: Ray Train's restart count tells groups apart
            attempt = -1 - self.manifest.restarts
        where = {k: v for k, v in (("rank", rank), ("log", log)) if v is not None}
        self.log.event("worker_error", rid, signature=sig[:2000], restarts=attempt, **where)
        self.signals.heard(self.manifest.attempts if attempt < 0 else attempt, failure_cause(sig))
        if self.signals.count_failure(sig, attempt, trace):
            self.log.event("deterministic_failure", signature=sig[:2000])

    def gave_up(self, rid: str | None = None) -> str | None:
        return self.signals.gave_up

    def claim_chaos(
        self, key: str, pid: int | None = None, rid: str | None = None, what: str | None = None
    ) -> bool:
        """True exactly once per key per run (fault injection fires on the first attempt only),
        and True again for a retry of that same claim, so the kill still fires. `what` says it
        for a person (`rank 1 (pid N) SIGKILLed by chaos.kills at epoch 5 step 0`)."""
        done, answer = self.ownership.answered(rid)
        if done:
            return bool(answer)
        if key in self.manifest.chaos_fired:
            return False
        self.signals.heard(self.manifest.attempts, what or f"SIGKILLed by chaos.kills ({key}, pid {pid})")
        self.log.event("chaos_kill", rid, key=key, pid=pid, **({"what": what} if what else {}))
        m = self.manifest.model_copy(update={"chaos_fired": [*self.manifest.chaos_fired, key]})
        self.ownership.save(self.ownership.remember(m, rid, True))
        return True

    def stop(self, reason: str, kind: StopKind, rid: str | None = None) -> None:
        """The workers stopped the run on purpose: it ends as failed, with reason. kind "input"
        (a spec error found on the workers), "nan" (checkpoint.stop_on_nan) or "interrupt"
        (the driver's request_stop, after a checkpoint was committed)."""
        self.signals.ended = True
        self.log.event("stopped", rid, reason=reason, why=kind)
        earlier = self.manifest.stopped
        if kind == "interrupt" and earlier and earlier["kind"] != "interrupt":
            return  # rank 0 stopping because a replica asked it to: the replica's reason stands
        self.ownership.save(self.manifest.model_copy(update={"stopped": {"reason": reason, "kind": kind}}))

    def note_restart(
        self, reason: str, rid: str | None = None, whole: bool = False, alone: bool = False
    ) -> None:
        """Ray Train's controller decided to restart the worker group (counted once per rid);
        whole: the driver restarts the whole group of a replicas run (its controller gave up);
        alone: Ray Train replaces only the failed replicas (counted apart, as `replacements`)."""
        if self.ownership.answered(rid)[0]:
            return
        m = self.manifest
        cause = self.signals.restart_cause(m.attempts, reason)
        extra = {"whole": True} if whole else {"alone": True} if alone else {}
        self.log.event("restart", rid, restarts=m.restarts + 1, cause=cause, reason=reason[:2000], **extra)
        counts = {"restarts": m.restarts + 1, "replacements": m.replacements + int(alone and not whole)}
        self.ownership.save(self.ownership.remember(m.model_copy(update=counts), rid, True))
        self.signals.note_restart(m.restarts + 1, cause, whole, alone and not whole)
        if whole:  # every worker starts afresh: rank 0 writes again (start_attempt)
            self.signals.writer = self.signals.writer_actor = None

    def event(
        self, kind: str, fields: dict[str, Any] | None = None, rid: str | None = None, **more: Any
    ) -> None:
        """Log an event with these fields; with a request id, a retried call logs it once.
        (In this process `fields` may also come as keywords.)"""
        self.log.event(kind, rid, **(fields or {}), **more)

    def finish(self, status: Literal["finished", "failed"]) -> dict[str, list[str]]:
        """Release the resume pin and leave exactly best-k ∪ latest ∪ milestones."""
        m = self.manifest.model_copy(update={"status": status, "resumed_from": None})
        self.commits.apply_retention(m, pins=False)
        self.commits.collect_orphans()
        self.log.event("run_" + status, checkpoints=len(self.manifest.checkpoints))
        self.log.close_trackers(status)
        return self.manifest.kept

    def progress(self, since: int = 0) -> dict[str, Any]:
        """For the driver's progress lines: rows reported since `since`, the best so far."""
        best = self.commits.best()
        return {
            "metrics": self.metrics[-1] if self.metrics else None,
            "new": self.signals.reported[since:],
            "next": len(self.signals.reported),
            "best": best.model_dump() if best else None,
            "restarts": self.manifest.restarts,
            "replacements": self.manifest.replacements,
            "attempts": self.manifest.attempts,
            "stopped": self.manifest.stopped,
            "fenced": self.fenced,
            "live": self.signals.live,
            "resumed_from": self.manifest.resumed_from,
            "cadence": self.log.newest("cadence"),  # every_n_steps: auto's latest choice
            "notes": self.signals.notes,
            "best_at_start": self.best_at_start,
            "trackers_off": self.log.trackers_off,  # the driver warns of each once
        }


def coordinator_actor_class() -> Any:
    """The Ray actor class: Coordinator itself (built lazily so this package imports without Ray)."""
    import ray

    return ray.remote(**ACTOR_OPTIONS)(Coordinator)

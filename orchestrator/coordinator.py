"""The run's coordinator: the only writer of manifest.json and the only deleter.

`RunLedger` is plain Python over a `Storage` (unit-tested on memory:// and a temp
dir); `Coordinator` is the Ray actor that hosts one per run. The actor restarts
itself if it dies (max_restarts=-1) and rebuilds its state from storage, and
calls are retried (max_task_retries=-1), so every method here is idempotent.

Order of durable writes in a commit: the worker has written the files and then
checkpoint.json; we add the record and write the manifest; only after that
manifest is durable do we delete what fell out of retention.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Literal

from orchestrator.core import lease, retention
from orchestrator.core.errors import OrchestratorError
from orchestrator.core.lease import LEASE, LeaseLost
from orchestrator.core.manifest import (
    CHECKPOINTS,
    EVENTS,
    MANIFEST,
    METRICS,
    RECORD,
    BadCheckpoint,
    CheckpointRecord,
    Manifest,
    StopKind,
    parse_manifest,
    read_journal,
    read_manifest_versioned,
    read_record,
    write_journal_if,
    write_manifest,
    write_manifest_if,
)
from orchestrator.core.names import attempt_of
from orchestrator.core.retention import RetentionConfig
from orchestrator.core.storage import CLOCK_PROBE, Conflict, Storage, StorageError
from orchestrator.story import failure_cause, restart_cause
from orchestrator.tracking import Trackers

_REMEMBERED = 200  # request ids (and their answers) kept for retried calls


class CommitError(OrchestratorError, RuntimeError):
    """A commit that cannot be accepted (its files are not all in storage)."""


class RunLedger:
    """With `owner` (the driver's lease token) every manifest write is a compare-and-swap on
    the version this ledger last wrote: once another driver has taken the run over, the
    first write that finds the manifest changed raises LeaseLost, and nothing is deleted
    after it. Without an owner (tests of the pure logic) writes are plain replaces."""

    def __init__(
        self,
        storage: Storage,
        run: str,
        retention_cfg: RetentionConfig,
        owner: str | None = None,
        tracking: dict[str, Any] | None = None,
    ) -> None:
        self.storage = storage
        self.cfg = retention_cfg
        self.owner = owner
        self.fenced: str | None = None  # why this ledger may no longer write
        self._journal_versions: dict[str, str | None] = {}
        self.live: dict[str, Any] | None = None  # rank 0's latest position in the epoch (display only)
        self.stop_requested: str | None = None  # the driver's Ctrl-C/SIGTERM, read by rank 0's ticks
        # failure.mode replicas: rank 0 left its loop for good (the end, or a stop), so a replica
        # still waiting for it must not (workers/replicas.py). In memory, like stop_requested:
        # a stop stored by an earlier driver must not end a resumed run's replicas at start.
        self.training_ended = False
        self.failures: dict[str, set[int]] = {}  # a user-code error's signature -> attempts it ended
        self.gave_up: str | None = None  # set when one signature ended two attempts
        # The journals are replaced by compare-and-swap on the version this ledger last wrote
        # (events: on object stores, where an append is a rewrite): a coordinator that lost the
        # run never rewrites the new owner's from its stale copy.
        self.events, self._journal_versions[EVENTS] = read_journal(storage, EVENTS)
        self._events_stored = len(self.events)  # events up to here are in storage
        self.metrics, self._journal_versions[METRICS] = read_journal(storage, METRICS)
        self.reported: list[dict[str, Any]] = []  # every report of this coordinator's life, in order
        self._reported_rids: set[str | None] = set()
        # The console's story, in memory like `reported`: each restart (with its cause) and each
        # attempt's start, placed by `at` (how many reports came before it), so the driver prints
        # the rows, the restart and the resumed attempt in the order they happened.
        self.notes: list[dict[str, Any]] = []
        self._causes: list[tuple[int, str]] = []  # (attempt, cause) heard first hand since the last restart
        storage.on_retry = self._on_retry
        manifest, self._version = read_manifest_versioned(storage)
        self.manifest: Manifest = manifest or Manifest(run=run)
        if owner is not None:
            self._claim(run, owner)
        elif self.manifest.retention != asdict(retention_cfg):
            self._save(self.manifest.model_copy(update={"retention": asdict(retention_cfg)}))
        self.trackers = Trackers(storage, tracking) if tracking is not None else None
        best = self.best()  # the best committed before this coordinator: a resumed run's best so far
        self.best_at_start = {"epoch": best.epoch, "metrics": best.metrics} if best else None

    def _claim(self, run: str, owner: str) -> None:
        """Make the manifest name this owner, by compare-and-swap, retried while a stale
        writer keeps committing: after this write lands, no stale write can."""
        for _ in range(50):
            held = lease.holder(self.storage)
            if held is None or held.get("token") != owner:
                self.fenced = f"run taken over by {lease.describe(held)}"
                raise LeaseLost(f"{self.storage.uri}: {self.fenced}")
            claimed = self.manifest.model_copy(update={"owner": owner, "retention": asdict(self.cfg)})
            try:
                self.manifest, self._version = write_manifest_if(
                    self.storage, claimed, self._version, self._backup_failed
                )
                return
            except Conflict:
                manifest, self._version = read_manifest_versioned(self.storage)
                self.manifest = manifest or Manifest(run=run)
        raise StorageError(f"{self.storage.uri}: the manifest kept changing; could not claim the run")

    def _check_owner(self) -> None:
        if self.fenced:
            raise LeaseLost(f"{self.storage.uri}: {self.fenced}")

    def fence(self, reason: str) -> None:
        """The driver's heartbeat found the lease taken over: refuse every write from now on."""
        self.fenced = self.fenced or reason

    # -- events and metrics --------------------------------------------------
    def event(self, kind: str, rid: str | None = None, **fields: Any) -> None:
        """Log an event; with a request id, a retried call logs it once."""
        self._check_owner()
        if rid and any(e.get("rid") == rid for e in self.events[-_REMEMBERED:]):
            return
        row = {"ts": round(time.time(), 3), "kind": kind, **fields}
        self.events.append({**row, "rid": rid} if rid else row)
        if self.storage.is_local:  # only the new lines; on object stores append is a rewrite anyway
            new = self.events[self._events_stored :]
            self.storage.append(EVENTS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in new).encode())
        else:
            self.events = self._write_journal(EVENTS, self.events, _merge_events)
        self._events_stored = len(self.events)

    def _answered(self, rid: str | None) -> tuple[bool, Any]:
        """(True, the first answer) when this request was already carried out."""
        if rid and rid in self.manifest.requests:
            return True, self.manifest.requests[rid]
        return False, None

    @staticmethod
    def _remember(m: Manifest, rid: str | None, result: Any) -> Manifest:
        if not rid:
            return m
        kept = list(m.requests.items())[-(_REMEMBERED - 1) :]
        return m.model_copy(update={"requests": {**dict(kept), rid: result}})

    def _on_retry(self, what: str, exc: BaseException, attempt: int, delay: float) -> None:
        # Recorded in memory only: writing events.jsonl here would recurse into the
        # storage that is failing. The next successful event write carries it.
        self.events.append(
            {
                "ts": round(time.time(), 3),
                "kind": "storage_retry",
                "op": what,
                "attempt": attempt,
                "delay_s": round(delay, 3),
                "error": type(exc).__name__,
            }
        )

    def report_metrics(self, row: dict[str, Any], rid: str | None = None) -> None:
        """One row per (epoch) as reported by rank 0; a redone epoch replaces its row (so a
        retried report changes nothing)."""
        self._check_owner()
        if rid is None or rid not in self._reported_rids:
            self.reported.append(row)
            self._reported_rids.add(rid)
        self.metrics = [m for m in self.metrics if m.get("epoch") != row.get("epoch")]
        self.metrics.append(row)
        self.metrics.sort(key=lambda m: m.get("epoch", 0))
        self.metrics = self._write_journal(METRICS, self.metrics, _merge_metrics)
        if self.trackers is not None:
            self.trackers.log(row)
            self._log_tracker_errors()

    def _write_journal(self, rel: str, rows: list[dict[str, Any]], merge: Merge) -> list[dict[str, Any]]:
        """Replace a journal over the version this ledger last wrote; returns what was written.
        When another writer replaced it: a new owner fences this ledger (LeaseLost, nothing
        written); anyone else (repair's event, a lost answer) is merged in and written over."""
        self._confirm_owner()  # a stale ledger whose version still matches (the new owner has not
        # written this journal yet) must not add its rows either
        for _ in range(5):
            try:
                self._journal_versions[rel] = write_journal_if(self.storage, rel, rows,
                                                               self._journal_versions.get(rel))  # fmt: skip
                return rows
            except Conflict:
                self._confirm_owner()
                theirs, self._journal_versions[rel] = read_journal(self.storage, rel)
                rows = merge(theirs, rows)
        raise StorageError(f"{self.storage.child_uri(rel)} kept changing; not written")

    def _log_tracker_errors(self) -> None:
        for name, exc in self.trackers.take_errors() if self.trackers else []:
            self.event("tracker_off", tracker=name, error=self.storage.clean(exc)[:500])

    # -- attempts ------------------------------------------------------------
    def start_attempt(self, world_size: int, rid: str | None = None) -> dict[str, Any]:
        """Called by rank 0 when a worker group starts: count it, collect orphans,
        and say which checkpoint to restore (the latest committed one).

        Idempotent under retry: the event is logged once (by rid), then the manifest records
        the count and the answer in one write; a retry finds the answer there."""
        done, answer = self._answered(rid)
        if done:
            return dict(answer)
        m = self.manifest
        attempt = m.attempts + 1
        latest = m.latest()
        result = {"attempt": attempt, "restore": latest.model_dump() if latest else None}
        self.event(
            "attempt_started",
            rid,
            attempt=attempt,
            world_size=world_size,
            restore=latest.id if latest else None,
            restore_epoch=latest.epoch if latest else None,
        )
        update = {"attempts": attempt, "resumed_from": latest.id if latest else None, "status": "running",
                  "stopped": None}  # fmt: skip
        # The compare-and-swap first: a coordinator whose run was taken over is fenced here,
        # before it could take the new owner's commits for orphans.
        self._save(self._remember(self.manifest.model_copy(update=update), rid, result))
        self.notes.append({"kind": "attempt", "at": len(self.reported), "attempt": attempt,
                           "resumed_from": latest.id if latest else None})  # fmt: skip
        self.collect_orphans()
        return result

    def next_restore(self, after_bad: str, reason: str, rid: str | None = None) -> dict[str, Any] | None:
        """Mark a checkpoint that failed verification bad, and name the next newest good one."""
        self.mark_bad(after_bad, reason)
        latest = self.manifest.latest()
        self._save(self.manifest.model_copy(update={"resumed_from": latest.id if latest else None}))
        return latest.model_dump() if latest else None

    def note_restart(self, reason: str, rid: str | None = None) -> None:
        """Ray Train's controller decided to restart the worker group (counted once per rid)."""
        if self._answered(rid)[0]:
            return
        m = self.manifest
        # A cause heard first hand in the attempt that failed (a chaos kill, the user's exception)
        # beats Ray's summary of it; a late one from an earlier attempt is not this restart's.
        heard = [cause for attempt, cause in self._causes if attempt == m.attempts]
        cause = heard[0] if heard else restart_cause(reason)
        self._causes.clear()
        self.event("restart", rid, restarts=m.restarts + 1, cause=cause, reason=reason[:2000])
        self._save(self._remember(m.model_copy(update={"restarts": m.restarts + 1}), rid, True))
        self.notes.append({"kind": "restart", "at": len(self.reported), "restarts": m.restarts + 1,
                           "cause": cause})  # fmt: skip

    def record_failure(
        self, sig: str, trace: str, attempt: int | None = None, rid: str | None = None
    ) -> None:
        """A rank's exception from user code (workers/failures.py). The same signature (type,
        message, line, epoch and step) ending two attempts is deterministic: the next attempt
        stops the run with this traceback instead of Ray Train spending every restart."""
        if attempt is None:  # failed before its restore plan: Ray Train's restart count tells groups apart
            attempt = -1 - self.manifest.restarts
        self.event("worker_error", rid, signature=sig[:2000], restarts=attempt)
        self._causes.append((self.manifest.attempts if attempt < 0 else attempt, failure_cause(sig)))
        attempts = self.failures.setdefault(sig, set())
        attempts.add(attempt)  # a set: a retried call (same rid) counts once
        if len(attempts) >= 2 and self.gave_up is None:
            self.gave_up = (f"the same error ended {len(attempts)} attempts at the same place, so a "
                            f"restart cannot fix it; the worker's traceback:\n{trace.rstrip()}")  # fmt: skip
            self.event("deterministic_failure", signature=sig[:2000])

    def request_stop(self, reason: str) -> None:
        """The driver was interrupted: the workers save, wait for the commit and stop."""
        if self.stop_requested is None:
            self.stop_requested = reason
            self.event("stop_requested", reason=reason)

    def stop(self, reason: str, kind: StopKind, rid: str | None = None) -> None:
        """The workers stopped the run on purpose: it ends as failed, with reason. kind "input"
        (a spec error found on the workers), "nan" (checkpoint.stop_on_nan) or "interrupt"
        (the driver's request_stop, after a checkpoint was committed)."""
        self.training_ended = True
        self.event("stopped", rid, reason=reason, why=kind)
        earlier = self.manifest.stopped
        if kind == "interrupt" and earlier and earlier["kind"] != "interrupt":
            return  # rank 0 stopping because a replica asked it to: the replica's reason stands
        self._save(self.manifest.model_copy(update={"stopped": {"reason": reason, "kind": kind}}))

    def claim_chaos(
        self, key: str, pid: int | None = None, rid: str | None = None, what: str | None = None
    ) -> bool:
        """True exactly once per key per run (fault injection fires on the first attempt only),
        and True again for a retry of that same claim, so the kill still fires. `what` says it
        for a person (`rank 1 (pid N) SIGKILLed by chaos.kills at epoch 5 step 0`)."""
        done, answer = self._answered(rid)
        if done:
            return bool(answer)
        if key in self.manifest.chaos_fired:
            return False
        self._causes.append((self.manifest.attempts, what or f"SIGKILLed by chaos.kills ({key}, pid {pid})"))
        self.event("chaos_kill", rid, key=key, pid=pid, **({"what": what} if what else {}))
        m = self.manifest.model_copy(update={"chaos_fired": [*self.manifest.chaos_fired, key]})
        self._save(self._remember(m, rid, True))
        return True

    # -- commits and retention -----------------------------------------------
    def commit(self, record: CheckpointRecord) -> dict[str, list[str]]:
        m = self.manifest
        if (done := m.get(record.id)) is not None:  # a retried call after the commit was durable
            if not any(e.get("kind") == "commit" and e.get("id") == done.id for e in self.events):
                # The coordinator that made it durable died before its `commit` line (manifest
                # first, then the event): the run's log names every commit, so log it now.
                kept = list(m.kept.get(done.id, ()))
                self.event("commit", id=done.id, epoch=done.epoch, global_step=done.global_step,
                           metrics=done.metrics, kept=kept, logged="on a retry")  # fmt: skip
            return m.kept
        if record.id in {b.record.id for b in m.bad}:
            raise CommitError(f"checkpoint {record.id} was marked bad; refusing to commit it again")
        if m.attempts and record.attempt != m.attempts:
            # A dead attempt's background writer, finishing late: the attempt that replaced it
            # has collected orphans and may have committed past this point already.
            self._delete(record.id, f"orphan: late commit of attempt {record.attempt}")
            raise CommitError(
                f"checkpoint {record.id}: attempt {record.attempt} is not the current attempt "
                f"{m.attempts}; refusing a late commit"
            )
        if record.sharded and (missing := set(range(record.world_size)) - {f.rank for f in record.files}):
            raise CommitError(f"checkpoint {record.id}: sharded, but it lists no files of rank(s) "
                              f"{sorted(missing)}; it commits only with every rank's part")  # fmt: skip
        stored = read_record(self.storage, record.id)  # written last: the writer finished
        if [f.model_dump() for f in stored.files] != [f.model_dump() for f in record.files]:
            raise CommitError(f"checkpoint {record.id}: {RECORD} in storage differs from the commit")
        self._check_files(record)
        record = record.model_copy(update={"seq": m.next_seq})
        m = m.model_copy(update={"checkpoints": [*m.checkpoints, record], "next_seq": m.next_seq + 1})
        self._apply_retention(m, committed=record)
        return self.manifest.kept

    def _check_files(self, record: CheckpointRecord) -> None:
        """Every file the record lists is in storage with its recorded size: one listing of the
        checkpoint's prefix, not a request per file (a 4,096-rank sharded checkpoint costs a few
        pages). checkpoint.json alone proves only that the writer finished, not that nothing
        deleted its data since (a stale coordinator's orphan collection, a lifecycle rule)."""
        sizes = self.storage.list_sizes(record.dir)
        for f in record.files:
            if f.path not in sizes:
                raise CommitError(f"checkpoint {record.id}: {record.dir}/{f.path}: missing; not committed")
            if sizes[f.path] != f.size:
                raise CommitError(f"checkpoint {record.id}: {record.dir}/{f.path}: size {sizes[f.path]} != "
                                  f"recorded {f.size}; not committed")  # fmt: skip

    def _apply_retention(
        self, m: Manifest, committed: CheckpointRecord | None = None, pins: bool = True
    ) -> None:
        views = [c.view(self.cfg.monitor) for c in m.checkpoints]
        pinned = [m.resumed_from] if pins and m.resumed_from else []
        decision = retention.decide(views, self.cfg.policies(pinned))
        dropped = [c for c in m.checkpoints if c.id in decision.drop]
        m = m.model_copy(
            update={
                "checkpoints": [c for c in m.checkpoints if c.id in decision.keep],
                "kept": {k: list(v) for k, v in decision.keep.items()},
            }
        )
        self._save(m)  # durable before any deletion
        if committed is not None:
            self.event(
                "commit",
                id=committed.id,
                epoch=committed.epoch,
                global_step=committed.global_step,
                metrics=committed.metrics,
                kept=list(decision.keep.get(committed.id, ())),
            )
        if dropped:
            self._confirm_owner()
        for c in dropped:
            self._delete(c.id, "retention")

    def _delete(self, cid: str, why: str) -> None:
        self._check_owner()  # a fenced coordinator deletes nothing
        if self._later_attempt(cid):
            return  # a newer owner's, whatever this coordinator believes
        try:
            self.storage.delete(f"{CHECKPOINTS}/{cid}")
            self.event("delete", id=cid, why=why)
        except Exception as e:  # left for orphan collection at the next attempt start
            self.event("delete_failed", id=cid, why=why, error=self.storage.clean(e))

    def _stale_temp(self, name: str) -> bool:
        """A temp file of an atomic write that a crash interrupted: untouched for 10 minutes by
        the storage's clock (an atomic write renames its temp file within seconds)."""
        try:
            return self.storage.age(name) > 600
        except (OSError, StorageError):
            return False

    def _later_attempt(self, cid: str) -> bool:
        """cid was written by an attempt after this ledger's current one: a newer owner's upload
        or commit. (An unowned ledger with no attempt yet, in tests of the pure logic, knows no
        order; an owned one with no attempt yet wrote nothing, so every numbered one is later.)"""
        written_by, mine = attempt_of(cid), self.manifest.attempts
        if written_by is None or (not mine and self.owner is None):
            return False
        return written_by > mine

    def mark_bad(self, cid: str, reason: str) -> None:
        m = self.manifest
        rec = m.get(cid)
        if rec is None:
            return
        m = m.model_copy(
            update={
                "checkpoints": [c for c in m.checkpoints if c.id != cid],
                "kept": {k: v for k, v in m.kept.items() if k != cid},
                "bad": [*m.bad, BadCheckpoint(record=rec, reason=reason)],
            }
        )
        self._save(m)
        self.event("verification_failed", id=cid, reason=reason)  # why, before anything goes
        self._confirm_owner()
        self._delete(cid, "failed verification")

    def collect_orphans(self) -> list[str]:
        """Delete checkpoint directories no manifest names (uploaded, never committed), and
        the temp files of atomic writes that a crash interrupted. Called only right after a
        manifest write succeeded, so the manifest it compares with is the current one."""
        self._confirm_owner()  # the manifest compared with is the one in storage, and ours
        for name in self.storage.list_dirs(""):
            # The lease's and the clock probe's are the drivers'; a young one may be a live
            # writer's (a new owner's manifest write, if this coordinator stalled right here).
            if ".tmp-" in name and not name.startswith((LEASE, CLOCK_PROBE)) and self._stale_temp(name):
                self.storage.delete(name)
        known = {c.id for c in self.manifest.checkpoints}
        listed = self.storage.list_dirs(CHECKPOINTS)
        orphans = [n for n in listed if n not in known and not self._later_attempt(n)]
        if orphans:
            self._confirm_owner()  # again: the listing may have taken long (thousands of keys)
        for name in orphans:
            self._delete(name, "orphan: never committed")
        return orphans

    def finish(self, status: Literal["finished", "failed"]) -> dict[str, list[str]]:
        """Release the resume pin and leave exactly best-k ∪ latest ∪ milestones."""
        m = self.manifest.model_copy(update={"status": status, "resumed_from": None})
        self._apply_retention(m, pins=False)
        self.collect_orphans()
        self.event("run_" + status, checkpoints=len(self.manifest.checkpoints))
        if self.trackers is not None:
            self.trackers.finish(status)
            self._log_tracker_errors()
        return self.manifest.kept

    def _confirm_owner(self) -> None:
        """Ownership now, not at the last write: the manifest in storage is still the version
        this ledger wrote. A compare-and-swap proves ownership at its instant only; a
        coordinator that stalled since (a GC pause, a partition, a frozen process) and lost the
        run must not act on its stale view. Called before every listing for orphans and
        before each batch of deletes. Without an owner (tests of the pure logic): no check."""
        self._check_owner()
        if self.owner is None:
            return
        current = self.storage.read_versioned(MANIFEST)
        if current is not None and current.version != self._version:
            stored = parse_manifest(self.storage, current.data)
            if stored.owner == self.owner:  # our own write that landed though reported failed (_save)
                self.manifest, self._version = stored, current.version
                raise StorageError(f"{self.storage.uri}: manifest changed by our own earlier write; reloaded")
        if current is None or current.version != self._version:
            self.fenced = f"run taken over by {lease.describe(lease.holder(self.storage))}"
            raise LeaseLost(f"{self.storage.uri}: {self.fenced}; nothing was deleted")

    def _backup_failed(self, error: str) -> None:
        # In memory, like _on_retry: the storage just failed; the next event write carries it.
        self.events.append({"ts": round(time.time(), 3), "kind": "backup_failed", "error": error[:500]})

    def _save(self, m: Manifest) -> None:
        self._check_owner()
        if self.owner is None:
            self.manifest = write_manifest(self.storage, m, self._backup_failed)
            return
        try:
            self.manifest, self._version = write_manifest_if(
                self.storage, m, self._version, self._backup_failed
            )
        except Conflict:
            current, version = read_manifest_versioned(self.storage)
            if current is not None and current.owner == self.owner:
                # Still ours: an earlier write of ours landed though it was reported failed (a
                # lost response past the retry budget). Take storage as the truth; the caller's
                # operation fails once and is retried on it.
                self.manifest, self._version = current, version
                raise StorageError(
                    f"{self.storage.uri}: manifest changed by our own earlier write; reloaded"
                ) from None
            self.fenced = f"run taken over by {lease.describe(lease.holder(self.storage))}"
            raise LeaseLost(f"{self.storage.uri}: {self.fenced}; nothing was deleted") from None

    # -- queries -------------------------------------------------------------
    def best(self) -> CheckpointRecord | None:
        views = [c.view(self.cfg.monitor) for c in self.manifest.checkpoints]
        ranked = retention.rank_best(views, self.cfg.mode)
        return self.manifest.get(ranked[0].id) if ranked else None

    def progress(self, since: int = 0) -> dict[str, Any]:
        """For the driver's progress lines: rows reported since `since`, the best so far."""
        best = self.best()
        return {
            "metrics": self.metrics[-1] if self.metrics else None,
            "new": self.reported[since:],
            "next": len(self.reported),
            "best": best.model_dump() if best else None,
            "restarts": self.manifest.restarts,
            "attempts": self.manifest.attempts,
            "stopped": self.manifest.stopped,
            "fenced": self.fenced,
            "live": self.live,
            "resumed_from": self.manifest.resumed_from,
            # every_n_steps: auto's latest choice (events are few; the newest is near the end)
            "cadence": next((e for e in reversed(self.events[-200:]) if e.get("kind") == "cadence"), None),
            "notes": self.notes,
            "best_at_start": self.best_at_start,
        }


Merge = Callable[[list[dict[str, Any]], list[dict[str, Any]]], list[dict[str, Any]]]


def _merge_events(stored: list[dict[str, Any]], ours: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored rows, then ours that are not among them (a row is its whole content)."""
    seen = {json.dumps(r, sort_keys=True) for r in stored}
    return stored + [r for r in ours if json.dumps(r, sort_keys=True) not in seen]


def _merge_metrics(stored: list[dict[str, Any]], ours: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch, ours where both have it."""
    by_epoch = {r.get("epoch"): r for r in stored} | {r.get("epoch"): r for r in ours}
    return sorted(by_epoch.values(), key=lambda r: r.get("epoch") or 0)


def coordinator_actor_class() -> Any:
    """The Ray actor wrapping a RunLedger (built lazily so this module imports without Ray)."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=1)  # type: ignore[call-overload]
    class Coordinator:
        def __init__(self, storage: Storage, run: str, cfg: RetentionConfig, owner: str | None = None,
                     tracking: dict[str, Any] | None = None) -> None:  # fmt: skip
            self.ledger = RunLedger(storage, run, cfg, owner, tracking)
            self.ledger.event("coordinator_started", pid=_pid())

        def ping(self) -> int:
            return _pid()

        def fence(self, reason: str) -> None:
            self.ledger.fence(reason)

        # Every mutating call takes the caller's request id last: Ray retries a call in flight
        # when the actor restarts (max_task_retries=-1) with the same arguments.
        def start_attempt(self, world_size: int, rid: str | None = None) -> dict[str, Any]:
            return self.ledger.start_attempt(world_size, rid)

        def next_restore(self, bad_id: str, reason: str, rid: str | None = None) -> dict[str, Any] | None:
            return self.ledger.next_restore(bad_id, reason, rid)

        def commit(self, record: dict[str, Any], rid: str | None = None) -> dict[str, list[str]]:
            return self.ledger.commit(CheckpointRecord.model_validate(record))  # idempotent by id

        def report_metrics(self, row: dict[str, Any], rid: str | None = None) -> None:
            self.ledger.report_metrics(row, rid)

        def tick(self, position: dict[str, Any], rid: str | None = None) -> bool:
            """Rank 0's position (in memory only, for the live display); the answer says
            whether the driver asked the workers to stop."""
            self.ledger.live = position
            return self.ledger.stop_requested is not None

        def request_stop(self, reason: str) -> None:
            self.ledger.request_stop(reason)

        def stop_asked(self, rid: str | None = None) -> bool:
            return self.ledger.stop_requested is not None

        def end_training(self, rid: str | None = None) -> None:
            self.ledger.training_ended = True

        def training_ended(self, rid: str | None = None) -> bool:
            return self.ledger.training_ended or self.ledger.fenced is not None

        def record_failure(self, sig: str, trace: str, attempt: int | None = None,
                           rid: str | None = None) -> None:  # fmt: skip
            self.ledger.record_failure(sig, trace, attempt, rid)

        def gave_up(self, rid: str | None = None) -> str | None:
            return self.ledger.gave_up

        def claim_chaos(
            self, key: str, pid: int | None = None, rid: str | None = None, what: str | None = None
        ) -> bool:
            return self.ledger.claim_chaos(key, pid, rid, what)

        def stop(self, reason: str, kind: StopKind, rid: str | None = None) -> None:
            self.ledger.stop(reason, kind, rid)

        def note_restart(self, reason: str, rid: str | None = None) -> None:
            self.ledger.note_restart(reason, rid)

        def event(self, kind: str, fields: dict[str, Any], rid: str | None = None) -> None:
            self.ledger.event(kind, rid, **fields)

        def finish(self, status: str) -> dict[str, list[str]]:
            return self.ledger.finish(status)  # type: ignore[arg-type]

        def progress(self, since: int = 0) -> dict[str, Any]:
            return self.ledger.progress(since)

    return Coordinator


def _pid() -> int:
    import os

    return os.getpid()

"""Commits, retention, bad checkpoints and orphans: what enters the manifest and what is deleted.

Order of durable writes in a commit: the worker has written the files and then
checkpoint.json; we add the record and write the manifest; only after that manifest is
durable do we delete what fell out of retention. Ownership is confirmed before every listing
for orphans and before each batch of deletes, and nothing a later attempt wrote is deleted.
"""

from __future__ import annotations

from orchestrator.coordinator.ownership import Ownership
from orchestrator.coordinator.runlog import RunLog
from orchestrator.core import retention
from orchestrator.core.errors import OrchestratorError
from orchestrator.core.lease import LEASE
from orchestrator.core.manifest import (
    CHECKPOINTS,
    RECORD,
    BadCheckpoint,
    CheckpointRecord,
    Manifest,
    read_record,
)
from orchestrator.core.names import attempt_of
from orchestrator.core.retention import RetentionConfig
from orchestrator.core.storage import CLOCK_PROBE, Storage, StorageError


class CommitError(OrchestratorError, RuntimeError):
    """A commit that cannot be accepted (its files are not all in storage)."""


class Commits:
    """The committed checkpoints of the run: the manifest's list (through `ownership`), the
    retention that trims it, and the deletions that follow, each logged in `log`."""

    def __init__(self, storage: Storage, cfg: RetentionConfig, ownership: Ownership, log: RunLog) -> None:
        self.storage = storage
        self.cfg = cfg
        self._ownership = ownership
        self._log = log

    def commit(self, record: CheckpointRecord) -> dict[str, list[str]]:
        m = self._ownership.manifest
        if (done := m.get(record.id)) is not None:  # a retried call after the commit was durable
            if not self._log.logged("commit", done.id):
                # The coordinator that made it durable died before its `commit` line (manifest
                # first, then the event): the run's log names every commit, so log it now.
                kept = list(m.kept.get(done.id, ()))
                self._log.event(
                    "commit",
                    id=done.id,
                    epoch=done.epoch,
                    global_step=done.global_step,
                    metrics=done.metrics,
                    kept=kept,
                    logged="on a retry",
                )
            return m.kept
        if record.id in {b.record.id for b in m.bad}:
            raise CommitError(f"checkpoint {record.id} was marked bad; refusing to commit it again")
        if m.attempts and record.attempt != m.attempts:
            # A dead attempt's background writer, finishing late: the attempt that replaced it
            # has collected orphans and may have committed past this point already.
            self.delete(record.id, f"orphan: late commit of attempt {record.attempt}")
            raise CommitError(
                f"checkpoint {record.id}: attempt {record.attempt} is not the current attempt "
                f"{m.attempts}; refusing a late commit"
            )
        if record.sharded and (missing := set(range(record.world_size)) - {f.rank for f in record.files}):
            raise CommitError(
                f"checkpoint {record.id}: sharded, but it lists no files of rank(s) "
                f"{sorted(missing)}; it commits only with every rank's part"
            )
        stored = read_record(self.storage, record.id)  # written last: the writer finished
        if [f.model_dump() for f in stored.files] != [f.model_dump() for f in record.files]:
            raise CommitError(f"checkpoint {record.id}: {RECORD} in storage differs from the commit")
        self._check_files(record)
        record = record.model_copy(update={"seq": m.next_seq})
        m = m.model_copy(update={"checkpoints": [*m.checkpoints, record], "next_seq": m.next_seq + 1})
        self.apply_retention(m, committed=record)
        return self._ownership.manifest.kept

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
                raise CommitError(
                    f"checkpoint {record.id}: {record.dir}/{f.path}: size {sizes[f.path]} != "
                    f"recorded {f.size}; not committed"
                )

    def apply_retention(
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
        self._ownership.save(m)  # durable before any deletion
        if committed is not None:
            self._log.event(
                "commit",
                id=committed.id,
                epoch=committed.epoch,
                global_step=committed.global_step,
                metrics=committed.metrics,
                kept=list(decision.keep.get(committed.id, ())),
            )
        if dropped:
            self._ownership.confirm()
        for c in dropped:
            self.delete(c.id, "retention")

    def delete(self, cid: str, why: str) -> None:
        self._ownership.check()  # a fenced coordinator deletes nothing
        if self._later_attempt(cid):
            return  # a newer owner's, whatever this coordinator believes
        try:
            self.storage.delete(f"{CHECKPOINTS}/{cid}")
            self._log.event("delete", id=cid, why=why)
        except Exception as e:  # left for orphan collection at the next attempt start
            self._log.event("delete_failed", id=cid, why=why, error=self.storage.clean(e))

    def _stale_temp(self, name: str) -> bool:
        """A temp file of an atomic write that a crash interrupted: untouched for 10 minutes by
        the storage's clock (an atomic write renames its temp file within seconds)."""
        try:
            return self.storage.age(name) > 600
        except (OSError, StorageError):
            return False

    def _later_attempt(self, cid: str) -> bool:
        """cid was written by an attempt after this coordinator's current one: a newer owner's
        upload or commit. (An unowned coordinator with no attempt yet, in tests of the pure
        logic, knows no order; an owned one with no attempt yet wrote nothing, so every
        numbered one is later.)"""
        written_by, mine = attempt_of(cid), self._ownership.manifest.attempts
        if written_by is None or (not mine and self._ownership.owner is None):
            return False
        return written_by > mine

    def mark_bad(self, cid: str, reason: str) -> None:
        m = self._ownership.manifest
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
        self._ownership.save(m)
        self._log.event("verification_failed", id=cid, reason=reason)  # why, before anything goes
        self._ownership.confirm()
        self.delete(cid, "failed verification")

    def collect_orphans(self) -> list[str]:
        """Delete checkpoint directories no manifest names (uploaded, never committed), and
        the temp files of atomic writes that a crash interrupted. Called only right after a
        manifest write succeeded, so the manifest it compares with is the current one."""
        self._ownership.confirm()  # the manifest compared with is the one in storage, and ours
        for name in self.storage.list_dirs(""):
            # The lease's and the clock probe's are the drivers'; a young one may be a live
            # writer's (a new owner's manifest write, if this coordinator stalled right here).
            if ".tmp-" in name and not name.startswith((LEASE, CLOCK_PROBE)) and self._stale_temp(name):
                self.storage.delete(name)
        known = {c.id for c in self._ownership.manifest.checkpoints}
        listed = self.storage.list_dirs(CHECKPOINTS)
        orphans = [n for n in listed if n not in known and not self._later_attempt(n)]
        if orphans:
            self._ownership.confirm()  # again: the listing may have taken long (thousands of keys)
        for name in orphans:
            self.delete(name, "orphan: never committed")
        return orphans

    def best(self) -> CheckpointRecord | None:
        manifest = self._ownership.manifest
        views = [c.view(self.cfg.monitor) for c in manifest.checkpoints]
        ranked = retention.rank_best(views, self.cfg.mode)
        return manifest.get(ranked[0].id) if ranked else None

"""`orchestrator repair`: a run whose manifest.json cannot be read (damaged, edited by hand into
invalid JSON, deleted) gets a readable one again, from manifest.backup.json.

The backup is the last manifest the coordinator wrote (core/manifest.py writes it right after
each manifest write), or the one before it when a crash came between the two writes. So what
it names is checked against storage before anything is written:

- every checkpoint it names is verified against its record (sizes, sha256); one that fails
  (deleted by retention after the backup was written, or damaged) is moved to `bad`, never
  restored as committed;
- a complete checkpoint directory it does not name, whose record verifies, comes from the
  backup's last attempt or a later one, and lies after the backup's latest commit (by attempt,
  then global step), is adopted: it was committed in a generation the backup missed, or
  uploaded just before a crash, after the last commit (the same history either way). One at or
  before that point was committed and then dropped by retention (a failed delete), or never
  committed: adopting it would give it the newest seq and move the resume point back, so repair
  never does. Anything else is left out, and the next attempt collects it as an orphan;
- the restored manifest replaces the damaged one by compare-and-swap over the damaged bytes,
  under the run's lease (a live driver is refused), and the damaged bytes are kept as
  manifest.damaged.json. Nothing is deleted: the coordinator stays the only deleter.

Plain Python over Storage, like the rest of the core (no Ray, no torch).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from orchestrator.core import retention
from orchestrator.core.errors import EXIT_INPUT, OrchestratorError
from orchestrator.core.lease import Lease
from orchestrator.core.manifest import (
    BACKUP,
    CHECKPOINTS,
    EVENTS,
    MANIFEST,
    BadCheckpoint,
    CheckpointRecord,
    Manifest,
    ManifestError,
    ManifestUnreadable,
    parse_manifest,
    read_record,
    write_manifest_if,
)
from orchestrator.core.names import attempt_of
from orchestrator.core.storage import Conflict, Storage
from orchestrator.core.verify import VerificationError, copy_verified

DAMAGED = "manifest.damaged.json"


class RepairError(OrchestratorError, RuntimeError):
    """The run cannot be repaired from what is in storage; the message says why."""


class NotARun(RepairError):
    """Neither manifest.json nor its backup: not a run directory."""

    exit_code = EXIT_INPUT


@dataclass
class Report:
    """What repair found and did (or, with dry_run, would do)."""

    run_uri: str
    dry_run: bool
    action: str = "none"  # none: manifest.json is readable; restore: it was (or would be) restored
    problem: str | None = None  # why manifest.json could not be read
    backup_generation: int | None = None
    verified: list[str] = field(default_factory=list)  # named by the backup, files match
    bad: list[dict[str, str]] = field(default_factory=list)  # named by the backup, files do not match
    adopted: list[str] = field(default_factory=list)  # complete, not named by the backup
    left_out: list[dict[str, str]] = field(default_factory=list)  # orphans: collected at the next attempt
    generation: int | None = None  # of the manifest written (or that would be)
    damaged_copy: str | None = None  # where the unreadable bytes were kept

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def repair(storage: Storage, dry_run: bool = False) -> Report:
    """Restore manifest.json from its backup when it cannot be read; see the module doc."""
    report = Report(storage.uri, dry_run)
    current = storage.read_versioned(MANIFEST)
    if current is not None:
        try:
            m = parse_manifest(storage, current.data)
            report.generation = m.generation
            return report  # readable: nothing to repair
        except ManifestUnreadable as e:
            report.problem = str(e)
        # A ManifestError that is not ManifestUnreadable (a newer format) is raised: upgrade,
        # never overwrite what a newer version wrote.
    else:
        report.problem = f"{storage.child_uri(MANIFEST)}: missing"
    backup = storage.read_versioned(BACKUP)
    if backup is None:
        if current is None:
            raise NotARun(f"{storage.uri}: no {MANIFEST} and no {BACKUP}; is this a run directory?")
        raise RepairError(
            f"{storage.uri}: {MANIFEST} cannot be read and there is no {BACKUP} to restore it from "
            "(runs started before this version have none); fix the JSON by hand"
        )
    try:
        saved = parse_manifest(storage, backup.data, name=BACKUP)
    except ManifestError as e:
        raise RepairError(f"{e}\nneither {MANIFEST} nor its backup can be read; fix one by hand") from None
    report.action = "restore"
    report.backup_generation = saved.generation
    restored = _reconcile(storage, saved, report)
    report.generation = restored.generation + 1
    if dry_run:
        return report
    lease = Lease(storage)
    lease.acquire()  # LeaseHeld while a live driver owns the run
    try:
        if current is not None:
            storage.write_bytes(DAMAGED, current.data)
            report.damaged_copy = storage.child_uri(DAMAGED)
        try:
            written, _ = write_manifest_if(storage, restored, current.version if current else None)
        except Conflict:
            raise RepairError(
                f"{storage.child_uri(MANIFEST)} changed while it was being repaired; run repair again"
            ) from None
        report.generation = written.generation
        row = {
            "ts": round(time.time(), 3),
            "kind": "repaired",
            "from": BACKUP,
            "backup_generation": saved.generation,
            "generation": written.generation,
            "bad": [b["id"] for b in report.bad],
            "adopted": report.adopted,
            "left_out": [x["id"] for x in report.left_out],
        }
        storage.append(EVENTS, (json.dumps(row, sort_keys=True) + "\n").encode())
    finally:
        lease.release()
    return report


def _reconcile(storage: Storage, saved: Manifest, report: Report) -> Manifest:
    """The backup, checked against storage: what verifies stays, what does not is bad, and
    complete checkpoints of its last attempt that it does not name are adopted."""
    keep: list[CheckpointRecord] = []
    bad = list(saved.bad)
    for rec in sorted(saved.checkpoints, key=lambda c: c.seq):
        try:
            copy_verified(storage, rec, None)  # streamed through the hash, nothing kept
        except VerificationError as e:
            report.bad.append({"id": rec.id, "reason": str(e)})
            bad.append(BadCheckpoint(record=rec, reason=f"repair: {e}"))
            continue
        report.verified.append(rec.id)
        keep.append(rec)
    named = {c.id for c in saved.checkpoints} | {b.record.id for b in saved.bad}
    found: list[CheckpointRecord] = []
    names = storage.list_dirs(CHECKPOINTS)
    for name in names:
        if name in named:
            continue
        why = _adoptable(storage, name, saved)
        if isinstance(why, str):
            report.left_out.append({"id": name, "reason": why})
        else:
            found.append(why)
    next_seq = saved.next_seq
    for rec in sorted(found, key=lambda c: (c.attempt, c.global_step, c.created_at)):
        keep.append(rec.model_copy(update={"seq": next_seq}))
        next_seq += 1
        report.adopted.append(rec.id)
    kept = _kept(saved, keep)
    ids = {c.id for c in keep}
    return saved.model_copy(
        update={
            "checkpoints": keep,
            "bad": bad,
            "kept": kept,
            "next_seq": next_seq,
            # Every attempt seen, adopted or not: the next attempt's number is above all of them,
            # so its orphan collection may collect what they left (it never deletes a later one).
            "attempts": max(
                [saved.attempts, *(c.attempt for c in keep), *filter(None, map(attempt_of, names))]
            ),
            "resumed_from": saved.resumed_from if saved.resumed_from in ids else None,
        }
    )


def _adoptable(storage: Storage, name: str, saved: Manifest) -> CheckpointRecord | str:
    """The record of a checkpoint directory the backup does not name, if it may be adopted;
    else why not."""
    try:
        rec = read_record(storage, name)
    except (FileNotFoundError, ManifestError) as e:
        what = "no checkpoint.json" if isinstance(e, FileNotFoundError) else "checkpoint.json unreadable"
        return f"{what}: an upload that never finished; collected as an orphan at the next attempt"
    if rec.id != name:
        return f"its checkpoint.json names {rec.id!r}; collected as an orphan at the next attempt"
    if rec.attempt < saved.attempts:
        return (
            f"uploaded by attempt {rec.attempt}, before the last attempt ({saved.attempts}) and never "
            "committed; collected as an orphan at the next attempt"
        )
    latest = saved.latest()
    if latest is not None and (rec.attempt, rec.global_step) <= (latest.attempt, latest.global_step):
        return (
            f"attempt {rec.attempt}, step {rec.global_step}: at or before the backup's latest commit "
            f"({latest.id}), so committed and then dropped by retention (its delete failed or never "
            "ran), or never committed; adopting it would move the resume point back. Collected as "
            "an orphan at the next attempt"
        )
    try:
        copy_verified(storage, rec, None)
    except VerificationError as e:
        return f"incomplete or damaged ({e}); collected as an orphan at the next attempt"
    return rec


def _kept(saved: Manifest, keep: list[CheckpointRecord]) -> dict[str, list[str]]:
    """Why each restored checkpoint is kept, by the run's own retention settings; nothing is
    dropped here (the coordinator decides and deletes at its next commit)."""
    old = {k: v for k, v in saved.kept.items()}
    cfg = saved.retention or {}
    names = {f.name for f in fields(retention.RetentionConfig)}
    try:
        policy = retention.RetentionConfig(**{k: v for k, v in cfg.items() if k in names})
    except (TypeError, ValueError):
        return {c.id: old.get(c.id, ["restored by repair"]) for c in keep}
    views = [c.view(policy.monitor) for c in keep]
    decision = retention.decide(views, policy.policies())
    return {c.id: list(decision.keep.get(c.id, ())) or old.get(c.id, ["restored by repair"]) for c in keep}

"""The run's manifest and checkpoint records, as stored in RUN_URI.

Layout of a run:
    RUN_URI/manifest.json               what is committed (only the coordinator writes it)
    RUN_URI/manifest.backup.json        a copy of the last manifest written, for `orchestrator repair`
    RUN_URI/checkpoints/<id>/...        checkpoint files, then checkpoint.json last
    RUN_URI/metrics.jsonl               one line per reported epoch
    RUN_URI/events.jsonl                commits, deletions, restarts, retries, ...
    RUN_URI/spec.yaml                   the spec the run was started with (secrets redacted)
    RUN_URI/lease.json                  which driver owns the run, and its heartbeat
    RUN_URI/logs/rank-<r>-attempt-<a>.log   each rank's output in each attempt (workers/rank_log.py)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.core.errors import StorageProblem
from orchestrator.core.retention import Ckpt
from orchestrator.core.storage import Conflict, Storage

MANIFEST = "manifest.json"
BACKUP = "manifest.backup.json"
CHECKPOINTS = "checkpoints"
RECORD = "checkpoint.json"
# A checkpoint's extra files (a tokenizer, a config: session.report(extra_files=...)) live under
# checkpoints/<id>/extras/, each listed in the record like the state's files.
EXTRAS_DIR = "extras"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
SPEC = "spec.yaml"
LOGS = "logs"  # every rank's output, per attempt (workers/rank_log.py)
FORMAT = 1
# Every kind of event a run's events.jsonl holds (`orchestrator events --kind`).
EVENT_KINDS = (
    "attempt_started",
    "backup_failed",
    "cadence",
    "chaos_kill",
    "commit",
    "coordinator_started",
    "delete",
    "delete_failed",
    "deterministic_failure",
    "driver_started",
    "early_stop",
    "lease_taken_over",
    "repaired",
    "replica_skipped",
    "restart",
    "run_failed",
    "run_finished",
    "shared_copy_damaged",
    "shared_copy_healed",
    "stop_requested",
    "stopped",
    "storage_retry",
    "tracker_off",
    "verification_failed",
    "worker_error",
)


# Why the workers ended a run on purpose (Manifest.stopped["kind"]): a spec error found on the
# workers, a non-finite metric with checkpoint.stop_on_nan, the driver's interrupt (Ctrl-C,
# SIGTERM) after a checkpoint was committed, or the same user error twice.
StopKind = Literal["input", "nan", "interrupt", "user_error"]


class ManifestError(StorageProblem, RuntimeError):
    """The manifest (or a record) in storage cannot be read as one."""


class ManifestUnreadable(ManifestError):
    """manifest.json is there but is not a manifest (not JSON, wrong fields): damaged, or
    edited by hand. `orchestrator repair` restores it from manifest.backup.json."""


class FileEntry(BaseModel):
    path: str  # relative to the checkpoint's directory
    size: int
    sha256: str
    rank: int | None = None  # the rank that wrote it, in a sharded checkpoint (workers/sharded.py)


# NaN and inf metrics are written as the JSON constants NaN / Infinity, which Python's json
# and pydantic both read back: the default (null) would make a diverged run unreadable.
_ROUND_TRIP = ConfigDict(extra="ignore", ser_json_inf_nan="constants")


class CheckpointRecord(BaseModel):
    """checkpoint.json: written after the data; lists what a complete checkpoint holds."""

    model_config = _ROUND_TRIP

    id: str
    epoch: int  # 1-based epoch the checkpoint was taken in
    step_in_epoch: int  # steps of that epoch already trained
    global_step: int
    end_of_epoch: bool
    metrics: dict[str, float] = Field(default_factory=dict)
    metrics_fresh: bool = True  # measured on these weights, not carried over (retention.metrics_fresh)
    files: list[FileEntry]
    world_size: int
    attempt: int
    sharded: bool = False  # every rank wrote its own shards (DCP); files lists every rank's
    created_at: float = Field(default_factory=time.time)
    seq: int = 0  # commit order, assigned by the coordinator

    @property
    def dir(self) -> str:
        return f"{CHECKPOINTS}/{self.id}"

    @property
    def extra_files(self) -> set[str]:
        """The paths of its extra files (extras/<name>: session.report(extra_files=...))."""
        return {f.path for f in self.files if f.path.startswith(EXTRAS_DIR + "/")}

    def view(self, monitor: str) -> Ckpt:
        value = self.metrics.get(monitor) if self.metrics_fresh else None
        return Ckpt(self.id, self.seq, self.epoch, self.end_of_epoch, value)


class BadCheckpoint(BaseModel):
    record: CheckpointRecord
    reason: str
    marked_at: float = Field(default_factory=time.time)


class Manifest(BaseModel):
    model_config = _ROUND_TRIP

    format: int = FORMAT
    generation: int = 0
    run: str
    # monitor, mode, top_k, keep_latest, keep_every_n_epochs: what read-only commands rank
    # by, so reading a run never imports user code and never guesses.
    retention: dict[str, Any] | None = None
    owner: str | None = None  # lease token of the driver whose coordinator writes this manifest
    # request id -> result of the latest mutating coordinator calls: a call retried after the
    # actor restarted gets the first answer instead of counting twice.
    requests: dict[str, Any] = Field(default_factory=dict)
    stopped: dict[str, str] | None = None  # {reason, kind: a StopKind}: the workers stopped the run
    next_seq: int = 1
    checkpoints: list[CheckpointRecord] = Field(default_factory=list)  # committed, in commit order
    kept: dict[str, list[str]] = Field(default_factory=dict)  # id -> why it is kept
    bad: list[BadCheckpoint] = Field(default_factory=list)
    attempts: int = 0
    restarts: int = 0
    replacements: int = 0  # of the restarts, replicas replaced alone (failure.mode replicas)
    chaos_fired: list[str] = Field(default_factory=list)
    resumed_from: str | None = None  # protected from deletion until the run ends
    status: Literal["running", "finished", "failed"] = "running"
    updated_at: float = Field(default_factory=time.time)

    @field_validator("retention")
    @classmethod
    def _ranks_by_something(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # Readers rank by these two; a manifest without them would be read as a KeyError.
        if v and not (isinstance(v.get("monitor"), str) and v.get("mode") in ("min", "max")):
            raise ValueError("needs 'monitor' (a metric name) and 'mode' ('min' or 'max')")
        return v

    def get(self, cid: str) -> CheckpointRecord | None:
        return next((c for c in self.checkpoints if c.id == cid), None)

    def latest(self) -> CheckpointRecord | None:
        return max(self.checkpoints, key=lambda c: c.seq, default=None)


def read_manifest(storage: Storage) -> Manifest | None:
    if not storage.exists(MANIFEST):
        return None
    return _with_hint(storage, storage.read_bytes(MANIFEST))


def read_manifest_versioned(storage: Storage) -> tuple[Manifest | None, str | None]:
    """The manifest and the version a compare-and-swap must name to replace it."""
    v = storage.read_versioned(MANIFEST)
    return (_with_hint(storage, v.data), v.version) if v else (None, None)


def _with_hint(storage: Storage, raw: bytes) -> Manifest:
    """parse_manifest; an unreadable manifest's error says how to recover. Never a silent
    fallback to the backup: docs/operations.md#a-damaged-manifest says why."""
    try:
        return parse_manifest(storage, raw)
    except ManifestUnreadable as e:
        raise ManifestUnreadable(
            f"{e}\nThe run is not lost: `orchestrator repair {storage.uri}` restores the last manifest "
            f"the coordinator wrote ({BACKUP}) and verifies its checkpoints (--dry-run shows what it "
            "would do)."
        ) from None


def parse_manifest(storage: Storage, raw: bytes, name: str = MANIFEST) -> Manifest:
    where = storage.child_uri(name)
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise ManifestUnreadable(f"{where}: not a valid manifest: JSON nested too deeply") from None
    except ValueError as e:  # not JSON, not UTF-8, an integer past Python's 4300 digits
        raise ManifestUnreadable(f"{where}: not a valid manifest: not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ManifestUnreadable(f"{where}: not a valid manifest: a JSON {type(doc).__name__}, not an object")
    fmt = doc.get("format", FORMAT)
    if isinstance(fmt, int) and fmt > FORMAT:
        raise ManifestError(
            f"{where}: manifest format {fmt} is newer than this version of the tool reads "
            f"({FORMAT}); upgrade ray-orchestrator to read this run"
        )
    try:
        return Manifest.model_validate_json(raw)
    except (ValueError, RecursionError) as e:  # pydantic's ValidationError is a ValueError
        raise ManifestUnreadable(f"{where}: not a valid manifest: {e}") from None


BackupFailed = Callable[[str], None]  # told why a backup write failed (the ledger: an event)


def write_manifest(
    storage: Storage, manifest: Manifest, on_backup_failed: BackupFailed | None = None
) -> Manifest:
    """Bump the generation and replace the manifest atomically; return what was written."""
    new = _next(manifest)
    data = new.model_dump_json(indent=1).encode()
    storage.write_bytes(MANIFEST, data)
    _backup(storage, data, on_backup_failed)
    return new


def write_manifest_if(
    storage: Storage, manifest: Manifest, expect: str | None, on_backup_failed: BackupFailed | None = None
) -> tuple[Manifest, str]:
    """write_manifest, but only over version `expect` (None: only where there is none);
    raises storage.Conflict when another writer replaced it. Returns what was written."""
    new = _next(manifest)
    data = new.model_dump_json(indent=1).encode()
    version = storage.write_if(MANIFEST, data, expect)
    _backup(storage, data, on_backup_failed)
    return new, version


def _backup(storage: Storage, data: bytes, on_failed: BackupFailed | None) -> None:
    """Copy a manifest that is now durable to manifest.backup.json. Written after the manifest
    (never before: a backup must not hold a generation that did not land), so it is the last
    generation written, or an older one when a crash or a storage error came between the two
    writes; `orchestrator repair` handles both. A failed copy does not fail the commit (it is
    durable already; the next manifest write brings the copy up to date), but it is said."""
    error = backup_manifest(storage, data)
    if error is not None and on_failed is not None:
        on_failed(error)


def backup_manifest(storage: Storage, data: bytes) -> str | None:
    """Write `data` (a manifest just written) as the backup unless the stored backup holds the
    same or a newer generation, by compare-and-swap: a coordinator that stalled between its
    manifest write and this one, and lost the run meanwhile, never replaces the new owner's
    backup with its older generation. Returns why the write failed, or None."""
    generation = json.loads(data).get("generation", 0)
    try:
        for _ in range(3):  # a conflict: another writer in between; look again
            current = storage.read_versioned(BACKUP)
            if current is not None and _generation(current.data) >= generation:
                return None  # a newer owner's (or our own retried) backup: leave it
            try:
                storage.write_if(BACKUP, data, current.version if current else None)
                return None
            except Conflict:
                continue
        return f"{BACKUP} kept changing under this writer"
    except Exception as e:  # noqa: BLE001  # storage trouble: reported, the next write tries again
        return storage.clean(e)


def _generation(raw: bytes) -> int:
    """A stored backup's generation; -1 for one that cannot be read (any write may replace it)."""
    try:
        gen = json.loads(raw).get("generation", -1)
        return gen if isinstance(gen, int) else -1
    except (ValueError, AttributeError, RecursionError):
        return -1


def _next(manifest: Manifest) -> Manifest:
    return manifest.model_copy(update={"generation": manifest.generation + 1, "updated_at": time.time()})


def read_record(storage: Storage, cid: str) -> CheckpointRecord:
    raw = storage.read_bytes(f"{CHECKPOINTS}/{cid}/{RECORD}")
    try:
        return CheckpointRecord.model_validate_json(raw)
    except (ValueError, RecursionError) as e:  # pydantic's ValidationError is a ValueError
        raise ManifestError(f"{storage.child_uri(CHECKPOINTS)}/{cid}/{RECORD}: {e}") from None


def read_jsonl(storage: Storage, rel: str) -> list[dict[str, Any]]:
    if not storage.exists(rel):
        return []
    return parse_jsonl(storage.read_bytes(rel))


def read_journal(storage: Storage, rel: str) -> tuple[list[dict[str, Any]], str | None]:
    """A JSON-lines file's rows and the version a compare-and-swap must name to replace it."""
    v = storage.read_versioned(rel)
    return (parse_jsonl(v.data), v.version) if v else ([], None)


def write_journal_if(storage: Storage, rel: str, rows: list[dict[str, Any]], expect: str | None) -> str:
    """Replace a JSON-lines file only over version `expect` (storage.Conflict otherwise)."""
    return storage.write_if(rel, _jsonl(rows), expect)


def parse_jsonl(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if line:
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a torn last line from a local crash: skip it, keep the rest
            if isinstance(row, dict):
                out.append(row)
    return out


def write_jsonl(storage: Storage, rel: str, rows: list[dict[str, Any]]) -> None:
    storage.write_bytes(rel, _jsonl(rows))


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()

"""The shared copy of a checkpoint that a restore took from the node-local tier: checked in
the background, and healed from this node's verified copy when it is damaged.

A restore served from this node's copy (orchestrator/core/node_cache.py) never reads shared
storage, and shared storage holds the only copy that outlives the node: damage there would go
unseen until the node is gone, and the checkpoint with it. So after such a restore rank 0
starts a daemon thread (start_shared_check) that

  1. holds this node's copy (hard links: a commit that replaces the copy meanwhile does not
     change what is held);
  2. checks every file of the shared copy against the record: its size, then the store's own
     sha256 where it keeps one, else a streamed read through sha256 (verify.check_stored);
  3. for each file that does not match: logs shared_copy_damaged (id, file, why), checks the
     held file against the record, rewrites the shared file from it through the storage
     layer's atomic write (Storage.put_file), checks it again, and logs shared_copy_healed.
     A file it cannot heal is logged again as shared_copy_damaged, with healed: false and why.

Never on the restore's path, never its failure: any error ends the thread with a line in the
worker's log. The coordinator is the only deleter, and it writes the manifest before it deletes:
a checkpoint the manifest no longer names is left alone, and a file is rewritten only while the
manifest names it and its checkpoint.json is still in shared storage, so a deleted checkpoint is
never brought back (a file rewritten at the very instant of a deletion is an orphan, which the
next orphan collection removes). Where no good copy exists anywhere (the tier off, or this
node's copy damaged too) the restore itself reads shared storage, fails verification, and the
checkpoint is marked bad and the previous one used (workers/resume.py).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from orchestrator.core.errors import OrchestratorError
from orchestrator.core.manifest import RECORD, CheckpointRecord, read_manifest
from orchestrator.core.storage import Storage, StorageError
from orchestrator.core.verify import Damage, check_stored

log = logging.getLogger(__name__)

# (kind, fields): an event in the run's log (on the workers: the coordinator's `event`).
Report = Callable[[str, dict[str, Any]], object]


class Unhealable(OrchestratorError, RuntimeError):
    """A damaged shared file that cannot be rewritten from a good copy (the message says why)."""


def start_shared_check(storage: Storage, record: CheckpointRecord, report: Report) -> threading.Thread:
    """Check (and heal) record's shared copy in a daemon thread; returns the started thread."""
    t = threading.Thread(
        target=_check_quietly, args=(storage, record, report), name=f"shared-check-{record.id}", daemon=True
    )
    t.start()
    return t


def _check_quietly(storage: Storage, record: CheckpointRecord, report: Report) -> None:
    try:
        outcome = check_and_heal(storage, record, report)
        log.info(f"[restore] {record.id}: shared copy checked in the background: {outcome}")
    except Exception as e:  # storage down, manifest unreadable: the restore is not affected
        log.info(
            f"[restore] {record.id}: checking the shared copy failed, left as it is: {type(e).__name__}: {e}"
        )


def check_and_heal(storage: Storage, record: CheckpointRecord, report: Report) -> str:
    """Check record's shared copy, healing each damaged file from this node's copy. Returns
    "ok" (every file matches), "healed", "damaged" (some file could not be healed) or "gone"
    (the coordinator no longer keeps the checkpoint: nothing reported, nothing rewritten)."""
    near = getattr(storage, "node_cache", None)
    source = near.hold(record) if near is not None else None
    try:
        damaged = check_stored(storage, record)
        if not damaged:
            return "ok"
        if _not_committed(storage, record, need_record=False):
            return "gone"
        send = _logged(report, record.id)
        healed = [_heal_file(storage, record, d, source, send) for d in damaged]
        return "healed" if all(healed) else "damaged"
    finally:
        if near is not None:
            near.release()


def _heal_file(
    storage: Storage, record: CheckpointRecord, d: Damage, source: str | None, send: Report
) -> bool:
    fields = {"id": record.id, "file": d.file, "why": d.why, "epoch": record.epoch}
    send("shared_copy_damaged", fields)
    log.info(f"[restore] {record.id}: shared copy of {d.file} damaged ({d.why}); healing it")
    try:
        if source is None:
            raise Unhealable("this node holds no copy of it")
        local = _verified_local(storage, record, d.file, source)
        if why := _not_committed(storage, record):
            raise Unhealable(f"{why}; not rewritten")
        storage.put_file(local, f"{record.dir}/{d.file}")  # atomic: the old bytes or the new
        if again := check_stored(storage, record, only={d.file}):
            raise Unhealable(f"rewritten, and still {again[0].why}")
    except (Unhealable, OSError, StorageError) as e:
        send("shared_copy_damaged", {**fields, "healed": False, "error": str(e)})
        log.info(f"[restore] {record.id}: shared copy of {d.file} not healed: {e}")
        return False
    send("shared_copy_healed", {**fields, "source": f"node-local copy on {socket.gethostname()}"})
    log.info(f"[restore] {record.id}: shared copy of {d.file} healed from this node's copy")
    return True


def _verified_local(storage: Storage, record: CheckpointRecord, name: str, source: str) -> str:
    """The held local file's path, once its size and sha256 match the record."""
    near = storage.node_cache
    entry = next(f for f in record.files if f.path == name)
    rel = f"{source}/{name}"
    try:
        got = near.storage.download(rel, None)
    except FileNotFoundError:
        raise Unhealable("this node's copy of it is gone") from None
    if got != (entry.size, entry.sha256):
        raise Unhealable("this node's copy of it no longer matches the record either")
    return str(near.storage.path(rel))


def _not_committed(storage: Storage, record: CheckpointRecord, need_record: bool = True) -> str | None:
    """Why the coordinator no longer keeps record (None while it does): the manifest, written
    before any deletion, no longer names it, or (need_record) its checkpoint.json is gone."""
    m = read_manifest(storage)
    if m is None or m.get(record.id) is None:
        return "the manifest no longer names it (deleted by retention, or marked bad)"
    if need_record and not storage.exists(f"{record.dir}/{RECORD}"):
        return f"its {RECORD} is gone from shared storage (the coordinator is deleting it)"
    return None


def _logged(report: Report, cid: str) -> Report:
    """report, whose failure (the coordinator restarting, gone) is a line in the log, not an error."""

    def send(kind: str, fields: dict[str, Any]) -> None:
        try:
            report(kind, fields)
        except Exception as e:
            log.info(f"[restore] {cid}: could not log {kind} while checking the shared copy: {e}")

    return send

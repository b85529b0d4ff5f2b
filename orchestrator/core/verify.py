"""Reading a committed checkpoint back, verified against its record.

Plain bytes in, plain bytes out: what the bytes mean (torch tensors, safetensors) is
the data plane's business, so this module needs neither torch nor Ray.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.core.errors import OrchestratorError
from orchestrator.core.manifest import CHECKPOINTS, CheckpointRecord, FileEntry
from orchestrator.core.storage import LocalIOError, Storage, StorageError, sha256_hex

log = logging.getLogger(__name__)


class VerificationError(OrchestratorError, RuntimeError):
    """A checkpoint's files do not match its record (missing, truncated, corrupted)."""


class CheckpointRefused(VerificationError):
    """A checkpoint file that matches its record but is not plain tensors (a pickle that names
    code, such as a `__reduce__` payload): weights-only loading refused it, and nothing in it
    ran. This project never writes such a file; the run's storage was written by someone else."""


@dataclass(frozen=True)
class Damage:
    """One file of a checkpoint as storage holds it that does not match its record."""

    file: str  # its path in the checkpoint's directory
    why: str  # missing, size x != recorded y, sha256 ... != recorded ...


def read_verified(
    storage: Storage,
    record: CheckpointRecord,
    on_local: Callable[[CheckpointRecord], object] | None = None,
) -> dict[str, bytes]:
    """Every file of the checkpoint, checked against the sizes and sha256 in its record.

    With a node-local tier (storage.node_cache, set on the workers), this node's copy is read
    first and used only if every file matches the record; otherwise shared storage is read,
    verified, and kept as this node's copy for the next restore. on_local(record) is called
    when this node's copy served the restore, whose shared copy then went unread (rank 0
    starts a check of it: orchestrator/core/heal.py); it can neither fail nor stop the restore."""
    near = getattr(storage, "node_cache", None)
    if near is not None and near.has(record.id):
        try:
            blobs = _read_verified(near.storage, record)
            log.info(f"[restore] {record.id}: node-local copy matches its record ({near.dir})")
        except (VerificationError, OSError, StorageError) as e:
            log.info(f"[restore] {record.id}: node-local copy not used ({e}); reading {storage.uri}")
        else:
            if on_local is not None:
                try:
                    on_local(record)
                except Exception as e:  # the restore has its verified bytes: it goes on
                    log.info(f"[restore] {record.id}: could not start checking the shared copy: {e}")
            return blobs
    blobs = _read_verified(storage, record)
    if near is not None:
        try:
            near.keep(record, blobs)
        except (OSError, StorageError) as e:  # a full local disk costs the next restore a download
            log.info(f"[restore] could not keep a node-local copy in {near.dir}: {e}")
    return blobs


def _read_verified(storage: Storage, record: CheckpointRecord) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for f in record.files:
        rel = f"{CHECKPOINTS}/{record.id}/{f.path}"
        try:
            data = storage.read_bytes(rel)
        except FileNotFoundError:
            raise VerificationError(f"{rel}: missing") from None
        if len(data) != f.size:
            raise VerificationError(f"{rel}: size {len(data)} != recorded {f.size}")
        digest = sha256_hex(data)
        if digest != f.sha256:
            raise VerificationError(f"{rel}: sha256 {digest[:12]}… != recorded {f.sha256[:12]}…")
        out[f.path] = data
    return out


def copy_verified(
    storage: Storage, record: CheckpointRecord, dest: str | None, only: set[str] | None = None
) -> list[str]:
    """Stream the checkpoint's files (or `only` those) into the local directory dest (or just
    through the hash, dest=None), checked against the record; never held in memory whole.
    A file that does not match is removed and VerificationError raised, and so are the files
    this call wrote before it: a caller that falls back to another checkpoint (best
    --download, a restore) must not find this one's files beside the other's. A record path
    that would land outside dest is refused. Returns the paths."""
    written: list[str] = []
    try:
        for f in record.files:
            if only is not None and f.path not in only:
                continue
            if (target := _target(dest, f.path, record.id)) is not None:
                written.append(target)  # removed on a failure below, whatever it wrote
            _fetch_checked(storage, record, f, target)
    except VerificationError:
        for path in written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise
    return written


def inside(root: str, path: str) -> str | None:
    """root/path, or None where a record's path ("../x", written by someone else, never by this
    project) would land outside root: every local copy of a checkpoint's files checks it."""
    target = os.path.join(root, path)
    real = os.path.realpath(root)
    return target if os.path.commonpath([real, os.path.realpath(target)]) == real else None


def _target(dest: str | None, path: str, cid: str) -> str | None:
    if not dest:
        return None
    if (target := inside(dest, path)) is None:
        raise VerificationError(
            f"{CHECKPOINTS}/{cid}: file {path!r} points outside the checkpoint's directory"
        )
    os.makedirs(os.path.dirname(target), exist_ok=True)
    return target


def _fetch_checked(storage: Storage, record: CheckpointRecord, f: FileEntry, target: str | None) -> None:
    rel = f"{CHECKPOINTS}/{record.id}/{f.path}"
    try:
        size, digest = storage.download(rel, target)
    except LocalIOError:
        raise  # this node's disk, not the stored copy: never a reason to mark it bad
    except FileNotFoundError:
        raise VerificationError(f"{rel}: missing") from None
    if (size, digest) != (f.size, f.sha256):
        what = f"size {size} != recorded {f.size}" if size != f.size else f"sha256 {digest[:12]}… != recorded"
        raise VerificationError(f"{rel}: {what}")


def check_stored(storage: Storage, record: CheckpointRecord, only: set[str] | None = None) -> list[Damage]:
    """What of the checkpoint's files (or `only` those) storage holds differently from the
    record; empty when every one matches. Nothing is kept in memory: each file's size is
    looked up first, then its content hash is the store's own sha256 where it keeps one
    (S3 objects uploaded with a SHA256 checksum), else a streamed read through sha256.
    Storage errors other than a missing file are raised (nothing can be said then)."""
    out: list[Damage] = []
    for f in record.files:
        if only is None or f.path in only:
            why = _check_stored_file(storage, f"{CHECKPOINTS}/{record.id}/{f.path}", f)
            if why is not None:
                out.append(Damage(f.path, why))
    return out


def _check_stored_file(storage: Storage, rel: str, f: FileEntry) -> str | None:
    try:
        size, digest = _stat(storage, rel)
        if size == f.size and digest is None:
            size, digest = storage.download(rel, None)
    except FileNotFoundError:
        return "missing"
    if size != f.size:
        return f"size {size} != recorded {f.size}"
    if digest != f.sha256:
        return f"sha256 {(digest or '')[:12]}… != recorded {f.sha256[:12]}…"
    return None


def _stat(storage: Storage, rel: str) -> tuple[int, str | None]:
    """rel's size, and its sha256 (hex) where the store keeps one for the whole object."""
    path = storage.path(rel)

    def head() -> tuple[int, str | None]:
        if not storage.is_s3:
            if not storage.is_local:
                storage.fs.invalidate_cache(path)
            return int(storage.fs.size(path)), None
        bucket, key, _ = storage.fs.split_path(path)
        out = storage.fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        stored = out.get("ChecksumSHA256")
        # A multipart upload's checksum is one of its parts' checksums ("...-N"): not the file's.
        whole = stored and "-" not in stored and out.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
        return int(out["ContentLength"]), base64.b64decode(stored).hex() if whole else None

    return storage._call(f"stat {rel}", head)  # the storage layer's retries and error handling

"""Reading a committed checkpoint back, verified against its record.

Plain bytes in, plain bytes out: what the bytes mean (torch tensors, safetensors) is
the data plane's business, so this module needs neither torch nor Ray.
"""

from __future__ import annotations

from orchestrator.core.manifest import CHECKPOINTS, CheckpointRecord
from orchestrator.core.storage import Storage, StorageError, sha256_hex


class VerificationError(RuntimeError):
    """A checkpoint's files do not match its record (missing, truncated, corrupted)."""


class CheckpointRefused(VerificationError):
    """A checkpoint file that matches its record but is not plain tensors (a pickle that names
    code, such as a `__reduce__` payload): weights-only loading refused it, and nothing in it
    ran. This project never writes such a file; the run's storage was written by someone else."""


def read_verified(storage: Storage, record: CheckpointRecord) -> dict[str, bytes]:
    """Every file of the checkpoint, checked against the sizes and sha256 in its record.

    With a node-local tier (storage.node_cache, set on the workers), this node's copy is read
    first and used only if every file matches the record; otherwise shared storage is read,
    verified, and kept as this node's copy for the next restore."""
    near = getattr(storage, "node_cache", None)
    if near is not None and near.has(record.id):
        try:
            blobs = _read_verified(near.storage, record)
            print(f"[restore] {record.id}: node-local copy matches its record ({near.dir})", flush=True)
            return blobs
        except (VerificationError, OSError, StorageError) as e:
            print(f"[restore] {record.id}: node-local copy not used ({e}); reading {storage.uri}", flush=True)
    blobs = _read_verified(storage, record)
    if near is not None:
        try:
            near.keep(record, blobs)
        except (OSError, StorageError) as e:  # a full local disk costs the next restore a download
            print(f"[restore] could not keep a node-local copy in {near.dir}: {e}", flush=True)
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
    A file that does not match is removed and VerificationError raised. Returns the paths."""
    import os

    written: list[str] = []
    for f in record.files:
        if only is not None and f.path not in only:
            continue
        rel = f"{CHECKPOINTS}/{record.id}/{f.path}"
        target = os.path.join(dest, f.path) if dest else None
        if target:
            os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            size, digest = storage.download(rel, target)
        except FileNotFoundError:
            raise VerificationError(f"{rel}: missing") from None
        if (size, digest) != (f.size, f.sha256):
            if target:
                os.unlink(target)
            what = (
                f"size {size} != recorded {f.size}"
                if size != f.size
                else f"sha256 {digest[:12]}… != recorded"
            )
            raise VerificationError(f"{rel}: {what}")
        if target:
            written.append(target)
    return written

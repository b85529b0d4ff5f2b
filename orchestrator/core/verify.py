"""Reading a committed checkpoint back, verified against its record.

Plain bytes in, plain bytes out: what the bytes mean (torch tensors, safetensors) is
the data plane's business, so this module needs neither torch nor Ray.
"""

from __future__ import annotations

from orchestrator.core.manifest import CHECKPOINTS, CheckpointRecord
from orchestrator.core.storage import Storage, sha256_hex


class VerificationError(RuntimeError):
    """A checkpoint's files do not match its record (missing, truncated, corrupted)."""


def read_verified(storage: Storage, record: CheckpointRecord) -> dict[str, bytes]:
    """Every file of the checkpoint, checked against the sizes and sha256 in its record."""
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

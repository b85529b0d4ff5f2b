"""Reading a committed checkpoint back, verified against its record."""

from __future__ import annotations

import io
from typing import Any

import torch

from orchestrator.manifest import CHECKPOINTS, CheckpointRecord
from orchestrator.storage import Storage, sha256_hex


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


def load_tensor_file(data: bytes, device: str | torch.device = "cpu") -> Any:
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)

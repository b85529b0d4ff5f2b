"""Claiming and fencing the run: the manifest, and the only way it is written.

With `owner` (the driver's lease token) every manifest write is a compare-and-swap on the
version this coordinator last wrote: once another driver has taken the run over, the first
write that finds the manifest changed raises LeaseLost, and nothing is deleted after it.
Without an owner (tests of the pure logic) writes are plain replaces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from orchestrator.core import lease
from orchestrator.core.lease import LeaseLost
from orchestrator.core.manifest import (
    MANIFEST,
    Manifest,
    parse_manifest,
    read_manifest_versioned,
    write_manifest,
    write_manifest_if,
)
from orchestrator.core.retention import RetentionConfig
from orchestrator.core.storage import Conflict, Storage, StorageError

REMEMBERED = 200  # request ids (and their answers) kept for retried calls


class Ownership:
    """The run's manifest as this coordinator last wrote it, its version, and whether this
    coordinator may still write (`fenced` says why not)."""

    def __init__(self, storage: Storage, owner: str | None) -> None:
        self.storage = storage
        self.owner = owner
        self.fenced: str | None = None  # why this coordinator may no longer write
        self.manifest: Manifest = Manifest(run="")
        self.version: str | None = None
        self.backup_failed: Callable[[str], None] = lambda error: None

    def open(self, run: str, cfg: RetentionConfig, backup_failed: Callable[[str], None]) -> None:
        """Read the manifest, then claim it for the owner (or record the retention settings)."""
        self.backup_failed = backup_failed
        manifest, self.version = read_manifest_versioned(self.storage)
        self.manifest = manifest or Manifest(run=run)
        if self.owner is not None:
            self._claim(run, self.owner, cfg)
        elif self.manifest.retention != asdict(cfg):
            self.save(self.manifest.model_copy(update={"retention": asdict(cfg)}))

    def _claim(self, run: str, owner: str, cfg: RetentionConfig) -> None:
        """Make the manifest name this owner, by compare-and-swap, retried while a stale
        writer keeps committing: after this write lands, no stale write can."""
        for _ in range(50):
            held = lease.holder(self.storage)
            if held is None or held.get("token") != owner:
                self.fenced = f"run taken over by {lease.describe(held)}"
                raise LeaseLost(f"{self.storage.uri}: {self.fenced}")
            claimed = self.manifest.model_copy(update={"owner": owner, "retention": asdict(cfg)})
            try:
                self.manifest, self.version = write_manifest_if(
                    self.storage, claimed, self.version, self.backup_failed
                )
                return
            except Conflict:
                manifest, self.version = read_manifest_versioned(self.storage)
                self.manifest = manifest or Manifest(run=run)
        raise StorageError(f"{self.storage.uri}: the manifest kept changing; could not claim the run")

    def check(self) -> None:
        if self.fenced:
            raise LeaseLost(f"{self.storage.uri}: {self.fenced}")

    def fence(self, reason: str) -> None:
        """The driver's heartbeat found the lease taken over: refuse every write from now on."""
        self.fenced = self.fenced or reason

    def confirm(self) -> None:
        """Ownership now, not at the last write: the manifest in storage is still the version
        this coordinator wrote. A compare-and-swap proves ownership at its instant only; a
        coordinator that stalled since (a GC pause, a partition, a frozen process) and lost the
        run must not act on its stale view. Called before every listing for orphans and
        before each batch of deletes. Without an owner (tests of the pure logic): no check."""
        self.check()
        if self.owner is None:
            return
        current = self.storage.read_versioned(MANIFEST)
        if current is not None and current.version != self.version:
            stored = parse_manifest(self.storage, current.data)
            if stored.owner == self.owner:  # our own write that landed though reported failed (save)
                self.manifest, self.version = stored, current.version
                raise StorageError(f"{self.storage.uri}: manifest changed by our own earlier write; reloaded")
        if current is None or current.version != self.version:
            self.fenced = f"run taken over by {lease.describe(lease.holder(self.storage))}"
            raise LeaseLost(f"{self.storage.uri}: {self.fenced}; nothing was deleted")

    def save(self, m: Manifest) -> None:
        self.check()
        if self.owner is None:
            self.manifest = write_manifest(self.storage, m, self.backup_failed)
            return
        try:
            self.manifest, self.version = write_manifest_if(self.storage, m, self.version, self.backup_failed)
        except Conflict:
            current, version = read_manifest_versioned(self.storage)
            if current is not None and current.owner == self.owner:
                # Still ours: an earlier write of ours landed though it was reported failed (a
                # lost response past the retry budget). Take storage as the truth; the caller's
                # operation fails once and is retried on it.
                self.manifest, self.version = current, version
                raise StorageError(
                    f"{self.storage.uri}: manifest changed by our own earlier write; reloaded"
                ) from None
            self.fenced = f"run taken over by {lease.describe(lease.holder(self.storage))}"
            raise LeaseLost(f"{self.storage.uri}: {self.fenced}; nothing was deleted") from None

    # -- answers to retried calls, kept in the manifest with the work they did
    def answered(self, rid: str | None) -> tuple[bool, Any]:
        """(True, the first answer) when this request was already carried out."""
        if rid and rid in self.manifest.requests:
            return True, self.manifest.requests[rid]
        return False, None

    @staticmethod
    def remember(m: Manifest, rid: str | None, result: Any) -> Manifest:
        if not rid:
            return m
        kept = list(m.requests.items())[-(REMEMBERED - 1) :]
        return m.model_copy(update={"requests": {**dict(kept), rid: result}})

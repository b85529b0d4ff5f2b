"""The node-local tier: each node keeps the last committed checkpoint it wrote or read on
its own disk, and a restore uses that copy only when its bytes match the committed record.

    <root>/<run key>/checkpoints/<id>/<file>   the committed copy (the newest this node has)
    <root>/<run key>/staging/<id>/<file>       rank 0's checkpoint while it uploads
    <root>/<run key>/held/<id>/<file>          hard links to the copy a restore used, while rank 0
                                               checks (and heals) its shared copy

<root> is the spec's `checkpoint.local_cache` (default: `<system temp dir>/orchestrator-cache-<uid>`
on each node); <run key> is the run's name and a hash of its URI. Nothing here is trusted:
a copy is used only once its size and sha256 match the record the coordinator committed
(`read_verified` in orchestrator/core/verify.py), so a stale, damaged, swapped or
half-written copy costs a download from shared storage, never a wrong restore.

Rank 0's writer serializes a checkpoint into `staging/` (hashing as it writes), uploads
those files, and once the coordinator has committed the checkpoint moves them to
`checkpoints/`, dropping the older copy. A rank that restores from shared storage keeps
what it read (verified) the same way. Every file is written through a temp file and a
rename, so a reader never sees part of one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable

from orchestrator.core.manifest import CHECKPOINTS, CheckpointRecord
from orchestrator.core.storage import HashingWriter, Storage

DEFAULT_DIR = "orchestrator-cache"
STAGING = "staging"
HELD = "held"


def cache_root(setting: bool | str) -> str | None:
    """This node's directory for the tier, from `checkpoint.local_cache`: true for the system
    temp dir's (on each node its own), a path, or false for no tier."""
    if setting is False:
        return None
    if setting is True:  # one per user: a directory another user made in /tmp is not writable
        return os.path.join(tempfile.gettempdir(), f"{DEFAULT_DIR}-{os.getuid()}")
    return setting


class NodeCache:
    def __init__(self, root: str, run_uri: str) -> None:
        uri = run_uri.rstrip("/")
        name = uri.rsplit("/", 1)[-1] or "run"
        self.dir = os.path.join(root, f"{name}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}")
        self.storage = Storage(self.dir)  # the same layout as the run's: checkpoints/<id>/<file>

    def __repr__(self) -> str:
        return f"NodeCache({self.dir!r})"

    # -- rank 0's writer ---------------------------------------------------------------
    def staged(self, cid: str, name: str) -> str:
        return os.path.join(self.dir, STAGING, cid, name)

    def stage(
        self, cid: str, name: str, produce: Callable[[HashingWriter], object], size_hint: int = 0
    ) -> tuple[int, str]:
        """Write one file of checkpoint cid into staging; returns its (size, sha256), hashed
        while writing. Not fsynced: a copy that did not survive a crash fails verification."""
        return self.storage.write_stream(
            f"{STAGING}/{cid}/{name}", produce, durable=False, size_hint=size_hint
        )

    def promote(self, cid: str) -> None:
        """The coordinator committed cid: its staged files become this node's copy."""
        src, dst = os.path.join(self.dir, STAGING, cid), os.path.join(self.dir, CHECKPOINTS, cid)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(src, dst)
        self._keep_only(cid)

    def discard(self, cid: str | None = None) -> None:
        """Drop staged files: one checkpoint's (its upload or commit failed), or all of them
        (a new writer starts; whatever an earlier one staged was never promoted)."""
        shutil.rmtree(os.path.join(self.dir, STAGING, *([cid] if cid else [])), ignore_errors=True)

    # -- restore -------------------------------------------------------------------------
    def has(self, cid: str) -> bool:
        """Whether this node holds a copy of cid at all (whether it is right, only reading it
        against the record tells)."""
        return os.path.isdir(os.path.join(self.dir, CHECKPOINTS, cid))

    def keep(self, record: CheckpointRecord, blobs: dict[str, bytes]) -> None:
        """Make bytes read from shared storage (verified against record) this node's copy."""
        for name, data in blobs.items():
            self.storage.write_stream(f"{CHECKPOINTS}/{record.id}/{name}", _writes(data), durable=False)
        self._keep_only(record.id)

    def hold(self, record: CheckpointRecord) -> str:
        """This node's copy of record as it is now, for healing the shared copy from: its
        files hard-linked under held/ (no bytes copied), which a later commit replacing the
        copy does not touch. Returns the directory to read them from, relative to
        self.storage: held/<id>, or the copy itself where the files cannot be linked (gone,
        another filesystem). One holder (rank 0): an earlier, killed holder's links go.
        Whoever reads them verifies them against the record first."""
        live, held = f"{CHECKPOINTS}/{record.id}", f"{HELD}/{record.id}"
        self.release()
        try:
            for f in record.files:
                dst = os.path.join(self.dir, held, f.path)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.link(os.path.join(self.dir, live, f.path), dst)
        except OSError:
            self.release()
            return live
        return held

    def release(self) -> None:
        shutil.rmtree(os.path.join(self.dir, HELD), ignore_errors=True)

    def _keep_only(self, cid: str) -> None:
        # Another rank on this node may be writing or reading a copy of another checkpoint at
        # this moment (ranks restore side by side); at worst that copy goes and a later restore
        # reads shared storage. A reader never gets wrong bytes: it verifies what it read.
        base = os.path.join(self.dir, CHECKPOINTS)
        for entry in os.scandir(base):
            if entry.name != cid:
                shutil.rmtree(entry.path, ignore_errors=True)


def _writes(data: bytes) -> Callable[[HashingWriter], object]:
    return lambda f: f.write(data)

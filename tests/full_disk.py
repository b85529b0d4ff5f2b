"""A disk that fills up, for tests: `fullfs://PATH` is the local PATH on a "disk" (the
directory in the `disk` storage option) that holds at most `quota_bytes`. A write that would
take the disk past its quota raises OSError(ENOSPC), as a full disk does, and writes nothing.

Every process of a run (the driver, the coordinator, the Ray workers) must know the
protocol: `plugin_dir(dir)` writes an fsspec entry point (the `fsspec.specs` group, which
fsspec reads at import) into dir; put dir and tests/ on PYTHONPATH of the CLI and the Ray
nodes. Raising the quota (`resume --storage-option quota_bytes=...`) is space coming back.
"""

from __future__ import annotations

import errno
import io
import os
import uuid
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

PROTOCOL = "fullfs"


class FullFS(AbstractFileSystem):
    protocol = PROTOCOL
    root_marker = "/"

    def __init__(self, disk: str, quota_bytes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.disk, self.quota = disk, int(quota_bytes)
        self.local = LocalFileSystem(auto_mkdir=True)

    def used(self) -> int:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(self.disk) for f in files)

    def room(self, path: str) -> int:
        """Bytes that can still be written as path (what it holds now is freed by the write)."""
        return self.quota - self.used() + (os.path.getsize(path) if os.path.isfile(path) else 0)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        with self._open(path, "wb") as f:
            f.write(value)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if "r" in mode:
            return self.local._open(path, mode, **kwargs)
        return _QuotaFile(path, self.room(path))

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        return bytes(self.local.cat_file(self._strip_protocol(path), start, end))

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return dict(self.local.info(self._strip_protocol(path)))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        return self.local.ls(self._strip_protocol(path), detail=detail)

    def rm(self, path: str, recursive: bool = False, maxdepth: int | None = None) -> None:
        self.local.rm(self._strip_protocol(path), recursive=recursive)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.local.makedirs(self._strip_protocol(path), exist_ok=exist_ok)


class _QuotaFile(io.RawIOBase):
    """A file written beside its path and renamed over it on close, as an object store shows
    an object whole or not at all; past `room` bytes a write raises ENOSPC and drops it all."""

    def __init__(self, path: str, room: int) -> None:
        super().__init__()
        self.path, self.room = path, room
        self.part = f"{path}.part-{uuid.uuid4().hex[:8]}"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.f = open(self.part, "wb")  # closed by close() or discard()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.room:
            self.discard()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        self.room -= n
        return self.f.write(data)

    def discard(self) -> None:
        if not self.f.closed:
            self.f.close()
            os.unlink(self.part)
        super().close()

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()
            os.replace(self.part, self.path)
        super().close()

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self.discard() if exc_type is not None else self.close()


def plugin_dir(where: Path) -> Path:
    """A directory that, on PYTHONPATH (with tests/), registers fullfs:// with fsspec."""
    info = where / "orchestrator_test_fullfs-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: orchestrator-test-fullfs\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[fsspec.specs]\n{PROTOCOL} = full_disk:FullFS\n")
    return where

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
import os
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

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        old = os.path.getsize(path) if os.path.isfile(path) else 0
        if self.used() - old + len(value) > self.quota:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        self.local.pipe_file(path, value)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" not in mode:
            raise NotImplementedError("FullFS writes only whole files (pipe_file)")
        return self.local._open(self._strip_protocol(path), mode, **kwargs)

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


def plugin_dir(where: Path) -> Path:
    """A directory that, on PYTHONPATH (with tests/), registers fullfs:// with fsspec."""
    info = where / "orchestrator_test_fullfs-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: orchestrator-test-fullfs\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[fsspec.specs]\n{PROTOCOL} = full_disk:FullFS\n")
    return where

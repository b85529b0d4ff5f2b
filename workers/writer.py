"""Rank 0's checkpoint writer: the training step pays only for a host-memory copy.

save() copies the state into preallocated host buffers (reused from one save to
the next) and returns; a background thread serializes, uploads the files, writes
checkpoint.json last, and asks the coordinator to commit. One save is in flight
at a time: the next save waits only until the previous one has been serialized
(its buffers are free again), not for its upload. A failure in the background is
raised on the training thread at the next save() or at close(), never swallowed, and
nothing saved after the failed checkpoint is committed: commits follow training order with
no hole, so the restarted attempt resumes from the last commit before the failure and
saves the failed position again (a later save queued during the failed upload was once
committed, and the failed position then never was).

The host buffers are the one copy of the state the background path holds: each file is
serialized (torch.save) straight into a file on disk, its sha256 computed as it is
written, never into memory whole.
  - With a node-local tier (storage.node_cache, the default): into this node's staging
    area, then uploaded from there (S3: concurrent multipart parts); the buffers are free
    once it is on local disk, and after the commit the files are this node's copy.
  - Without one: straight into shared storage (a temp file renamed into place; on S3 a
    streamed multipart upload); the buffers are free once it is uploaded.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from orchestrator.core.manifest import CHECKPOINTS, RECORD, CheckpointRecord, FileEntry
from orchestrator.core.storage import Storage
from workers.host_buffers import HostBuffers

log = logging.getLogger(__name__)


@dataclass
class SaveJob:
    meta: dict[str, Any]  # CheckpointRecord fields other than files
    payload: dict[str, Any]  # file name -> state tree (in host buffers)
    written: list[FileEntry] = field(default_factory=list)  # in storage already (every rank's shards)
    extras: dict[str, str] = field(default_factory=dict)  # record path (extras/...) -> a local copy
    extras_dir: str | None = None  # where those copies are (workers/extras.py), removed once written

    def sources(self) -> list[tuple[str, Callable[[Any], None], int]]:
        """(file name, what writes it into an open file, its size hint) for every file to write."""
        trees = [(name, _saver(tree), _nbytes(tree)) for name, tree in self.payload.items()]
        return trees + [(name, _copier(src), os.path.getsize(src)) for name, src in self.extras.items()]


class CheckpointWriter:
    def __init__(
        self,
        storage: Storage,
        commit: Callable[[CheckpointRecord], Any],
        async_save: bool = True,
        after_upload: Callable[[CheckpointRecord], None] | None = None,
    ) -> None:
        self.storage = storage
        self.commit = commit
        self.async_save = async_save
        self.after_upload = after_upload
        self.blocked_s = 0.0  # time the training thread spent inside save()
        self.waited_s = 0.0  # of the last save's: waiting for the one before to leave the buffers
        self.drain_s: float | None = None  # the last save's time in the writer, to its commit
        self.saves = 0
        self._buffers = HostBuffers()
        self._free = threading.Event()
        self._free.set()
        self._error: BaseException | None = None  # a background failure not yet raised
        self._failed: BaseException | None = None  # the first background failure, kept
        self._queue: queue.Queue[SaveJob | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        if storage.node_cache is not None:
            storage.node_cache.discard()  # what an earlier writer on this node staged was never committed
        if async_save:
            self._thread = threading.Thread(target=self._run, name="ckpt-writer", daemon=True)
            self._thread.start()

    def save(
        self,
        meta: dict[str, Any],
        state: dict[str, Any],
        written: list[FileEntry] | None = None,
        extras: tuple[str, dict[str, str]] | None = None,
    ) -> None:
        """`written`: files of this checkpoint that are in storage already (a sharded save's,
        from every rank); the record lists them with the files written here. `extras`: the
        directory of copies of extra files and {record path: copy} (workers/extras.py's
        snapshot), written beside the state and removed afterwards."""
        t0 = time.perf_counter()
        where, extra = extras or (None, {})
        try:
            self._refuse_after_failure()
        except BaseException:
            _remove(where)
            raise
        if not self.async_save:
            try:
                self._write(SaveJob(meta, state, list(written or ()), extra, where))
            except BaseException as e:
                self._failed = e
                raise
        else:
            if self._thread is None:  # queued now, it would never be written: say so
                _remove(where)
                raise RuntimeError("checkpoint writer is closed: a save after the run's last one")
            t_wait = time.perf_counter()
            self._free.wait()  # the previous save has been serialized out of the buffers
            self.waited_s = time.perf_counter() - t_wait
            try:
                self._refuse_after_failure()
            except BaseException:
                _remove(where)
                raise
            self._free.clear()
            self._queue.put(SaveJob(meta, self._buffers.copy(state), list(written or ()), extra, where))
        self.saves += 1
        self.blocked_s += time.perf_counter() - t0

    def close(self) -> None:
        """Wait for every queued checkpoint to be committed; raise if one failed."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"checkpoint writer failed: {err}") from err

    def _refuse_after_failure(self) -> None:
        """A save after the failure was raised (user code caught it) would be dropped: say so."""
        self._raise_if_failed()
        if self._failed is not None:
            raise RuntimeError(f"checkpoint writer failed earlier, saves are refused: {self._failed}")

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._failed is not None:  # dropped: nothing after a failed save is committed
                _remove(job.extras_dir)
                self._free.set()
                continue
            try:
                self._write(job)
            except BaseException as e:  # handed to the training thread, which raises it
                self._error = self._failed = e
                self._free.set()

    def _write(self, job: SaveJob) -> None:
        t0 = time.perf_counter()
        try:
            self._write_job(job)
        finally:
            _remove(job.extras_dir)
        self.drain_s = time.perf_counter() - t0

    def _write_job(self, job: SaveJob) -> None:
        self._buffers.wait()  # a GPU's copies into the pinned buffers have landed
        cid = job.meta["id"]
        near = self.storage.node_cache
        files = self._stage(near, cid, job.sources()) if near is not None else None
        staged = files is not None
        if files is None:  # no node-local tier: straight into shared storage
            files = [self._stream(cid, *source) for source in job.sources()]
        self._free.set()  # buffers may be overwritten by the next save from here on

        try:
            if staged:
                for f in files:
                    self.storage.put_file(near.staged(cid, f.path), f"{CHECKPOINTS}/{cid}/{f.path}")
            record = CheckpointRecord(files=[*job.written, *files], **job.meta)
            body = json.dumps(record.model_dump(), indent=1).encode()
            self.storage.write_bytes(f"{CHECKPOINTS}/{cid}/{RECORD}", body)  # last: the data is complete
            if self.after_upload is not None:
                self.after_upload(record)
            self.commit(record)
        except BaseException:
            if staged:
                near.discard(cid)
            raise
        if staged:
            try:
                near.promote(cid)  # committed: this node's copy from now on
            except OSError as e:  # the commit stands; the next restore here reads shared storage
                log.info(f"[checkpoint] could not keep {cid} in {near.dir}: {e}")

    def _stream(self, cid: str, name: str, produce: Callable[[Any], None], size: int) -> FileEntry:
        rel = f"{CHECKPOINTS}/{cid}/{name}"
        return _entry(name, self.storage.write_stream(rel, produce, size_hint=size))

    def _stage(
        self, near: Any, cid: str, sources: list[tuple[str, Callable[[Any], None], int]]
    ) -> list[FileEntry] | None:
        """Serialize every file into this node's staging area; None if the local disk failed
        (full, read-only): then the files go straight to shared storage instead."""
        try:
            return [_entry(name, near.stage(cid, name, produce, size)) for name, produce, size in sources]
        except OSError as e:
            log.info(
                f"[checkpoint] node-local staging in {near.dir} failed ({e}); writing {cid} "
                f"straight to {self.storage.uri}"
            )
            near.discard(cid)
            return None


def _saver(tree: Any) -> Callable[[Any], None]:
    return lambda f: torch.save(tree, f)


def _copier(path: str) -> Callable[[Any], None]:
    """Writes the local file path into f (again from its start on a retry)."""

    def copy(f: Any) -> None:
        with open(path, "rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)

    return copy


def _remove(where: str | None) -> None:
    if where is not None:
        shutil.rmtree(where, ignore_errors=True)


def _entry(name: str, written: tuple[int, str]) -> FileEntry:
    size, sha256 = written
    return FileEntry(path=name, size=size, sha256=sha256)


def _nbytes(tree: Any) -> int:
    """Bytes of the tensors in a state tree (a size hint for the upload's part size)."""
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_nbytes(v) for v in tree)
    return 0

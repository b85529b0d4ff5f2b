"""Rank 0's checkpoint writer: the training step pays only for a host-memory copy.

save() copies the state into preallocated host buffers (reused from one save to
the next) and returns; a background thread serializes, uploads the files, writes
checkpoint.json last, and asks the coordinator to commit. One save is in flight
at a time: the next save waits only until the previous one has been serialized
(its buffers are free again), not for its upload. A failure in the background is
raised on the training thread at the next save() or at close(), never swallowed.
"""

from __future__ import annotations

import io
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.core.manifest import CHECKPOINTS, RECORD, CheckpointRecord, FileEntry
from orchestrator.core.storage import Storage, sha256_hex
from workers.host_buffers import HostBuffers


@dataclass
class SaveJob:
    meta: dict[str, Any]  # CheckpointRecord fields other than files
    payload: dict[str, Any]  # file name -> state tree (in host buffers)


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
        self.saves = 0
        self._buffers = HostBuffers()
        self._free = threading.Event()
        self._free.set()
        self._error: BaseException | None = None
        self._queue: queue.Queue[SaveJob | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        if async_save:
            self._thread = threading.Thread(target=self._run, name="ckpt-writer", daemon=True)
            self._thread.start()

    def save(self, meta: dict[str, Any], state: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        self._raise_if_failed()
        if not self.async_save:
            self._write(SaveJob(meta, state))
        else:
            self._free.wait()  # the previous save has been serialized out of the buffers
            self._raise_if_failed()
            self._free.clear()
            self._queue.put(SaveJob(meta, self._buffers.copy(state)))
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

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._write(job)
            except BaseException as e:  # handed to the training thread, which raises it
                self._error = e
                self._free.set()

    def _write(self, job: SaveJob) -> None:
        self._buffers.wait()  # a GPU's copies into the pinned buffers have landed
        blobs: dict[str, bytes] = {}
        for name, tree in job.payload.items():
            buf = io.BytesIO()
            torch.save(tree, buf)
            blobs[name] = buf.getvalue()
        self._free.set()  # buffers may be overwritten by the next save from here on

        cid = job.meta["id"]
        files = []
        for name, data in blobs.items():
            self.storage.write_bytes(f"{CHECKPOINTS}/{cid}/{name}", data)
            files.append(FileEntry(path=name, size=len(data), sha256=sha256_hex(data)))
        record = CheckpointRecord(files=files, **job.meta)
        body = json.dumps(record.model_dump(), indent=1).encode()
        self.storage.write_bytes(f"{CHECKPOINTS}/{cid}/{RECORD}", body)  # last: the data is complete
        if self.after_upload is not None:
            self.after_upload(record)
        self.commit(record)

"""Every rank's own output, kept with the run: RUN_URI/logs/rank-<r>-attempt-<a>.log.

What a rank writes to sys.stdout and sys.stderr (print(), warnings, this project's `[tag]`
lines, a failure's traceback) is copied, as it is written, into a local file on the rank's
node (one line at a time: a write to the page cache, nothing the step loop waits for). The
file is uploaded to the run's storage by a background thread every UPLOAD_EVERY_S while it
grew, at the end of the attempt, and at once when the rank fails, with the failure's
traceback at its end; the coordinator's `worker_error` event names it, and a failed run's
last line on the console names the log of the rank that failed. A rank SIGKILLed keeps what
its last upload held (up to UPLOAD_EVERY_S short); Ray's session logs keep everything.

An upload that fails is said once and never fails the rank: the run's logs are a courtesy,
its checkpoints are the promise.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import threading
from typing import Any, TextIO

from orchestrator.core.manifest import LOGS
from orchestrator.core.storage import RetryPolicy, Storage
from workers.output import Labeled

log = logging.getLogger(__name__)

UPLOAD_EVERY_S = 30.0
# A log upload may not hold up a failing rank for the storage's whole retry budget.
LOG_RETRY = RetryPolicy(attempts=3, initial_s=0.2, max_s=1.0)


def log_name(rank: int, attempt: int) -> str:
    """Where a rank's log of an attempt is kept, relative to RUN_URI (attempt 0: the rank
    failed before its attempt was numbered)."""
    return f"{LOGS}/rank-{rank}-attempt-{attempt}.log"


class Tee:
    """A text stream that passes every write on and copies it into a file."""

    def __init__(self, stream: TextIO, copy: TextIO) -> None:
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        with contextlib.suppress(OSError, ValueError):  # a full local disk, a closed file: output goes on
            self.copy.write(text)
        return n

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, buffer, ...
        return getattr(self.stream, name)


class RankLog:
    """This rank's output in a local file, uploaded to RUN_URI/logs/ (see the module's doc)."""

    def __init__(self, run_uri: str, storage_options: dict[str, Any], rank: int) -> None:
        self.rank, self.attempt = rank, 0
        self.storage = Storage(run_uri, storage_options, LOG_RETRY)
        key = hashlib.sha256(run_uri.encode()).hexdigest()[:12]
        where = os.path.join(tempfile.gettempdir(), f"orchestrator-logs-{os.getuid()}", key)
        self.local: str | None = os.path.join(where, f"rank-{rank}-pid-{os.getpid()}.log")
        try:
            os.makedirs(where, exist_ok=True)
            self.file: TextIO = open(self.local, "a", buffering=1, encoding="utf-8", errors="replace")
        except OSError as e:  # this node's disk: the rank trains on, its log is not kept
            log.info(f"[log] rank {rank}: cannot keep its output in {where}: {e}")
            self.local, self.file = None, open(os.devnull, "w")
        self._lock = threading.Lock()
        self._uploaded = -1  # the file's size at the last upload
        self._said = False
        self._done = threading.Event()
        for name in ("stdout", "stderr"):
            _tee(name, self.file)
        self._thread = threading.Thread(target=self._every, name="rank-log", daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return self.storage.child_uri(log_name(self.rank, self.attempt))

    def failed(self, trace: str) -> str | None:
        """The rank failed: its traceback goes at the end of the log, uploaded now. Returns
        the log's URI (None if it could not be uploaded)."""
        with self._lock, contextlib.suppress(OSError, ValueError):
            self.file.write(f"[rank {self.rank}] failed:\n{trace}")
        return self.upload()

    def upload(self, only_if_grown: bool = False) -> str | None:
        with self._lock:
            if self.local is None:
                return None
            try:
                self.file.flush()
                size = os.path.getsize(self.local)
                if only_if_grown and size == self._uploaded:
                    return self.uri
                self.storage.put_file(self.local, log_name(self.rank, self.attempt))
                self._uploaded = size
                return self.uri
            except Exception as e:  # never the rank's failure
                if not self._said:
                    self._said = True
                    log.info(f"[log] rank {self.rank}: could not keep its log in {self.uri}: {e}")
                return None

    def close(self) -> None:
        """The attempt is over: a last upload; the local copy goes once it is stored."""
        self._done.set()
        stored = self.upload(only_if_grown=True) is not None
        for name in ("stdout", "stderr"):
            _untee(name, self.file)
        with self._lock:
            self.file.close()
        if stored and self.local is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.local)

    def _every(self) -> None:
        while not self._done.wait(UPLOAD_EVERY_S):
            if self.attempt:  # numbered: the restore plan is made (a log is named by its attempt)
                self.upload(only_if_grown=True)


def _tee(name: str, copy: TextIO) -> None:
    """Copy sys.<name> into copy: inside its rank label (workers/output.py), so the label's
    look at who is writing is not moved by a frame."""
    stream = getattr(sys, name)
    if isinstance(stream, Labeled):
        inner = stream.stream
        stream.stream = Tee(inner.stream if isinstance(inner, Tee) else inner, copy)  # type: ignore[assignment]
    else:
        setattr(sys, name, Tee(stream.stream if isinstance(stream, Tee) else stream, copy))


def _untee(name: str, copy: TextIO) -> None:
    stream = getattr(sys, name)
    if isinstance(stream, Labeled):
        if isinstance(stream.stream, Tee) and stream.stream.copy is copy:
            stream.stream = stream.stream.stream
    elif isinstance(stream, Tee) and stream.copy is copy:
        setattr(sys, name, stream.stream)

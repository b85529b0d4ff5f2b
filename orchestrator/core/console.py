"""The project's own console lines (`[restore] ...`, `[lease] ...`, `[run] warning: ...`): each
module logs them through its own logger (`logging.getLogger(__name__)`), and `configure()`, called
once by each process's entry (the CLI's main, a Ray Train worker's train loop), shows them as
plain lines, as they read: the message alone, INFO on stdout and WARNING and above on stderr,
flushed line by line.

The streams are looked up as each line is written, not when configure() runs: a Ray Train
worker labels its sys.stdout and sys.stderr after it starts (workers/output.py, which leaves
these lines unlabeled: they are not the user's), and pytest's capture replaces them per test.
The project's loggers do not propagate: a handler the user's code or Ray puts on the root logger
shows nothing twice. The user-facing progress lines (orchestrator/progress.py, the driver's
per-epoch lines) are prints, not log records.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import TextIO

PACKAGES = ("orchestrator", "workers")
# One line at a time on a process's console. The driver's has several writers (the progress
# view's thread, Ray's forwarded worker lines on its log thread, log records), and print()
# writes a line and its newline in two writes, between which a console on a pipe or a file
# lets another thread write: one line then lands inside another. Reentrant: a writer holding it
# may log.
LOCK = threading.RLock()


def write_line(line: str, stream: TextIO) -> None:
    """`line` and its newline in one write, flushed, under LOCK."""
    with LOCK:
        stream.write(line + "\n")
        stream.flush()


class StdStreams(logging.Handler):
    """A record's message, on sys.stdout below WARNING and on sys.stderr from it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            write_line(self.format(record), stream)
        except Exception:  # noqa: BLE001  # logging's own way: report on stderr, never raise
            self.handleError(record)


def configure() -> None:
    """Show the project's log records on the console, INFO and above (once per process; calling
    again changes nothing)."""
    for name in PACKAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(h, StdStreams) for h in logger.handlers):
            handler = StdStreams()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False

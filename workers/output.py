"""Each rank's own output, labeled: every line the user's code writes to sys.stdout or
sys.stderr (print(), a warning) after `label_output(rank)` starts with `[rank N] `; lines
written by logging (Ray Train's logs, which also carry each print() as a log record), by Ray
or by this project's own worker code are not labeled.

Ray copies a worker's stdout and stderr into its session logs and, with log_to_driver,
publishes every line to the driver, Ray's own lines among them. The label is how the driver
tells the user's lines (a print() in a train function, a warning from their code) from Ray's:
orchestrator/ray_compat.py `route_worker_output` shows rank 0's labeled lines on the console
(every rank's on --verbose) and nothing else of the workers'.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from types import FrameType
from typing import Any, TextIO

import ray

LABEL = re.compile(r"^\[rank (\d+)\] ")
# Lines Ray writes through the same streams for its log monitor (an actor's or task's name,
# tqdm_ray's state): they must reach it unlabeled.
_RAYS_OWN = re.compile(
    r"^:(?:actor_name|task_name|job_id|info_message|event_summary):"
    r"|__ray_tqdm_magic_token__"
)


_HERE = os.path.dirname(os.path.abspath(__file__))
_NOT_USERS = (
    os.path.dirname(os.path.abspath(logging.__file__)) + os.sep,  # a log record, however it came
    os.path.dirname(os.path.abspath(ray.__file__)) + os.sep,  # Ray's own prints
    _HERE + os.sep,  # this package's (workers/tasks/ excepted: a task is user code)
    os.path.join(os.path.dirname(_HERE), "orchestrator") + os.sep,
)
# Ray's replacements of builtins.print pass a print on: Ray Train's in a worker (it logs each
# print as a record and, the stream being ours, also prints it as is), tqdm_ray's once a bar
# manager exists in the process (for good), Serve's in a replica. The print's own caller
# decides.
_PASS_THROUGH = (
    os.path.join("ray", "train", "v2", "_internal", "logging", "patch_print.py"),
    os.path.join("ray", "experimental", "tqdm_ray.py"),
    os.path.join("ray", "serve", "_private", "logging_utils.py"),
)


def _users_write() -> bool:
    """Whether the write under way comes from user code: the nearest caller outside this
    module and Ray Train's print patch is not logging's, Ray's or this project's."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.endswith(_PASS_THROUGH):
        frame = frame.f_back
    if frame is None:
        return False
    path = os.path.abspath(frame.f_code.co_filename)
    if path.startswith(os.path.join(_HERE, "tasks") + os.sep):
        return True
    return not path.startswith(_NOT_USERS)


class Labeled:
    """A text stream that starts each line it passes on with a label."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream, self.label = stream, label
        self._line_start = True
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        users = _users_write()
        with self._lock:
            out = []
            for piece in text.splitlines(keepends=True):
                if self._line_start and users and not _RAYS_OWN.search(piece):
                    out.append(self.label)
                out.append(piece)
                self._line_start = piece.endswith(("\n", "\r"))
            self.stream.write("".join(out))
            if "\n" in text:  # line by line, as on a terminal: a worker killed next loses none
                self.stream.flush()
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, buffer, ...
        return getattr(self.stream, name)


def label_output(rank: int) -> None:
    """Label this process's stdout and stderr with its rank (once; a second call, as a rank's
    number cannot change within its process, changes nothing)."""
    label = f"[rank {rank}] "
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, Labeled):
            continue
        setattr(sys, name, Labeled(stream, label))

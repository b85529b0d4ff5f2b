"""Stopping in the middle of an epoch on purpose, with a checkpoint first.

Two things ask for it:
- the driver, on Ctrl-C or SIGTERM (the coordinator holds the request; rank 0 reads it in
  the answer to its live-progress tick): every rank saves, waits for the commit and
  returns, and the run ends resumable;
- a worker's own SIGTERM, the notice a preemptible node gets before it is killed, when
  the spec sets `failure.checkpoint_on_preempt`: every rank saves, waits for the commit,
  and raises `Preempted`, so Ray Train restarts the group from that checkpoint and no
  step is trained twice.

Ranks must stop at the same step (a save is a collective), so they agree every
`SYNC_EVERY` steps and at every epoch's end with one all-reduce of a small integer.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import torch

from workers.distributed import all_reduce_max

log = logging.getLogger(__name__)

SYNC_EVERY = 10  # steps between agreements: one 1-element all-reduce each

NONE, DRIVER, PREEMPT = 0, 1, 2

PREEMPTED = threading.Event()  # set by this process's SIGTERM handler


class Preempted(RuntimeError):
    """This worker group stopped for a preemption notice after committing a checkpoint."""


def install_preemption_handler() -> bool:
    """On SIGTERM set PREEMPTED instead of exiting; a second SIGTERM exits as before.
    Must run on the main thread (Python's rule for signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        if PREEMPTED.is_set():  # a second notice: what SIGTERM did before (Ray's exit, or the default)
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        PREEMPTED.set()
        log.info("[preempt] SIGTERM: checkpoint at the next sync point, then stop")

    signal.signal(signal.SIGTERM, on_sigterm)
    return True


class StopCheck:
    """Whether every rank stops now, and why (NONE, DRIVER or PREEMPT)."""

    def __init__(self, driver_asked: Callable[[], bool], device: torch.device) -> None:
        self.driver_asked = driver_asked  # rank 0 only; other ranks pass lambda: False
        self.device = device

    def __call__(self, global_step: int, end_of_epoch: bool = False) -> int:
        if not end_of_epoch and global_step % SYNC_EVERY:
            return NONE
        return all_reduce_max(self.local(), self.device)

    def local(self) -> int:
        """This rank's own answer, before the agreement."""
        return PREEMPT if PREEMPTED.is_set() else DRIVER if self.driver_asked() else NONE

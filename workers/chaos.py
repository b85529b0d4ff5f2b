"""Fault injection from the spec's `chaos` section: real SIGKILLs of real processes.

Each kill fires once per run: the coordinator records the claim in the manifest
before the signal is sent, so the restarted attempt does not kill itself again.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from workers.config import Kill

log = logging.getLogger(__name__)


class Chaos:
    def __init__(self, kills: Sequence[Kill], rank: int, claim: Callable[[str, str], bool]) -> None:
        """claim(key, what) is True once per kill per run; `what` says it for the console."""
        self.mine = [(f"kill-{i}", k) for i, k in enumerate(kills) if k.rank == rank]
        self.rank = rank
        self.claim = claim

    def before_step(self, epoch: int, step: int) -> None:
        for key, k in self.mine:
            if k.point == "step" and k.epoch == epoch and k.step == step:
                self._fire(key, f"epoch {epoch} step {step}")

    def after_upload(self, record: Any) -> None:
        for key, k in self.mine:
            if k.point == "after_upload" and k.epoch == record.epoch:
                self._fire(key, f"after uploading {record.id}, before its commit")

    def mid_save(self, epoch: int, cid: str) -> None:
        for key, k in self.mine:
            if k.point == "mid_save" and k.epoch == epoch:
                self._fire(
                    key,
                    f"in the middle of sharded save {cid}: this rank's shards written, the "
                    "checkpoint not yet recorded",
                )

    def _fire(self, key: str, where: str) -> None:
        if self.claim(key, f"rank {self.rank} (pid {os.getpid()}) SIGKILLed by chaos.kills at {where}"):
            log.info(f"[chaos] SIGKILL rank {self.rank} (pid {os.getpid()}) at {where}")
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

"""Calls to the run's coordinator from a worker: each with a request id, so a call that Ray
retries after the actor restarted is carried out once, and each with a timeout that ends
in a clear error instead of a worker that waits forever."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

TIMEOUT_S = 300.0  # a coordinator restart, storage retries included, fits well inside


class CoordinatorTimeout(TimeoutError):
    """The run's coordinator did not answer in time."""


def call(method: Any, *args: Any, timeout: float = TIMEOUT_S) -> Any:
    """method.remote(*args, request_id), waited for at most timeout seconds."""
    import ray

    try:
        return ray.get(method.remote(*args, uuid.uuid4().hex), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        name = getattr(method, "_method_name", "call")
        raise CoordinatorTimeout(
            f"the run's coordinator did not answer {name} within {timeout:.0f}s; "
            "is its node (the driver's) overloaded or gone?"
        ) from None


def send(method: Any, *args: Any) -> None:
    """Fire and forget (an event the worker need not wait for), with a request id."""
    method.remote(*args, uuid.uuid4().hex)


class StepTicker:
    """Rank 0 tells the coordinator where it is within the epoch at most every interval_s,
    for the live display only (fire and forget: never a save trigger, never waited for)."""

    def __init__(self, send: Callable[[dict[str, Any]], None], interval_s: float = 1.0) -> None:
        self.send, self.interval_s, self._last = send, interval_s, 0.0

    def __call__(self, epoch: int, step: int, steps: int, global_step: int) -> None:
        now = time.time()
        if now - self._last >= self.interval_s or step == steps:
            self._last = now
            self.send({"epoch": epoch, "step": step, "steps": steps, "global_step": global_step, "ts": now})

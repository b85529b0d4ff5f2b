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


def call(method: Any, *args: Any, timeout: float = TIMEOUT_S, **kwargs: Any) -> Any:
    """method.remote(*args, request_id, **kwargs), waited for at most timeout seconds."""
    import ray

    try:
        return ray.get(method.remote(*args, uuid.uuid4().hex, **kwargs), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        name = getattr(method, "_method_name", "call")
        raise CoordinatorTimeout(
            f"the run's coordinator did not answer {name} within {timeout:.0f}s; "
            "is its node (the driver's) overloaded or gone?"
        ) from None


def send(method: Any, *args: Any) -> Any:
    """Fire and forget (an event the worker need not wait for), with a request id; returns
    the call's ObjectRef for a caller that reads the answer later, if it has arrived."""
    return method.remote(*args, uuid.uuid4().hex)


class StepTicker:
    """Rank 0 tells the coordinator where it is within the epoch at most every interval_s,
    for the live display (never a save trigger, never waited for). The coordinator's answer
    says whether the driver asked the workers to stop; it is read once it has arrived.
    Without `send` (ranks other than 0) it does nothing."""

    def __init__(self, send: Callable[[dict[str, Any]], Any] | None, interval_s: float = 1.0) -> None:
        self.send, self.interval_s, self._last = send, interval_s, 0.0
        self._reply: Any = None  # the last tick's ObjectRef, until its answer is read
        self._stop_asked = False

    def __call__(self, epoch: int, step: int, steps: int, global_step: int) -> None:
        now = time.time()
        if self.send is not None and (now - self._last >= self.interval_s or step == steps):
            self._last = now
            self._read_reply()
            self._reply = self.send({"epoch": epoch, "step": step, "steps": steps,
                                     "global_step": global_step, "ts": now})  # fmt: skip

    def stop_asked(self) -> bool:
        self._read_reply()
        return self._stop_asked

    def _read_reply(self) -> None:
        import ray

        if self._reply is None:
            return
        ready, _ = ray.wait([self._reply], timeout=0)
        if ready:
            self._reply = None
            try:
                self._stop_asked = self._stop_asked or bool(ray.get(ready[0]))
            except ray.exceptions.RayError:
                pass  # a coordinator restarting: the next tick asks again

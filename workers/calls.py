"""Calls to the run's coordinator from a worker: each with a request id, so a call that Ray
retries after the actor restarted is carried out once, and each with a timeout that ends
in a clear error instead of a worker that waits forever."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.core.manifest import CheckpointRecord, StopKind

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


def this_actor() -> Any:
    """The Ray actor this code runs in (a Ray Train worker), or None outside one."""
    import ray

    if not ray.is_initialized():  # get_runtime_context() would start a Ray of its own
        return None
    try:
        return ray.get_runtime_context().current_actor
    except Exception:  # not in an actor (a test's process, a driver)
        return None


class Coordinator:
    """The run's coordinator (the actor of orchestrator/coordinator/api.py's Coordinator) as a
    rank calls it: one typed method per call, each with a request id and a timeout (call), or
    sent without waiting where the answer is not needed now (send). tests/test_coordinator_api.py
    binds each of these calls to the Coordinator's signatures."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle  # the actor handle Ray ships to every worker

    # -- an attempt, and what it restores
    def start_attempt(self, world: int, replica: bool = False) -> dict[str, Any]:
        me = this_actor() if replica else None  # a replicas writer: take_writer asks if it lives
        return call(self.handle.start_attempt, world, replica=replica, writer=me)  # type: ignore[no-any-return]

    def take_writer(self, rank: int, attempt: int) -> dict[str, Any]:
        """failure.mode replicas: become the writer in the place of one that left the quorum."""
        return call(self.handle.take_writer, rank, attempt, writer=this_actor())  # type: ignore[no-any-return]

    def next_restore(self, bad_id: str, why: str) -> dict[str, Any] | None:
        """The next newest commit, after marking bad_id bad (a failed verification)."""
        return call(self.handle.next_restore, bad_id, why)  # type: ignore[no-any-return]

    def claim_chaos(self, key: str, pid: int, what: str | None = None) -> bool:
        """True once per fault (`what` says it for a person, in the restart's cause)."""
        return bool(call(self.handle.claim_chaos, key, pid, what=what))

    # -- checkpoints and metrics
    def commit(self, record: CheckpointRecord) -> dict[str, list[str]]:
        return call(self.handle.commit, record.model_dump())  # type: ignore[no-any-return]

    def report_metrics(self, row: dict[str, Any]) -> None:
        call(self.handle.report_metrics, row)

    def event(self, kind: str, fields: dict[str, Any], timeout: float = TIMEOUT_S) -> None:
        call(self.handle.event, kind, fields, timeout=timeout)

    def note(self, kind: str, fields: dict[str, Any]) -> Any:
        """An event not waited for."""
        return send(self.handle.event, kind, fields)

    def tick(self, position: dict[str, Any]) -> Any:
        """Rank 0's position, not waited for; its answer (read later) says whether to stop."""
        return send(self.handle.tick, position)

    # -- stopping and ending
    def stop_asked(self) -> bool:
        return bool(call(self.handle.stop_asked))

    def stop(self, reason: str, kind: StopKind) -> None:
        call(self.handle.stop, reason, kind)

    def request_stop(self, reason: str) -> None:
        call(self.handle.request_stop, reason)

    def gave_up(self) -> str | None:
        return call(self.handle.gave_up)  # type: ignore[no-any-return]

    def record_failure(
        self, sig: str, trace: str, attempt: int | None, rank: int | None = None, log: str | None = None
    ) -> None:
        call(self.handle.record_failure, sig, trace, attempt, rank=rank, log=log, timeout=30)

    def end_training(self) -> None:
        call(self.handle.end_training)

    def training_ended(self) -> bool:
        return bool(call(self.handle.training_ended))


class StepTicker:
    """Rank 0 tells the coordinator where it is within the epoch at most every interval_s,
    for the live display (never a save trigger, never waited for). The coordinator's answer
    says whether the driver asked the workers to stop; it is read once it has arrived.
    Without `send` (ranks other than 0) it does nothing."""

    def __init__(self, send: Callable[[dict[str, Any]], Any] | None, interval_s: float = 1.0) -> None:
        self.send, self.interval_s, self._last = send, interval_s, 0.0
        self._reply: Any = None  # the last tick's ObjectRef, until its answer is read
        self._stop_asked = False

    def __call__(
        self, epoch: int, step: int, steps: int, global_step: int, loss: Any = None, lr: float | None = None
    ) -> None:
        """`loss` (this step's train loss, a tensor or a number) and `lr` (the optimizer's
        learning rate) go with the tick, for the trackers' per-step curves: read only when a
        tick is sent (one GPU sync a second)."""
        now = time.time()
        if self.send is not None and (now - self._last >= self.interval_s or step == steps):
            self._last = now
            self._read_reply()
            position = {"epoch": epoch, "step": step, "steps": steps, "global_step": global_step, "ts": now}
            if loss is not None:
                position["train_loss"] = float(loss.detach() if hasattr(loss, "detach") else loss)
            if lr is not None:
                position["lr"] = float(lr)
            self._reply = self.send(position)

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

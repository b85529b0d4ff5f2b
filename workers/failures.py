"""Which worker failures a restart can fix, and which it cannot.

A killed worker, a lost node, a storage outage or a preemption is an infrastructure
failure: Ray Train restarts the group, up to `failure.max_failures` times. An exception
raised by the user's own code at the same place twice (the same type and message from
the same line, at the same epoch and step, in two attempts) is deterministic: the third
attempt would fail the same way, so the run stops there with the user's traceback
instead of spending every restart (the coordinator decides, see `Coordinator.record_failure` in
orchestrator/coordinator/api.py).
"""

from __future__ import annotations

import re
import traceback

import torch.distributed as dist

from orchestrator.core.lease import LeaseLost
from orchestrator.core.storage import StorageError
from orchestrator.core.verify import VerificationError
from workers.calls import CoordinatorTimeout
from workers.stopping import Preempted

_INFRA = (
    Preempted,
    CoordinatorTimeout,
    LeaseLost,
    StorageError,
    VerificationError,
    dist.DistError,
    OSError,
    TimeoutError,
    MemoryError,
)
# What a collective raises when a peer died: gloo and NCCL errors are often plain RuntimeErrors.
_PEER_GONE = re.compile(
    r"gloo|nccl|connection (?:reset|closed|refused)|closed by peer|broken pipe|timed out", re.IGNORECASE
)


def is_infrastructure(exc: BaseException) -> bool:
    """Whether exc, or any exception it was raised from (the writer wraps a background
    failure in a RuntimeError), is one a restart can fix."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if _is_infra(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _is_infra(exc: BaseException) -> bool:
    if isinstance(exc, _INFRA):
        return True
    try:
        import ray.exceptions

        if isinstance(exc, ray.exceptions.RayError):
            return True
    except ImportError:
        pass
    return isinstance(exc, RuntimeError) and bool(_PEER_GONE.search(str(exc)))


def signature(exc: BaseException, where: str) -> str:
    """The same for the same error raised at the same line and position: type, message,
    the innermost frame, and where in training (epoch and step) it happened."""
    frames = traceback.extract_tb(exc.__traceback__)
    line = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__qualname__}: {str(exc)[:500]} at {line} ({where})"


def user_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))[-6000:]

"""Checkpoint ids: `epoch<E>-step<S>-a<attempt>` (workers/session.py names them). The attempt
that wrote a directory is read off its name, with no request to storage: a coordinator never
deletes what a later attempt wrote, and repair numbers the next attempt above every one seen."""

from __future__ import annotations

import re

_ATTEMPT = re.compile(r"-a(\d+)$")


def attempt_of(cid: str) -> int | None:
    """The attempt a checkpoint id names, or None for a name that is not a checkpoint id."""
    match = _ATTEMPT.search(cid)
    return int(match.group(1)) if match else None


def checkpoint_id(epoch: int, global_step: int, attempt: int) -> str:
    return f"epoch{epoch:04d}-step{global_step:07d}-a{attempt}"

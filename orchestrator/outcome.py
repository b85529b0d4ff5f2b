"""How a run ended, decided once, as a value: a pure function of what the driver saw (the
error `fit()` raised, the coordinator's last word, whether the lease was lost), tested as a
table (tests/test_outcome.py). Exceptions are matched by type through the chain Ray nests
them in (ray_compat.exception_chain), never by their text.

    taken_over   another driver owns the run: stop, record nothing, delete nothing
    input        a worker found the input wrong (a monitor the task does not report): exit 2
    interrupted  the driver asked the workers to stop (Ctrl-C, SIGTERM): resumable
    failed       Ray Train gave up, or a worker stopped the run (a user error, NaN)
    finished     trained to the end (or stopped early)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from orchestrator.budget import RestartBudget
from orchestrator.core.lease import LeaseLost
from orchestrator.ray_compat import controller_gave_up, exception_chain

Kind = Literal["taken_over", "input", "interrupted", "failed", "finished"]


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    reason: str | None = None  # what to tell the user (the root cause, or a whole traceback)

    @property
    def status(self) -> str | None:
        """What the manifest records: None for a run this driver no longer owns."""
        return {"taken_over": None, "finished": "finished"}.get(self.kind, "failed")


def lease_lost(exc: BaseException | None) -> LeaseLost | None:
    """The LeaseLost anywhere in an error from Ray (a fenced coordinator's answer, a worker's):
    the innermost, the one raised, whose text is its own (a RayTaskError's is Ray's)."""
    return next((e for e in reversed(exception_chain(exc)) if isinstance(e, LeaseLost)), None)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def decide_outcome(
    fit_error: BaseException | None,
    after: dict[str, Any] | None,
    coord_error: BaseException | None = None,
    lost: str | None = None,
) -> Outcome:
    """fit_error: what fit() raised or returned as its error; after: the coordinator's final
    progress (None: it did not answer, coord_error says how); lost: why the lease was lost."""
    taken = lease_lost(fit_error) or lease_lost(coord_error)
    fenced = (after or {}).get("fenced")
    if lost or fenced or taken:
        return Outcome("taken_over", lost or fenced or root_cause(str(taken)))
    stopped = (after or {}).get("stopped")
    kind = stopped["kind"] if stopped else None
    if kind == "input":
        return Outcome("input", stopped["reason"])  # type: ignore[index]
    if kind == "interrupt":
        return Outcome("interrupted", stopped["reason"])  # type: ignore[index]
    if kind == "user_error":  # the worker's whole traceback, not just its last line
        return Outcome("failed", stopped["reason"])  # type: ignore[index]
    if fit_error is not None:
        return Outcome("failed", root_cause(describe(fit_error)))
    if coord_error is not None:
        return Outcome("failed", f"the run's coordinator did not answer: {root_cause(describe(coord_error))}")
    if stopped:  # a stop of another kind (nan, a deterministic failure): the run failed
        return Outcome("failed", root_cause(stopped["reason"]))
    return Outcome("finished")


def relaunch_group(mode: str, fit_error: BaseException, interrupted: bool, budget: RestartBudget) -> bool:
    """failure.mode replicas: fit() ended because Ray Train's controller itself gave up (it
    cannot replace several replica groups at once in Ray 2.60): restart the whole group from
    the latest commit instead of failing, while failure.max_failures allows (the restarts of
    the whole group this driver made, Ray Train's and its own: `budget`) and no one asked the
    run to stop."""
    allowed = mode == "replicas" and not interrupted and budget.group_restart_left()
    return allowed and controller_gave_up(fit_error)


_CAUSE = re.compile(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception|Failed)\w*): (.+)$")


def root_cause(text: str) -> str:
    """The line of a (possibly nested, remote) traceback that says what went wrong, for a
    person to read (never to decide on). A storage error that ran out of retries wins; else
    the last `SomethingError: ...` line."""
    lines = text.splitlines()
    for line in lines:
        if "giving up" in line:
            return line.strip()
    causes = [line.strip() for line in lines if _CAUSE.match(line)]
    return (causes[-1] if causes else (lines[-1].strip() if lines else text))[:1000]

"""How a run ended, as a table (orchestrator/outcome.py), with errors shaped as Ray shapes
them: a RayTaskError standing for the exception a task or an actor raised, Ray Train's
WorkerGroupError carrying each worker's failure, a ControllerError. Matched by type, never
by text: a LeaseLost deep inside is found, the word "LeaseLost" in a message is not."""

from __future__ import annotations

from typing import Any

import pytest
from ray.exceptions import RayTaskError
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from orchestrator.budget import RestartBudget
from orchestrator.core.lease import LeaseLost
from orchestrator.outcome import Outcome, decide_outcome, relaunch_group
from orchestrator.ray_compat import exception_chain


def remote(exc: BaseException) -> BaseException:
    """What ray.get raises for an exception a task or an actor raised: both a RayTaskError
    and an instance of the original class."""
    return RayTaskError("RunCoordinator.commit", "Traceback ...", exc).as_instanceof_cause()


LOST = LeaseLost("lease of run r was taken over by driver host:42")
STOP = {
    "user_error": {
        "reason": "Traceback (most recent call last):\n ...\nValueError: bad batch",
        "kind": "user_error",
    },
    "input": {"reason": "checkpoint.monitor 'val_f1' is not a metric", "kind": "input"},
    "interrupt": {"reason": "stopped at epoch 2 step 3", "kind": "interrupt"},
    "nan": {"reason": "epoch 3: val_loss not finite (stop_on_nan)", "kind": "nan"},
}


@pytest.mark.parametrize(
    ("fit_error", "after", "coord_error", "lost", "kind", "reason"),
    [
        (None, {}, None, None, "finished", None),
        (None, {"stopped": None}, None, None, "finished", None),
        # taken over: the lease said so, the coordinator was fenced, or a LeaseLost came back
        (None, {}, None, "lease expired", "taken_over", "lease expired"),
        (None, {"fenced": "taken over by driver b"}, None, None, "taken_over", "taken over by driver b"),
        (
            WorkerGroupError("rank 0 failed", {0: remote(LOST)}),
            {},
            None,
            None,
            "taken_over",
            "lease of run r was taken over by driver host:42",
        ),
        (None, None, remote(LOST), None, "taken_over", "lease of run r was taken over by driver host:42"),
        (ControllerError(RuntimeError("x")), None, RuntimeError("wrapped"), None, "failed", None),
        # the workers stopped the run, each kind
        (None, {"stopped": STOP["input"]}, None, None, "input", STOP["input"]["reason"]),
        (None, {"stopped": STOP["interrupt"]}, None, None, "interrupted", STOP["interrupt"]["reason"]),
        (None, {"stopped": STOP["user_error"]}, None, None, "failed", STOP["user_error"]["reason"]),
        (None, {"stopped": STOP["nan"]}, None, None, "failed", STOP["nan"]["reason"]),
        # Ray Train gave up: the root cause, not Ray's header
        (
            WorkerGroupError(
                "Worker 1 failed:\nTraceback ...\nRuntimeError: CUDA out of memory", {1: RuntimeError("oom")}
            ),
            {},
            None,
            None,
            "failed",
            "RuntimeError: CUDA out of memory",
        ),
        # a user error's traceback beats the error fit() raised with it
        (
            WorkerGroupError("x", {0: ValueError("bad batch")}),
            {"stopped": STOP["user_error"]},
            None,
            None,
            "failed",
            STOP["user_error"]["reason"],
        ),
        # the coordinator did not answer at the end
        (
            None,
            None,
            TimeoutError("GetTimeoutError"),
            None,
            "failed",
            "the run's coordinator did not answer: TimeoutError: GetTimeoutError",
        ),
        # text is not a type: an error that only mentions LeaseLost is a failure
        (
            RuntimeError("user code printed LeaseLost"),
            {},
            None,
            None,
            "failed",
            "RuntimeError: user code printed LeaseLost",
        ),
    ],
)
def test_decide_outcome(
    fit_error: Any, after: Any, coord_error: Any, lost: Any, kind: str, reason: Any
) -> None:
    out = decide_outcome(fit_error, after, coord_error, lost)
    assert out.kind == kind
    if reason is not None or kind == "finished":
        assert out.reason == reason


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("finished", "finished"),
        ("failed", "failed"),
        ("interrupted", "failed"),
        ("input", "failed"),
        ("taken_over", None),
    ],
)
def test_what_each_outcome_records(kind: Any, status: Any) -> None:
    assert Outcome(kind).status == status


@pytest.mark.parametrize(
    ("mode", "error", "interrupted", "relaunches", "again"),
    [
        ("replicas", ControllerError(remote(RuntimeError("ActorDiedError"))), False, 0, True),
        ("replicas", ControllerError(RuntimeError("x")), False, 2, True),  # one of max_failures (3) left
        ("replicas", ControllerError(RuntimeError("x")), False, 3, False),  # max_failures (3) spent
        ("replicas", ControllerError(RuntimeError("x")), True, 0, False),  # Ctrl-C: stop, do not relaunch
        (
            "replicas",
            WorkerGroupError("w", {0: RuntimeError("x")}),
            False,
            0,
            False,
        ),  # the workers' own failure
        ("restart", ControllerError(RuntimeError("x")), False, 0, False),
    ],  # restart mode: Ray Train decides
)
def test_a_whole_group_restart_only_when_the_replicas_controller_gave_up(
    mode, error, interrupted, relaunches, again
) -> None:
    # Replicas replaced alone never spend the budget of the whole group's restarts
    budget = RestartBudget(max_failures=3, max_replacements=5, groups=relaunches, replacements=5)
    assert relaunch_group(mode, error, interrupted, budget) is again


def test_max_failures_minus_one_never_runs_out_of_whole_group_restarts() -> None:
    gave_up = ControllerError(RuntimeError("x"))
    assert relaunch_group(
        "replicas", gave_up, False, RestartBudget(max_failures=-1, max_replacements=0, groups=100)
    )


def test_the_chain_walks_every_shape_ray_nests_errors_in() -> None:
    inner = ValueError("deep")
    try:
        try:
            raise inner
        except ValueError as e:
            raise RuntimeError("wrapper") from e
    except RuntimeError as e:
        chained = e
    err = ControllerError(WorkerGroupError("w", {0: RuntimeError("a"), 1: remote(chained)}))
    found = exception_chain(err)
    assert inner in found and chained in [getattr(x, "cause", x) for x in found]
    assert any(isinstance(x, RuntimeError) and str(x) == "a" for x in found)
    assert exception_chain(None) == []
    loop = RuntimeError("self")
    loop.__context__ = loop  # a cycle ends
    assert exception_chain(loop) == [loop]

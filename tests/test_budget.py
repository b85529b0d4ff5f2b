"""failure.mode replicas: a replica replaced alone spends failure.max_replacements, a restart
of the whole group failure.max_failures, never the other's (orchestrator/budget.py), and Ray
Train's policy is replaced by one that asks it (orchestrator/ray_compat.py)."""

from __future__ import annotations

import pytest

from orchestrator.budget import RestartBudget, replaced_alone


@pytest.mark.parametrize(
    ("failed", "workers", "alone"),
    [(1, 3, True), (2, 3, True), (3, 3, False), (0, 3, False), (1, 2, True), (2, 2, False)],
)
def test_some_but_not_all_replicas_failed_is_a_replacement(failed, workers, alone):
    assert replaced_alone(failed, workers) is alone


@pytest.mark.parametrize(
    ("max_failures", "max_replacements", "restarts", "stops_at"),
    [
        # replacements beyond max_failures: the run goes on
        (1, 5, ["alone"] * 5, None),
        (1, 5, ["alone"] * 6, (5, "failure.max_replacements (5) replicas replaced alone spent")),
        # the whole group's restarts keep their own budget, replacements in between or not
        (1, 5, ["alone", "whole", "alone"], None),
        (
            1,
            5,
            ["alone", "whole", "alone", "whole"],
            (3, "failure.max_failures (1) restarts of the whole group spent"),
        ),
        (0, 0, ["whole"], (0, "failure.max_failures (0) restarts of the whole group spent")),
        (0, 0, ["alone"], (0, "failure.max_replacements (0) replicas replaced alone spent")),
        (-1, -1, ["alone", "whole"] * 50, None),  # -1: no limit
    ],
)
def test_each_kind_of_restart_spends_its_own_budget(max_failures, max_replacements, restarts, stops_at):
    budget = RestartBudget(max_failures, max_replacements)
    stops = [(i, why) for i, kind in enumerate(restarts) if (why := budget.spend(kind == "alone"))]
    assert (stops[0] if stops else None) == stops_at


def test_what_earlier_fits_spent_counts():
    budget = RestartBudget(max_failures=2, max_replacements=3, groups=2, replacements=3)
    assert not budget.group_restart_left()
    assert budget.spend(True) == "failure.max_replacements (3) replicas replaced alone spent"
    assert RestartBudget(2, 3, groups=1).group_restart_left()


def test_ray_trains_policy_is_replaced_by_one_counting_apart():
    """Ray Train's policy decides from the WorkerGroupError it is handed: one replica of three
    failed is a replacement, all three a restart of the whole group."""
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
    from ray.train.v2.api.config import FailureConfig
    from ray.train.v2.api.exceptions import WorkerGroupError

    from orchestrator.ray_compat import count_replacements_apart

    seen = {}

    class Trainer:
        def _initialize_and_run_controller(self, **kwargs):
            seen.update(kwargs)
            return "ran"

    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy

    trainer = Trainer()
    budget = RestartBudget(max_failures=1, max_replacements=2)
    count_replacements_apart(trainer, budget, workers=3)
    assert (
        trainer._initialize_and_run_controller(failure_policy=DefaultFailurePolicy(FailureConfig(1))) == "ran"
    )
    policy = seen["failure_policy"]
    one = WorkerGroupError("w", {1: RuntimeError("rank 1 died")})
    every = WorkerGroupError("w", {r: RuntimeError("died") for r in range(3)})
    decisions = [policy.make_decision(e) for e in (one, one, every, one)]
    assert decisions == [FailureDecision.RETRY] * 3 + [FailureDecision.RAISE]
    assert (budget.replacements, budget.groups) == (3, 1)

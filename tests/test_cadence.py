"""checkpoint.every_n_steps: auto (workers/cadence.py): the cadence as a pure function of what
saves and steps cost, and the spec that asks for it."""

from __future__ import annotations

import pytest

from orchestrator.spec import SpecError, parse_spec
from workers.cadence import FIRST_SAVE, MAX_INTERVAL, AutoCadence


def tuned(budget: float, step_s: float, stall_s: float, drain_s: float | None = None) -> tuple[int, str]:
    c = AutoCadence(budget)
    c.observe_step(step_s)
    c.observe_save(stall_s, drain_s)
    choice = c.interval()
    return choice.every_n_steps, choice.bound


@pytest.mark.parametrize(
    ("budget", "step_s", "stall_s", "drain_s", "n", "bound"),
    [
        (0.01, 0.010, 0.001, None, 10, "budget"),  # 1 ms a save over 10 ms steps: 1% at n = 10
        (0.01, 0.010, 0.0011, None, 11, "budget"),  # never over budget: round up
        (0.05, 0.010, 0.001, None, 2, "budget"),  # a looser budget, saves more often
        (0.01, 0.010, 0.001, 0.200, 20, "drain"),  # the writer needs 20 steps to drain a save
        (0.01, 0.200, 0.00001, 0.0, 1, "budget"),  # a near-free save: every step
        (0.01, 1e-6, 10.0, None, MAX_INTERVAL, "budget"),  # capped
    ],
)
def test_the_cadence_is_the_shortest_within_budget_and_never_faster_than_the_writer(
    budget: float, step_s: float, stall_s: float, drain_s: float | None, n: int, bound: str
) -> None:
    assert tuned(budget, step_s, stall_s, drain_s) == (n, bound)


def test_it_measures_first_then_retunes_when_saves_get_dearer() -> None:
    c = AutoCadence(0.01)
    first = c.interval()
    assert (first.every_n_steps, first.bound) == (FIRST_SAVE, "first") and "to measure" in first.why()
    for _ in range(20):
        c.observe_step(0.010)
    c.observe_save(0.001, None)
    cheap = c.interval().every_n_steps
    for _ in range(10):  # the state grew, or storage slowed: each save stalls 5 ms now
        c.observe_save(0.005, 0.05)
    dear = c.interval()
    assert cheap == 10 and dear.every_n_steps > 3 * cheap
    assert dear.stall_s * 1 / dear.every_n_steps <= 0.01 * dear.step_s + 1e-12  # within budget
    assert "within the 1.00% budget" in dear.why() and dear.as_dict()["stall_ms"] > 4


@pytest.mark.parametrize("budget", [0, -0.1, 1.5])
def test_a_budget_outside_0_1_is_refused(budget: float) -> None:
    with pytest.raises(ValueError, match="overhead_budget"):
        AutoCadence(budget)


BASE = {"name": "r", "storage": {"root": "/tmp/x"}, "task": {"name": "digits"}}


def test_the_spec_takes_auto_and_a_budget_and_names_the_field_when_wrong() -> None:
    spec = parse_spec({**BASE, "checkpoint": {"every_n_steps": "auto", "overhead_budget": 0.02}})
    assert spec.checkpoint.every_n_steps == "auto" and spec.checkpoint.overhead_budget == 0.02
    assert parse_spec({**BASE, "checkpoint": {"every_n_steps": 5}}).checkpoint.every_n_steps == 5
    for bad, field in [
        ({"every_n_steps": 0}, "checkpoint.every_n_steps"),
        ({"every_n_steps": "often"}, "checkpoint.every_n_steps"),
        ({"overhead_budget": 0}, "checkpoint.overhead_budget"),
        ({"overhead_budget": 2}, "checkpoint.overhead_budget"),
    ]:
        with pytest.raises(SpecError, match=field.replace(".", r"\.")):
            parse_spec({**BASE, "checkpoint": bad})
    with pytest.raises(SpecError, match="every_n_steps: auto is not supported with replicas"):
        parse_spec(
            {
                **BASE,
                "checkpoint": {"every_n_steps": "auto"},
                "failure": {"mode": "replicas"},
                "scaling": {"num_workers": 2},
            }
        )


def test_a_save_that_waited_for_the_one_before_counts_its_copy_alone() -> None:
    """Seen in the goodput bench: a mid-epoch save right after an epoch's end waited 1.25 s for
    the writer, and counted whole it stretched the cadence from 26 steps to 155. The drain
    bound keeps saves apart; the budget bound counts what a save costs the step."""
    c = AutoCadence(0.01)
    for _ in range(20):
        c.observe_step(0.2)
    c.observe_save(0.05, 2.0)
    calm = c.interval()
    c.observe_save(1.3, 2.0, waited_s=1.25)
    after = c.interval()
    assert (calm.every_n_steps, calm.bound) == (25, "budget")
    assert (after.every_n_steps, after.bound) == (25, "budget"), after
    c.observe_save(1.3, 2.0)  # the same stall, all of it the save's own: the cadence stretches
    assert c.interval().every_n_steps > 100

"""`checkpoint.every_n_steps: auto`: a mid-epoch save as often as the overhead budget allows.

The save's cost on the training thread (rank 0's stall: the gather of every rank's part and
the copy into host buffers) is paid once per save; spread over n steps it costs stall / n
per step. With a budget b (`checkpoint.overhead_budget`, a fraction of the step's time) the
cadence is the smallest n with stall / n <= b * step, and never shorter than the background
writer takes to drain one save (serialize, upload, commit), so saves never queue up behind
each other. The first save comes at FIRST_SAVE steps, to measure; every save after it
re-tunes from what the last ones cost (a bigger state or slower storage lengthens the
cadence). CheckFreq (FAST '21) tunes its own within a budget the same way.

Pure: the loop feeds it measurements, rank 0 decides and every rank hears the decision at
the save (a collective already), so every rank saves at the same step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workers.distributed import broadcast

if TYPE_CHECKING:
    from workers.calls import Coordinator
    from workers.config import WorkerConfig

FIRST_SAVE = 10  # steps into an attempt before its first save, the one that measures what a save costs
SMOOTHING = 0.3  # weight of the newest measurement (an exponential moving average)
MAX_INTERVAL = 100_000  # a ceiling for a save so cheap or a step so slow that n would be huge


@dataclass
class Choice:
    """A cadence and why: what the loop records as a `cadence` event and shows."""

    every_n_steps: int
    step_s: float
    stall_s: float
    drain_s: float
    budget: float
    bound: str  # what set it: "budget" (the stall), "drain" (the writer) or "first" (measuring)

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "every_n_steps": self.every_n_steps,
            "step_ms": round(self.step_s * 1e3, 3),
            "stall_ms": round(self.stall_s * 1e3, 3),
            "drain_ms": round(self.drain_s * 1e3, 3),
            "budget": self.budget,
            "bound": self.bound,
        }

    def why(self) -> str:
        if self.bound == "first":
            return f"a first save at step {self.every_n_steps}, to measure what a save costs"
        per = self.stall_s / self.every_n_steps / self.step_s if self.step_s > 0 else 0.0
        step, stall = f"{self.step_s * 1e3:.1f} ms a step", f"{self.stall_s * 1e3:.1f} ms"
        if self.bound == "drain":
            return (
                f"the writer takes {self.drain_s * 1e3:.0f} ms to drain a save ({step}); its {stall} "
                f"stall then costs {per:.2%} of a step"
            )
        return (
            f"a save stalls training {stall}; at {step} that is {per:.2%} of a step, within the "
            f"{self.budget:.2%} budget"
        )


@dataclass
class AutoCadence:
    budget: float  # the share of step time saves may take on the training thread (0 < b <= 1)
    step_s: float | None = None
    stall_s: float | None = None
    drain_s: float = 0.0
    choice: Choice | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 1:
            raise ValueError(f"checkpoint.overhead_budget must be in (0, 1], got {self.budget}")

    def observe_step(self, seconds: float) -> None:
        self.step_s = _ewma(self.step_s, seconds)

    def observe_save(self, stall_s: float, drain_s: float | None, waited_s: float = 0.0) -> None:
        """A save's stall on the training thread; the writer's time for the last save it
        drained (None: none drained yet); `waited_s`, the part of the stall spent waiting for
        the save before to leave the host buffers. That part is not what a save costs but a
        save come too soon after another (an epoch's end, which the cadence does not place,
        then a mid-epoch one): the drain bound keeps saves apart, so the budget bound counts
        the copy alone. Counted in, one such wait (1.3 s against a 50 ms copy, seen in the
        goodput bench) stretched the cadence from 26 steps to 155."""
        self.stall_s = _ewma(self.stall_s, max(0.0, stall_s - waited_s))
        if drain_s is not None:
            self.drain_s = drain_s if self.drain_s == 0.0 else _ewma(self.drain_s, drain_s)

    def interval(self) -> Choice:
        """How many steps until the next save, and why."""
        if self.step_s is None or self.stall_s is None or self.step_s <= 0:
            step, stall = self.step_s or 0.0, self.stall_s or 0.0
            choice = Choice(FIRST_SAVE, step, stall, self.drain_s, self.budget, "first")
        else:
            by_budget = _ceil(self.stall_s / (self.budget * self.step_s))
            by_drain = _ceil(self.drain_s / self.step_s)
            n = min(MAX_INTERVAL, max(1, by_budget, by_drain))
            bound = "drain" if by_drain > by_budget else "budget"
            choice = Choice(n, self.step_s, self.stall_s, self.drain_s, self.budget, bound)
        self.choice = choice
        return choice


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)  # 10.000000000000002 steps is 10: float noise, not a budget overrun


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new


class SaveClock:
    """When the built-in loop saves mid-epoch: every n global steps (a number), as often as
    AutoCadence allows (auto), or never (no every_n_steps). Every rank keeps one; with auto,
    rank 0 measures and decides at each save and every rank hears it there."""

    def __init__(self, cfg: WorkerConfig, rank: int, coord: Coordinator) -> None:
        self.fixed, self.rank, self.coord = cfg.every_n_steps, rank, coord
        self.auto = AutoCadence(cfg.auto_budget) if cfg.auto_budget else None
        self.next_save: int | None = None  # FIRST_SAVE steps into this attempt, then as tuned
        self._last: float | None = None  # the end of the last step (or save)
        self._told: int | None = None  # the cadence last recorded as an event

    def step_done(self, global_step: int) -> bool:
        """A step ended: whether a mid-epoch save is due now."""
        now = time.perf_counter()
        if self.auto is not None and self._last is not None:
            self.auto.observe_step(now - self._last)
        self._last = now
        if self.fixed:
            return global_step % self.fixed == 0
        if self.next_save is None:  # an attempt (a resume too) measures before it tunes
            self.next_save = global_step - 1 + FIRST_SAVE
        return self.auto is not None and global_step >= self.next_save

    def save(self, save: Callable[[], None], global_step: int, writer: Any) -> None:
        """Run a save (every rank, at the same step); with auto, re-tune from what it cost."""
        t0 = time.perf_counter()
        save()
        if self.auto is None:
            return
        n = None
        if self.rank == 0:
            drained, waited = (writer.drain_s, getattr(writer, "waited_s", 0.0)) if writer else (None, 0.0)
            self.auto.observe_save(time.perf_counter() - t0, drained, waited)
            choice = self.auto.interval()
            n = choice.every_n_steps
            if self._told is None or abs(n - self._told) > 0.25 * self._told:  # news, not noise
                self.coord.note("cadence", {**choice.as_dict(), "why": choice.why()})  # not waited for
                self._told = n
        self.next_save = global_step + broadcast(n)
        self._last = time.perf_counter()  # the save's time is not a step's

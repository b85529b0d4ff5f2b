"""Retention policies: pure functions from committed checkpoints to what to keep.

Policy decides, the coordinator acts. Nothing here touches storage or Ray, so
every rule is a table test. A kept checkpoint carries the reasons it is kept
("best-k", "latest", "milestone", "resumed-from"), which `orchestrator
checkpoints` shows to users.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from orchestrator.core.errors import InputError


class RetentionError(InputError, ValueError):
    """A retention argument no policy can hold (a count below 1, an unknown mode): refused as the
    policy is built, whoever builds it (the spec checks the same first, in its own words)."""


def _at_least_one(name: str, value: object) -> None:
    # bool is an int, but True as a count is a mistake; 0 would keep nothing or divide by zero
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RetentionError(f"{name} must be an integer >= 1, got {value!r}")


def _a_mode(value: object) -> None:
    if value not in ("min", "max"):
        raise RetentionError(f"mode must be 'min' or 'max', got {value!r}")


@dataclass(frozen=True)
class Ckpt:
    """What retention needs to know of one committed checkpoint."""

    id: str
    seq: int  # commit order; larger is newer
    epoch: int
    end_of_epoch: bool
    # The monitored value measured on these weights; None when the checkpoint carries no
    # fresh metric (metrics_fresh: a save between evaluations), which keeps it out of best-k.
    value: float | None


class Policy(Protocol):
    @property
    def reason(self) -> str: ...

    def keep(self, ckpts: Sequence[Ckpt]) -> list[str]: ...


@dataclass(frozen=True)
class BestK:
    k: int
    mode: Literal["min", "max"]
    reason: str = "best-k"

    def __post_init__(self) -> None:
        _at_least_one("top_k", self.k)
        _a_mode(self.mode)

    def keep(self, ckpts: Sequence[Ckpt]) -> list[str]:
        return [c.id for c in rank_best(ckpts, self.mode)[: self.k]]


@dataclass(frozen=True)
class LatestN:
    n: int
    reason: str = "latest"

    def __post_init__(self) -> None:
        # 0 would keep nothing new: the latest commit, the one a resume needs, would be dropped.
        _at_least_one("keep_latest", self.n)

    def keep(self, ckpts: Sequence[Ckpt]) -> list[str]:
        return [c.id for c in sorted(ckpts, key=lambda c: c.seq, reverse=True)[: self.n]]


@dataclass(frozen=True)
class EveryNEpochs:
    n: int
    reason: str = "milestone"

    def __post_init__(self) -> None:
        _at_least_one("keep_every_n_epochs", self.n)  # 0 would divide by zero in keep()

    def keep(self, ckpts: Sequence[Ckpt]) -> list[str]:
        # One milestone per epoch: the newest end-of-epoch save of it.
        newest: dict[int, Ckpt] = {}
        for c in ckpts:
            if c.end_of_epoch and c.epoch % self.n == 0:
                if c.epoch not in newest or c.seq > newest[c.epoch].seq:
                    newest[c.epoch] = c
        return [c.id for c in sorted(newest.values(), key=lambda c: c.seq)]


@dataclass(frozen=True)
class Pinned:
    ids: frozenset[str]
    reason: str = "resumed-from"

    def keep(self, ckpts: Sequence[Ckpt]) -> list[str]:
        return [c.id for c in ckpts if c.id in self.ids]


@dataclass(frozen=True)
class RetentionConfig:
    """The spec's retention options, as the coordinator applies them and the manifest stores them."""

    monitor: str  # the metric that ranks checkpoints
    mode: Literal["min", "max"]  # min for losses, max for accuracies
    top_k: int  # best checkpoints to keep
    keep_latest: int  # newest checkpoints to keep (resume needs >= 1)
    keep_every_n_epochs: int | None = None  # milestones

    def __post_init__(self) -> None:
        _a_mode(self.mode)
        _at_least_one("top_k", self.top_k)
        _at_least_one("keep_latest", self.keep_latest)

    def policies(self, pinned: Iterable[str] = ()) -> list[Policy]:
        return policies_for(self.top_k, self.mode, self.keep_latest, self.keep_every_n_epochs, pinned)


@dataclass(frozen=True)
class Decision:
    keep: dict[str, tuple[str, ...]] = field(default_factory=dict)  # id -> reasons
    drop: tuple[str, ...] = ()


def metrics_fresh(
    metrics: Mapping[str, float],
    monitor: str,
    *,
    end_of_epoch: bool,
    evaluated: bool | None = None,
    last_value: float | None = None,
) -> bool:
    """Whether a report's metrics were measured on the weights it reports: the one rule for
    what competes for best-k, becomes its epoch's metrics row and is looked at by
    checkpoint.stop_on_nan.

    `evaluated` is the caller's word when it knows (an evaluation just ran: the built-in loop's
    epoch end, a Hugging Face evaluation, a Lightning validation; False: a save between
    evaluations). None (a train function that did not say): an epoch's end is fresh; mid-epoch,
    the monitor must be there, finite (NaN is the placeholder of a save before any evaluation)
    and not `last_value`, the monitor of the last fresh report (carried over unchanged)."""
    if evaluated is not None:
        return evaluated
    if end_of_epoch:
        return True
    value = metrics.get(monitor)
    return value is not None and math.isfinite(value) and value != last_value


def not_finite(metrics: Mapping[str, float], monitor: str, *, fresh: bool) -> list[str]:
    """The metrics checkpoint.stop_on_nan stops a run for: every non-finite one of a fresh
    report; of one that is not fresh, all but the monitor (its NaN is the placeholder of a save
    before any evaluation, or a carried value; a train loss beside it was measured on this
    state, and a NaN there is a divergence that must not be committed as `latest`)."""
    return sorted(k for k, v in metrics.items() if not math.isfinite(v) and (fresh or k != monitor))


def rank_best(ckpts: Iterable[Ckpt], mode: str) -> list[Ckpt]:
    """Checkpoints with a fresh, finite metric, best first; ties go to the newer.

    NaN and inf are never ranked: a diverged epoch is not "best", whatever the mode."""
    sign = 1.0 if mode == "min" else -1.0
    ranked = [c for c in ckpts if c.value is not None and math.isfinite(c.value)]
    return sorted(ranked, key=lambda c: (sign * c.value, -c.seq))  # type: ignore[operator]


def decide(ckpts: Sequence[Ckpt], policies: Sequence[Policy]) -> Decision:
    """The union of what each policy keeps; everything else is dropped."""
    reasons: dict[str, list[str]] = {}
    for policy in policies:
        for cid in policy.keep(ckpts):
            reasons.setdefault(cid, []).append(policy.reason)
    keep = {c.id: tuple(reasons[c.id]) for c in ckpts if c.id in reasons}
    drop = tuple(c.id for c in ckpts if c.id not in reasons)
    return Decision(keep=keep, drop=drop)


def policies_for(
    top_k: int,
    mode: Literal["min", "max"],
    keep_latest: int,
    keep_every_n_epochs: int | None,
    pinned: Iterable[str] = (),
) -> list[Policy]:
    """Translate the spec's flat options into policies, once, at the edge."""
    out: list[Policy] = [BestK(top_k, mode), LatestN(keep_latest)]
    if keep_every_n_epochs:
        out.append(EveryNEpochs(keep_every_n_epochs))
    pins = frozenset(pinned)
    if pins:
        out.append(Pinned(pins))
    return out

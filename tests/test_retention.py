"""Retention as tables: checkpoints and metrics in, kept ids and reasons out."""

import math

import pytest

from orchestrator.core.errors import InputError
from orchestrator.core.retention import (
    BestK,
    Ckpt,
    EveryNEpochs,
    LatestN,
    Pinned,
    RetentionConfig,
    decide,
    metrics_fresh,
    not_finite,
    policies_for,
    rank_best,
)

NAN = math.nan
INF = math.inf


def ck(seq, value, epoch=None, end=True):
    return Ckpt(
        id=f"c{seq}",
        seq=seq,
        epoch=epoch if epoch is not None else seq,
        end_of_epoch=end,
        value=value,
    )


@pytest.mark.parametrize(
    "values, mode, k, expected",
    [
        ([0.5, 0.3, 0.4, 0.6], "min", 2, ["c2", "c3"]),
        ([0.5, 0.3, 0.4, 0.6], "max", 2, ["c4", "c1"]),
        ([0.5, 0.3], "min", 5, ["c2", "c1"]),  # k larger than the count keeps all
        ([NAN, 0.9, NAN], "min", 2, ["c2"]),  # NaN is never ranked, so never best-k
        ([NAN, 0.1, NAN], "max", 1, ["c2"]),  # in max mode neither
        ([INF, 0.9, -INF], "max", 2, ["c2"]),  # nor inf, whichever the mode
        ([-INF, 0.9], "min", 1, ["c2"]),
        ([0.2, 0.2, 0.2], "min", 2, ["c3", "c2"]),  # ties go to the newer
        ([0.7, 0.7, 0.1], "max", 1, ["c2"]),
    ],
)
def test_best_k(values, mode, k, expected):
    ckpts = [ck(i + 1, v) for i, v in enumerate(values)]
    assert BestK(k, mode).keep(ckpts) == expected


def test_checkpoints_without_fresh_metric_are_not_ranked():
    ckpts = [ck(1, 0.5), ck(2, None, epoch=2, end=False), ck(3, 0.6)]
    assert BestK(3, "min").keep(ckpts) == ["c1", "c3"]
    assert [c.id for c in rank_best(ckpts, "min")] == ["c1", "c3"]


@pytest.mark.parametrize("n, expected", [(1, ["c4"]), (2, ["c4", "c3"]), (9, ["c4", "c3", "c2", "c1"])])
def test_latest_n(n, expected):
    assert LatestN(n).keep([ck(s, 0.0) for s in (1, 2, 3, 4)]) == expected


def test_milestones_are_end_of_epoch_multiples_newest_per_epoch():
    ckpts = [
        ck(1, 0.1, epoch=1),
        ck(2, 0.1, epoch=2),
        ck(3, None, epoch=3, end=False),  # mid-epoch 3: never a milestone
        ck(4, 0.1, epoch=3),
        ck(5, 0.1, epoch=4),
        ck(6, 0.1, epoch=4),  # epoch 4 redone after a restart: the newer wins
    ]
    assert EveryNEpochs(2).keep(ckpts) == ["c2", "c6"]
    assert EveryNEpochs(3).keep(ckpts) == ["c4"]


def test_union_with_reasons_and_drop():
    ckpts = [ck(1, 0.9), ck(2, 0.1), ck(3, 0.5), ck(4, 0.8), ck(5, 0.7)]
    d = decide(
        ckpts,
        policies_for(top_k=2, mode="min", keep_latest=1, keep_every_n_epochs=4, pinned=["c1"]),
    )
    assert d.keep == {
        "c1": ("resumed-from",),
        "c2": ("best-k",),
        "c3": ("best-k",),
        "c4": ("milestone",),
        "c5": ("latest",),
    }
    assert d.drop == ()
    d = decide(ckpts, policies_for(top_k=1, mode="min", keep_latest=1, keep_every_n_epochs=None))
    assert d.keep == {"c2": ("best-k",), "c5": ("latest",)}
    assert d.drop == ("c1", "c3", "c4")


def test_best_and_latest_together():
    d = decide([ck(1, 0.9), ck(2, 0.1)], [BestK(1, "min"), LatestN(1), Pinned(frozenset())])
    assert d.keep == {"c2": ("best-k", "latest")}
    assert d.drop == ("c1",)


def test_empty():
    assert decide([], policies_for(3, "min", 1, 2)).keep == {}


@pytest.mark.parametrize("k, mode", [(0, "min"), (2, "avg")])
def test_bad_policy_arguments(k, mode):
    with pytest.raises(ValueError):
        BestK(k, mode)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: LatestN(0), "keep_latest"),
        (lambda: EveryNEpochs(0), "keep_every_n_epochs"),
        (lambda: LatestN(-2), "keep_latest"),
        (lambda: EveryNEpochs(1.5), "keep_every_n_epochs"),
    ],
)
def test_a_policy_refuses_what_would_keep_nothing_or_divide_by_zero(make, field):
    """The invariants live in the policies, not only in the spec that builds them."""
    with pytest.raises(ValueError, match=f"{field} must be an integer >= 1"):
        make()


@pytest.mark.parametrize(
    "make, argument, value",
    [
        (lambda: LatestN(0), "keep_latest", "0"),
        (lambda: EveryNEpochs(0), "keep_every_n_epochs", "0"),
        (lambda: BestK(0, "min"), "top_k", "0"),
        (lambda: BestK(1.5, "min"), "top_k", "1.5"),
        (lambda: BestK(1, "avg"), "mode", "'avg'"),
        (lambda: RetentionConfig("val_loss", "min", top_k=1, keep_latest=0), "keep_latest", "0"),
    ],
)
def test_a_bad_policy_argument_is_an_input_error_naming_it_and_its_value(make, argument, value):
    """Within the project's error hierarchy: exit 2 at the command line, and still a ValueError."""
    with pytest.raises(InputError) as e:
        make()
    assert isinstance(e.value, ValueError) and e.value.exit_code == 2
    assert argument in str(e.value) and f"got {value}" in str(e.value)


@pytest.mark.parametrize(
    "metrics, end, evaluated, last, fresh",
    [
        # an epoch's end: fresh, whatever it carries (a NaN there is a real divergence)
        ({"val_loss": 0.4}, True, None, None, True),
        ({"val_loss": NAN}, True, None, 0.4, True),
        # mid-epoch, a train function that did not say: a new finite monitor is fresh
        ({"val_loss": 0.3}, False, None, 0.4, True),
        ({"val_loss": 0.3}, False, None, None, True),
        # ... the NaN placeholder of a save before any evaluation is not
        ({"val_loss": NAN}, False, None, None, False),
        ({"val_loss": INF}, False, None, 0.4, False),
        # ... nor the last evaluation's value carried over, nor no monitor at all
        ({"val_loss": 0.4, "train_loss": 0.1}, False, None, 0.4, False),
        ({"train_loss": 0.1}, False, None, None, False),
        # the caller's word wins: an evaluation ran (a NaN it measured is real), or none did
        ({"val_loss": NAN}, False, True, None, True),
        ({"val_loss": 0.4}, False, True, 0.4, True),
        ({"val_loss": 0.3}, False, False, 0.4, False),
        ({"val_loss": 0.3}, True, False, None, False),
    ],
)
def test_metrics_are_fresh_when_measured_on_the_weights_reported(metrics, end, evaluated, last, fresh):
    assert metrics_fresh(metrics, "val_loss", end_of_epoch=end, evaluated=evaluated, last_value=last) is fresh


@pytest.mark.parametrize(
    ("metrics", "fresh", "stops_for"),
    [
        ({"val_loss": math.nan}, False, []),  # the placeholder before any evaluation
        ({"val_loss": math.nan, "train_loss": 0.3}, False, []),
        ({"val_loss": 0.4, "train_loss": math.nan}, False, ["train_loss"]),  # diverged: not saved
        ({"val_loss": math.nan, "train_loss": math.inf}, False, ["train_loss"]),
        ({"val_loss": math.nan}, True, ["val_loss"]),  # a fresh evaluation that diverged
        ({"val_loss": 0.4, "val_acc": math.nan}, True, ["val_acc"]),
        ({"val_loss": 0.4, "train_loss": 0.3}, True, []),
    ],
)
def test_stop_on_nan_spares_only_the_monitor_of_a_report_that_is_not_fresh(metrics, fresh, stops_for):
    """A mid-epoch report's NaN monitor is a placeholder; a NaN train loss beside it was measured
    on the state being saved, and stop_on_nan must stop before it is committed as `latest`."""
    assert not_finite(metrics, "val_loss", fresh=fresh) == stops_for

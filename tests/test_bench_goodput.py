"""The goodput benchmark's arithmetic (bench/goodput.py): its seeded failure schedule and how a
run's marks become goodput and the split of the time lost. No timing is asserted."""

from __future__ import annotations

import pytest

from bench import goodput


def test_schedule_is_seeded_spread_and_kills_rank0() -> None:
    a = goodput.schedule(seed=3, steps=960, per_epoch=24, failures=3, world=2)
    assert a == goodput.schedule(seed=3, steps=960, per_epoch=24, failures=3, world=2)
    assert [k["step"] for k in a] == sorted(k["step"] for k in a)
    assert all(24 <= k["step"] < 960 - 24 for k in a)  # never in the first or the last epoch
    stretch = (960 - 48) / 3
    for i, k in enumerate(a):  # one in each equal stretch: a steady rate
        assert 24 + int(i * stretch) <= k["step"] < 24 + int((i + 1) * stretch)
        assert (k["epoch"] - 1) * 24 + k["in_epoch"] == k["step"]  # the chaos kill's coordinates
    for seed in range(20):
        assert 0 in [k["rank"] for k in goodput.schedule(seed, 384, 24, 2, 2)]
    assert goodput.schedule(0, 48, 24, 2, 2) == []  # no room between the first and last epoch


def _rows(pid: int, times: list[float], first_idx: int = 0) -> list[tuple[float, int, list[int]]]:
    return [(t, pid, [first_idx + i]) for i, t in enumerate(times)]


def test_analyse_splits_a_group_restart() -> None:
    # 6 job steps a second apart on 2 ranks; a kill of rank 0 at t=2.5 after step 3; both
    # restart at t=6, resume from step 2 at t=7: steps 3..6 again (one redone).
    before = [0.0, 1.0, 2.0]
    after = [7.0, 8.0, 9.0, 10.0]
    steps = {
        0: _rows(100, before) + _rows(101, after, 2),
        1: _rows(200, before, 10) + _rows(201, after, 12),
    }
    starts = {0: [-1.0, 6.0], 1: [-1.0, 6.0]}
    out = goodput.analyse(steps, starts, [(2.5, 0)], job_steps=6)
    assert out["wall_s"] == 10.0
    assert out["step_s"] == 1.0
    assert out["redone_steps"] == 1
    (f,) = out["failures"]
    assert f["restart_s"] == 3.5 and f["restore_s"] == 1.0
    assert f["stood_still_s"] == 5.0  # the last step before the kill (2.0) to the first after (7.0)
    assert f["degraded_steps"] == 0
    assert out["samples"][2] == 2 and out["samples"][0] == 1  # sample 2 trained twice


def test_analyse_counts_steps_a_replica_missed() -> None:
    # rank 1 killed at t=2.5; rank 0 trains on (steps at 3, 4, 5); rank 1 back at t=5.5.
    steps = {
        0: _rows(100, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        1: _rows(200, [0.0, 1.0, 2.0]) + _rows(201, [6.0]),
    }
    starts = {0: [-1.0], 1: [-1.0, 5.5]}
    out = goodput.analyse(steps, starts, [(2.5, 1)], job_steps=7)
    (f,) = out["failures"]
    assert f["degraded_steps"] == 3
    assert f["stood_still_s"] == 1.0  # training never stopped
    assert out["redone_steps"] == 0


def test_split_adds_up_and_counts_skipped_samples() -> None:
    clean = {"wall_s": 11.0, "step_s": 0.5, "samples": {0: 2, 1: 2, 2: 2}, "failures": []}
    failed = {
        "wall_s": 20.0,
        "redone_steps": 4,
        "samples": {0: 3, 1: 2, 2: 1},  # sample 0 once more (redone), sample 2 once short
        "failures": [
            {"rank": 0, "restart_s": 3.0, "restore_s": 1.0, "stood_still_s": 4.5, "degraded_steps": 0}
        ],
    }
    x = goodput.split(clean, failed, ref_clean_s=10.0)
    assert x["goodput"] == pytest.approx(0.5)
    assert x["lost_s"] == 10.0 and x["overhead_s"] == 1.0 and x["redone_s"] == 2.0
    assert x["overhead_s"] + x["stood_still_s"] + x["redone_s"] + x["other_s"] == pytest.approx(x["lost_s"])
    assert x["samples_skipped"] == 1

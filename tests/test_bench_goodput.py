"""The goodput benchmark's arithmetic (bench/goodput.py): its seeded failure schedule and how a
run's marks become goodput and the split of the time lost. No timing is asserted."""

from __future__ import annotations

from typing import Any

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


def test_schedule_loses_nodes_and_still_sigkills_rank0() -> None:
    for seed in range(30):
        a = goodput.schedule(seed, 288, 24, failures=3, world=2, node_losses=1)
        assert sorted(k["kind"] for k in a) == ["kill", "kill", "node"]
        assert 0 in [k["rank"] for k in a if k["kind"] == "kill"]  # the writer SIGKILLed
    assert {k["kind"] for k in goodput.schedule(1, 288, 24, 3, 2)} == {"kill"}
    # a node loss never takes every failure: a SIGKILL of rank 0 is kept
    assert [k["kind"] for k in goodput.schedule(2, 288, 24, 1, 2, node_losses=1)] == ["kill"]


def test_node_loss_targets_the_batch_the_loop_trains_at_that_step() -> None:
    """The step function finds a node loss's point by its batch: the batch must be the one the
    project's loop gives that rank at (epoch, step), for a DataLoader and for a dataset."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from workers.data import rank_batches
    from workers.task import TaskContext

    k = {"rank": 1, "epoch": 3, "in_epoch": 5, "step": 53, "kind": "node"}
    ctx = TaskContext(rank=1, world_size=2, seed=7, device=torch.device("cpu"))
    for loader in (True, False):
        got = goodput.node_loss_batches({"nodes": [(4, k)], "loader": loader, "batch": 32}, ctx)
        if loader:
            data = TensorDataset(torch.arange(goodput.TRAIN))
            sampler: DistributedSampler[int] = DistributedSampler(data, num_replicas=2, rank=1, seed=7)
            sampler.set_epoch(3)  # what workers/data.py does with the loop's epoch (1-based)
            want = list(DataLoader(data, batch_size=32, sampler=sampler, drop_last=True))[5][0].tolist()
        else:
            want = rank_batches(goodput.TRAIN, 32, 7, 3, 2, 1)[5]
        assert got == {tuple(want): 4}
    assert (
        goodput.node_loss_batches(
            {"nodes": [(4, k)], "loader": True, "batch": 32}, TaskContext(0, 2, 7, ctx.device)
        )
        == {}
    )


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


def _run(wall: float, redone: int, cadence: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    fails = [{"rank": 0, "restart_s": 1.0, "restore_s": 0.5, "stood_still_s": 2.0, "degraded_steps": 0}]
    return {
        "wall_s": wall,
        "step_s": 0.1,
        "redone_steps": redone,
        "failures": fails if redone else [],
        "samples": {0: 1},
        "cadence": cadence or [],
    }


def test_summarize_gives_every_key_and_the_auto_cadence() -> None:
    """Every key of goodput.KEYS is written; every_n_steps: auto's are its failure-free wall over
    restart mode's and its steps redone per failure; the table says the cadence it chose."""
    kills = [{"step": 30, "rank": 0, "kind": "kill"}, {"step": 60, "rank": 1, "kind": "node"}]
    chose = {"every_n_steps": 3, "step_ms": 100.0, "stall_ms": 2.0, "drain_ms": 250.0, "budget": 0.01}
    runs = {
        "ray": {"clean": [_run(12.0, 0)], "failed": [_run(20.0, 24)]},
        "ray_tuned": {"clean": [_run(10.0, 0)], "failed": [_run(16.0, 24)]},
        "restart": {"clean": [_run(10.0, 0)], "failed": [_run(15.0, 24)]},
        "replicas": {"clean": [_run(13.0, 0)], "failed": [_run(15.0, 1)]},
        "auto": {
            "clean": [_run(10.5, 0, [{**chose, "bound": "first"}, {**chose, "bound": "drain"}])],
            "failed": [_run(12.0, 4)],
        },
    }
    cfg = {"world": 2, "every": 12, "rounds": 1}
    g = goodput.summarize(runs, {}, kills, cfg, 96)
    assert set(goodput.KEYS) <= set(g["ratios"])
    assert g["ratios"]["auto_clean_vs_restart"] == 1.05
    assert g["ratios"]["auto_redone_per_failure"] == 2.0
    assert g["best_of_ours"] == "auto"  # lost 2 s, against restart's 5 and replicas' 5
    assert g["ratios"]["lost_vs_ray_tuned"] == round(2.0 / 6.0, 3)
    text = goodput.table(g)
    assert "a save every 3 steps (drain bound" in text and "0.67% of step time" in text, text
    assert "node lost with rank 1 after step 60" in text

"""failure.mode replicas, the parts no Ray run is needed for: each rank's own RNG streams in a
replica checkpoint and across a heal, and a DataLoader's position handed on by a heal.
The e2e runs are in tests/test_replicas.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from tests.test_train_state import _cfg, _state, _train
from workers.format import Position
from workers.state import Saver


def _saved_ranks(world: int, at: Position) -> list[dict[str, Any]]:
    """The per-rank part of a replica checkpoint rank 0 writes (its writer's files, as handed)."""
    cfg = _cfg(replicas=True)
    state = _state(0, cfg)
    _train(state, at.global_step)
    got: list[dict[str, Any]] = []
    session = SimpleNamespace(
        cfg=cfg,
        world=world,
        rank=0,
        writer=object(),
        save_files=lambda *a, fresh: got.append(a[-1]),
    )
    Saver(state, session).save(at)  # type: ignore[arg-type]
    return got[0]["train_state.pt"]["ranks"]  # type: ignore[no-any-return]


def _draws(rng: dict[str, Any]) -> tuple[float, ...]:
    """What a rank restored with these streams draws first (torch, NumPy, Python)."""
    import random

    import numpy as np

    from workers.rng import capture_rng, restore_rng

    saved = capture_rng()
    try:
        restore_rng(rng)
        return (torch.rand(1).item(), float(np.random.rand()), random.random())
    finally:
        restore_rng(saved)


def test_a_replica_checkpoint_holds_each_ranks_own_rng_streams() -> None:
    """The defect: rank 0's streams stood for every rank, so a resume (in failure.mode restart)
    gave every rank the same dropout masks and augmentations."""
    ranks = _saved_ranks(3, Position(1, 4, 4, False))
    draws = [_draws(r["rng"]) for r in ranks]
    for a in range(3):
        for b in range(a + 1, 3):
            assert all(x != y for x, y in zip(draws[a], draws[b], strict=True)), (a, b, draws)


def _loader_task(rank: int, workers: int = 0) -> Any:
    from torch.utils.data import DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    from tests.test_dataloader_task import Counted, task_over

    data = Counted(40)
    sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=3)
    return task_over(StatefulDataLoader(data, batch_size=4, sampler=sampler, num_workers=workers)), data


def _flat(batch: Any) -> list[int]:
    return [int(i) for i in batch.flatten()]


def test_a_heal_puts_a_replacements_loader_at_the_peers_step_of_its_own_shard() -> None:
    """Rank 0 hands its loader's position at (epoch 2, step 3) to rank 1's replacement: rank 1
    reads on from step 3 of its own shard, having read nothing before it; a step asked for
    again is the same batch, and the position handed for it is the one before it."""
    from workers.replica_data import ReplicaBatches

    cpu = torch.device("cpu")
    peer_task, _ = _loader_task(0)
    peer = ReplicaBatches(peer_task, 3, 2, 0, cpu)
    assert peer.steps(2) == 5
    first = [peer.batch(2, s) for s in range(3)]
    assert peer.batch(2, 2) is first[2]  # a step trained again: the same batch
    assert peer.position(2, 2) is not None and peer.position(2, 3) is not None

    whole_task, _ = _loader_task(1)
    whole = ReplicaBatches(whole_task, 3, 2, 1, cpu)
    expected = [_flat(whole.batch(2, s)) for s in range(5)]  # rank 1's epoch 2, read whole

    task, data = _loader_task(1)
    healed = ReplicaBatches(task, 3, 2, 1, cpu)
    healed.hand(2, 3, 5, peer.position(2, 3))
    assert [_flat(healed.batch(2, s)) for s in (3, 4)] == expected[3:]
    assert data.reads == 8  # the two batches it trained, nothing of the epoch's head
    assert not set(expected[3]) & set(_flat(peer.batch(2, 3)))  # the shards are apart

    again = ReplicaBatches(_loader_task(1)[0], 3, 2, 1, cpu)
    again.hand(2, 2, 5, peer.position(2, 2))  # the position before the batch kept for step 2
    assert _flat(again.batch(2, 2)) == expected[2]


def test_a_loader_position_from_another_rank_gets_this_ranks_own_worker_seed() -> None:
    """A replica's loader draws its workers' base seed from its torch stream at an epoch's
    first step; loader_base_seed names that seed, so a position handed from a peer (a heal, a
    checkpoint rank 0 wrote for every rank) gets the receiving rank's own back."""
    from workers.replica_streams import loader_base_seed, own_loader_state, seed_step

    task, _ = _loader_task(0, workers=2)
    seed_step(3, 0, 10)  # rank 0's streams at the epoch's first step (global step 10)
    iter(task.train_data)
    state = task.train_data.state_dict()  # type: ignore[union-attr]
    drawn = state["_snapshot"]["_main_snapshot"]["_base_seed"]
    assert drawn == loader_base_seed(3, 0, 10)
    mine = own_loader_state(state, 3, 1, 10)
    assert mine["_snapshot"]["_main_snapshot"]["_base_seed"] == loader_base_seed(3, 1, 10) != drawn
    assert state["_snapshot"]["_main_snapshot"]["_base_seed"] == drawn  # the peer's left as it was


def test_a_mid_epoch_replica_checkpoint_resumes_each_ranks_loader_at_the_next_batch() -> None:
    """A replica checkpoint of a DataLoader task taken after step 3: rank 0 (replicas, a
    resume or a whole restart) restores it and reads on at step 3, and rank 1 resuming it in
    failure.mode restart reads on at step 3 of its own shard; neither reads the epoch's head."""
    from tests.test_train_state import _written
    from workers.data import train_batches
    from workers.replica_state import ReplicaState
    from workers.resume import restore

    cpu, cfg = torch.device("cpu"), _cfg(replicas=True, seed=3)
    expected = {}
    for rank in (0, 1):
        task, _ = _loader_task(rank)
        expected[rank] = [_flat(b) for _, b in train_batches(task, 3, 1, 2, rank, cpu)[1]]

    task, _ = _loader_task(0)
    live = ReplicaState(task, task.model, cfg, cpu, rank=0, world=2)
    for s in range(3):
        live.batches.batch(1, s)
    live.step = live.global_step = 3
    got: list[dict[str, Any]] = []
    session = SimpleNamespace(
        cfg=cfg, world=2, rank=0, writer=object(), save_files=lambda *a, fresh: got.append(a[-1])
    )
    Saver(live, session).save(Position(1, 3, 3, False))  # type: ignore[arg-type]
    blobs = _written(got[0])

    def resumed(rank: int, replicas: Any) -> Any:
        task, data = _loader_task(rank)
        state = replicas(task)
        out = restore(
            SimpleNamespace(cfg=cfg, rank=rank, world=2, attempt=2, restored_files=lambda: blobs), state
        )  # type: ignore[arg-type]
        return task, data, state, out

    task0, data0, state0, out0 = resumed(0, lambda t: ReplicaState(t, t.model, cfg, cpu, rank=0, world=2))
    state0.resumed_at(out0.loader_state)
    assert [_flat(state0.batches.batch(1, s)) for s in (3, 4)] == expected[0][3:]
    assert data0.reads == 8

    from workers.state import TrainState

    task1, data1, _, out1 = resumed(1, lambda t: TrainState(t, t.model, _cfg(seed=3), cpu))
    rest = train_batches(task1, 3, 1, 2, 1, cpu, first=out1.start_step, loader_state=out1.loader_state)[1]
    assert [_flat(b) for _, b in rest] == expected[1][3:]
    assert data1.reads == 8

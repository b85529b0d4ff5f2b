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

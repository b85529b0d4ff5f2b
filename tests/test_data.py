"""The data order: a pure function of (seed, epoch, world size)."""

from collections import Counter

import pytest

from workers.data import epoch_permutation, rank_batches, shard


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n, batch", [(100, 8), (1437, 32), (10, 3)])
def test_every_sample_once_per_epoch_except_padding(world, n, batch):
    seen = Counter()
    steps = set()
    for rank in range(world):
        batches = rank_batches(n, batch, seed=3, epoch=2, world_size=world, rank=rank)
        steps.add(len(batches))
        for b in batches:
            seen.update(b)
    assert len(steps) == 1, "every rank must take the same number of steps"
    assert set(seen) == set(range(n))
    pad = -n % world
    assert sum(seen.values()) == n + pad
    assert sum(c - 1 for c in seen.values()) == pad


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("resume_at", [0, 1, 5, 11])
def test_resume_skips_exactly_what_was_seen(world, resume_at):
    n, batch = 300, 8
    for rank in range(world):
        full = rank_batches(n, batch, 11, 4, world, rank)
        # A resumed worker recomputes the order and skips the first resume_at batches.
        before = full[:resume_at]
        after = rank_batches(n, batch, 11, 4, world, rank)[resume_at:]
        assert before + after == full


@pytest.mark.parametrize("world", [1, 2, 3])
def test_consumption_across_a_resume_matches_an_uninterrupted_run(world):
    """Samples trained over three epochs, with a stop at (epoch 2, step 5) and a resume that
    recomputes the order, equal the uninterrupted sequence: none skipped, none repeated."""
    n, batch, seed = 97, 4, 5

    def consume(epochs, start=(1, 0), stop=None):
        out = []
        for epoch in epochs:
            for rank in range(world):
                batches = rank_batches(n, batch, seed, epoch, world, rank)
                first = start[1] if epoch == start[0] else 0
                last = stop[1] if stop and epoch == stop[0] else len(batches)
                out += [(epoch, rank, i) for b in batches[first:last] for i in b]
        return out

    full = consume([1, 2, 3])
    resumed = consume([1, 2], stop=(2, 5)) + consume([2, 3], start=(2, 5))
    assert sorted(resumed) == sorted(full)
    assert len(resumed) == len(full)


def test_order_depends_on_seed_and_epoch_only():
    assert epoch_permutation(50, 1, 1) == epoch_permutation(50, 1, 1)
    assert epoch_permutation(50, 1, 1) != epoch_permutation(50, 1, 2)
    assert epoch_permutation(50, 1, 1) != epoch_permutation(50, 2, 1)
    assert sorted(epoch_permutation(50, 9, 9)) == list(range(50))


def test_eval_shard_covers_each_index_once():
    parts = [shard(11, 3, r) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))


def test_rank_outside_world():
    with pytest.raises(ValueError, match="rank 2 outside world of 2"):
        rank_batches(10, 2, 0, 1, 2, 2)

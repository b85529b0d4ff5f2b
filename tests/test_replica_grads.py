"""Replicas mode's bucketed gradient all-reduce (workers/replica_grads.py) and rank 0's word
as a sum (workers/replicas.py), on a fake manager: pure logic, no Ray, no torchft. The real
thing, with kills and heals, is tests/test_replicas.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workers import replica_grads, replicas
from workers.replica_grads import GradBuckets
from workers.stopping import DRIVER, NONE


class Work:
    def __init__(self, manager: FakeManager, ok: bool) -> None:
        self.manager, self.ok = manager, ok

    def wait(self) -> bool:
        if not self.ok:  # as torchft's _ManagedWork: the error is recorded, never raised
            self.manager.error = RuntimeError("peer gone")
        return self.ok


class FakeManager:
    """Two replicas: the other sends `other` times what this one sends; Manager.allreduce's
    average. `fail`: the launch (0-based) whose all-reduce fails."""

    def __init__(self, other: float = 3.0, fail: int | None = None) -> None:
        self.other, self.fail, self.error = other, fail, None
        self.launched: list[int] = []

    def allreduce(self, t: torch.Tensor) -> Work:
        if self.error is not None:  # torchft: every call after an error is a no-op
            return Work(self, True)
        self.launched.append(t.numel())
        t.mul_((1 + self.other) / 2)
        return Work(self, len(self.launched) - 1 != self.fail)

    def errored(self) -> Exception | None:
        return self.error

    def num_participants(self) -> int:
        return 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        self.unused = nn.Linear(2, 2)  # never in the graph: its gradient is None after backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def model() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def loss_of(m: nn.Module) -> torch.Tensor:
    x = torch.arange(8.0).reshape(2, 4) / 8
    return m(x).pow(2).sum()


def test_the_buckets_are_averaged_in_order_with_the_word_on_the_last(monkeypatch):
    monkeypatch.setattr(replica_grads, "BUCKET_BYTES", 40)  # 10 floats: several buckets
    ref = model()
    loss_of(ref).backward()
    m, manager = model(), FakeManager()
    buckets = GradBuckets(m, manager, 3)
    assert len(buckets.buckets) >= 3
    sums = buckets.reduce(loss_of(m), [1.0, 0.0, 4.0])
    sizes = [b.flat.numel() for b in buckets.buckets]
    assert manager.launched == sizes  # each bucket once, in bucket order
    # the last launched holds the word: the two replicas' words summed (this one's 1 + 3 others)
    assert buckets.word_bucket is buckets.buckets[-1]
    assert sums == [4.0, 0.0, 16.0]
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters(), strict=True):
        want = torch.zeros_like(q) if q.grad is None else 2 * q.grad  # the average of g and 3g
        assert torch.allclose(p.grad, want), name  # the unreached one: zeros from every replica


def test_a_failed_all_reduce_leaves_the_step_uncommitted_and_never_raises(monkeypatch):
    monkeypatch.setattr(replica_grads, "BUCKET_BYTES", 40)
    m, manager = model(), FakeManager(fail=1)
    buckets = GradBuckets(m, manager, 3)
    assert buckets.reduce(loss_of(m), None) is None
    assert manager.errored() is not None
    # a new step on a new quorum: the buckets work again
    manager.error, manager.fail, manager.launched = None, None, []
    m.zero_grad(set_to_none=True)
    assert buckets.reduce(loss_of(m), None) == [0.0, 0.0, 0.0]


def test_a_backward_outside_reduce_launches_nothing():
    m, manager = model(), FakeManager()
    GradBuckets(m, manager, 3)
    loss_of(m).backward()
    assert manager.launched == []


def test_a_half_precision_model_gets_a_bucket_of_its_own_for_the_word():
    m = nn.Linear(2, 2).to(torch.bfloat16)
    manager = FakeManager(other=1.0)
    buckets = GradBuckets(m, manager, 2)
    assert buckets.word_bucket.flat.dtype == torch.float64 and not buckets.word_bucket.params
    x = torch.ones(1, 2, dtype=torch.bfloat16)
    assert buckets.reduce(m(x).sum(), [1.0, 7.0]) == [2.0, 14.0]
    assert len(manager.launched) == 2


def word(rank, stop=NONE, done=False, hold=False, reported=0, writer=False, attempt=0, holds=True):
    return replicas._word(
        3,
        rank,
        writer=writer,
        attempt=attempt,
        stop=stop,
        done=done,
        hold=hold,
        reported=reported,
        holds=holds,
    )


@pytest.mark.parametrize(
    ("words", "read"),
    [
        # the writer (rank 0) and a replica; nothing asked
        ([word(0, reported=3, writer=True, attempt=1), word(1)], [True, NONE, False, False, 3, 1, [0, 1]]),
        # a replica asks to stop, and another one ended ("done"); the writer holds
        (
            [
                word(0, hold=True, reported=2, writer=True, attempt=4),
                word(1, DRIVER, holds=False),
                word(2, done=True),
            ],
            [True, DRIVER, True, True, 2, 4, [0, 2]],
        ),
        # the writer absent: nobody is present, whatever the others send; who holds state
        ([word(1), word(2, reported=5)], [False, NONE, False, False, 0, 0, [1, 2]]),
        # a survivor (rank 2) writes; rank 0, a replacement, holds nothing yet
        (
            [word(0, holds=False), word(2, reported=7, writer=True, attempt=3)],
            [True, NONE, False, False, 7, 3, [2]],
        ),
    ],
)
def test_the_word_summed_over_the_quorum_reads_as_the_max_it_was(words, read):
    sums = [sum(col) for col in zip(*words, strict=True)]
    assert replicas._read(sums) == read

"""The built-in loop over a task's own DataLoader: torchdata's StatefulDataLoader with worker
processes resumes mid-epoch at the next batch, a plain DataLoader by rereading, and a worker
SIGKILLed mid-epoch (through the CLI, 2 ranks) still trains on every sample once per epoch."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from harness.cli import jsonl, manifest, run_cli
from workers.data import train_batches
from workers.task import Task, check_train_loader

CPU = torch.device("cpu")


class Counted(Dataset):
    """Samples are their own index; counts what was read (in this process)."""

    def __init__(self, n: int) -> None:
        self.n, self.reads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads += 1
        return torch.tensor([i])


def task_over(loader: DataLoader) -> Task:
    model = torch.nn.Linear(1, 1)
    return Task(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_data=loader, val_data=loader
    )


def indices(batches) -> list[int]:
    return [int(i) for _, b in batches for i in b.flatten()]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stateful_loader_resumes_at_the_next_batch_without_rereading(workers):
    def loader(data: Counted) -> StatefulDataLoader:
        sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
        return StatefulDataLoader(data, batch_size=4, sampler=sampler, num_workers=workers)

    first = loader(Counted(40))
    task = task_over(first)
    steps, batches = train_batches(task, seed=0, epoch=2, world_size=1, rank=0, device=CPU)
    whole = list(batches)
    assert [s for s, _ in whole] == list(range(10)) and steps == 10
    _, it = train_batches(task, seed=0, epoch=2, world_size=1, rank=0, device=CPU)
    head = [next(it) for _ in range(6)]
    state = first.state_dict()  # what a mid-epoch checkpoint keeps, after step 6
    assert indices(head) == indices(whole[:6])

    data = Counted(40)
    _, rest = train_batches(
        task_over(loader(data)),
        seed=0,
        epoch=2,
        world_size=1,
        rank=0,
        device=CPU,
        first=6,
        loader_state=state,
    )
    resumed = list(rest)
    assert [s for s, _ in resumed] == [6, 7, 8, 9]
    assert indices(resumed) == indices(whole[6:])
    if workers == 0:  # read in this process: only the 4 remaining batches were
        assert data.reads == 16


def test_a_plain_loader_resumes_by_rereading_the_epoch_head(capsys):
    data = Counted(40)
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
    task = task_over(DataLoader(data, batch_size=4, sampler=sampler))
    whole = list(train_batches(task, seed=0, epoch=5, world_size=1, rank=0, device=CPU)[1])
    data.reads = 0
    resumed = list(train_batches(task, seed=0, epoch=5, world_size=1, rank=0, device=CPU, first=7)[1])
    assert [s for s, _ in resumed] == [7, 8, 9] and indices(resumed) == indices(whole[7:])
    assert data.reads == 40 and "the epoch's first 7 batches are read and dropped" in capsys.readouterr().out


def test_a_loader_on_several_ranks_needs_a_distributed_sampler():
    loader = DataLoader(Counted(8), batch_size=2)
    check_train_loader(loader, 1)  # one rank: a sequential sampler is fine
    with pytest.raises(
        ValueError, match=r"Task.train_data: a DataLoader on 2 ranks needs a DistributedSampler"
    ):
        check_train_loader(loader, 2)
    sampler = DistributedSampler(Counted(8), num_replicas=2, rank=0)
    check_train_loader(DataLoader(Counted(8), batch_sampler=BatchSampler(sampler, 2, drop_last=False)), 2)


def test_a_plain_shuffling_loader_is_refused_its_order_is_drawn_anew():
    data = Counted(40)
    plain = DataLoader(data, batch_size=4, shuffle=True)
    # Why: each read of it is another order, so rereading an epoch's head on resume would not
    # continue the order the killed attempt trained on.
    assert indices(enumerate(plain)) != indices(enumerate(plain))
    with pytest.raises(ValueError, match=r"Task.train_data: a DataLoader with shuffle=True"):
        check_train_loader(plain, 1)
    check_train_loader(StatefulDataLoader(data, batch_size=4, shuffle=True), 1)  # keeps its sampler's state


def test_a_loader_without_a_length_is_refused():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from range(3)

    with pytest.raises(ValueError, match=r"Task.train_data: DataLoader has no length"):
        task_over(DataLoader(Stream()))


@pytest.mark.e2e
def test_the_dataloader_example_survives_a_mid_epoch_kill_and_trains_on_every_sample_once(tmp_path):
    """The example's job (rank 1 killed mid-epoch 2, a group restart), its task trained through
    the example's train function and session.fit (the same loop as the builder's; the replicas
    job runs it too, tests/test_replicas.py)."""
    log = tmp_path / "samples"
    log.mkdir()
    p = run_cli(
        "run",
        "examples/dataloader_task/job.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "task.name=examples/dataloader_task/task.py:train",
        "--set",
        f"task.options.sample_log={log}",
        "--address",
        "local",
        "--json",
    )
    assert p.returncode == 0, p.stderr[-4000:]
    assert json.loads(p.stdout)["restarts"] == 1
    assert "rank 0: trained to global step 69" in p.stderr  # the function went on after fit
    run_dir = tmp_path / "dataloader-digits"
    events = jsonl(run_dir / "events.jsonl")
    restored = [e for e in events if e["kind"] == "attempt_started"][-1]["restore"]
    commit = next(e for e in events if e["kind"] == "commit" and e["id"] == restored)
    per_epoch = steps = 23  # ceil(1438 / 2 ranks / 32)
    assert commit["epoch"] == 2 and per_epoch < commit["global_step"] < 2 * per_epoch, commit
    resumed_at = commit["global_step"]

    trained: dict[int, list[int]] = defaultdict(list)  # epoch -> every index trained on, all ranks
    for rank in (0, 1):
        rows = jsonl(log / f"rank{rank}.log")
        pids = list(dict.fromkeys(r["pid"] for r in rows))
        assert len(pids) == 2, pids  # the first attempt's process, then the restarted one
        first = [r for r in rows if r["pid"] == pids[0]][:resumed_at]  # what the commit covers
        again = [r for r in rows if r["pid"] == pids[1]]
        assert len(first) + len(again) == 3 * steps
        for i, r in enumerate(first + again):
            trained[i // steps + 1] += r["index"]
        # The restarted loader read only what it trained on: it picked up at the next batch
        # instead of reading the epoch's head again (which would train the same samples).
        reads = [
            int(i)
            for owner, i in (line.split() for line in (log / f"reads{rank}.log").read_text().splitlines())
            if int(owner) == pids[1]
        ]
        assert sorted(reads) == sorted(i for r in again for i in r["index"]), (len(reads), rank)
    for epoch in (1, 2, 3):  # the killed epoch too: nothing skipped, nothing twice
        assert sorted(trained[epoch]) == list(range(1438)), epoch
    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in metrics] == [1, 2, 3]
    best = min(metrics, key=lambda r: r["val_loss"])
    assert any(c["epoch"] == best["epoch"] for c in manifest(run_dir)["checkpoints"])

"""A hand-written training loop on the session API, with a real data loader.

    orchestrator run examples/session_api/job.yaml

Each rank reads the digits images through torchdata's `StatefulDataLoader` with worker
processes (`num_workers: 2`), sharded by a `DistributedSampler`. Every few steps the loop
reports a mid-epoch checkpoint that holds each rank's loader position (`rank_state`), so a
worker killed mid-epoch resumes where the last commit left off and every sample is seen
exactly once per epoch: each epoch reports how many samples it saw and how many twice.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from workers.tasks.digits import DigitsCNN, datasets


class Indexed(Dataset):
    """(image, label, index): the index lets the loop count what it saw."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y = self.base[i]
        return x, y, i


def all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_indices(seen: list[int]) -> list[int]:
    if not dist.is_initialized():
        return seen
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, seen)
    return [i for part in out for i in part]


def serving_model(options: dict[str, Any]) -> tuple[nn.Module, torch.Tensor]:
    """The model as train() builds it, and one input batch to trace it on: what `orchestrator
    export`, `load_best(build=True)` and the Serve app need of a train function."""
    return DigitsCNN(), torch.zeros(1, 1, 8, 8)


def train(session: Any) -> None:
    ctx = session.context
    opts = {"batch_size": 32, "lr": 0.05, "num_workers": 2, "save_every_steps": 8, **ctx.options}
    train_set, val_set = datasets(ctx.seed, 0.2)
    sampler = DistributedSampler(
        Indexed(train_set),
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        shuffle=True,
        seed=ctx.seed,
        drop_last=True,
    )
    loader = StatefulDataLoader(
        Indexed(train_set), batch_size=opts["batch_size"], sampler=sampler, num_workers=opts["num_workers"]
    )
    model = DigitsCNN().to(ctx.device)
    net = nn.parallel.DistributedDataParallel(model) if ctx.world_size > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=opts["lr"], momentum=0.9)

    epoch, global_step, seen, mid_epoch = 1, 0, [], False
    metrics = {"val_loss": math.nan}  # what a checkpoint before the first evaluation carries
    state = session.restore()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        epoch, global_step, mid_epoch, metrics = (
            state["epoch"],
            state["global_step"],
            state["mid_epoch"],
            state["metrics"],
        )
        if mid_epoch and state["rank_state"] is not None:
            loader.load_state_dict(state["rank_state"]["loader"])
            seen = list(state["rank_state"]["seen"])
        else:
            epoch += 1

    def checkpoint(mid: bool) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": epoch,
            "global_step": global_step,
            "mid_epoch": mid,
            "metrics": metrics,
        }

    for epoch in range(epoch, ctx.epochs + 1):  # noqa: B020 - resumes where the checkpoint left off
        sampler.set_epoch(epoch)
        net.train()
        step = len(seen) // opts["batch_size"]
        for x, y, idx in loader:
            session.step(epoch, step, len(loader), global_step)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x.to(ctx.device)), y.to(ctx.device)).backward()
            opt.step()
            seen += idx.tolist()
            step, global_step = step + 1, global_step + 1
            if global_step % opts["save_every_steps"] == 0 and step < len(loader):
                session.report(
                    metrics,
                    epoch=epoch,
                    step=global_step,
                    end_of_epoch=False,
                    state=checkpoint(True),
                    rank_state={"loader": loader.state_dict(), "seen": seen},
                )

        model.eval()
        with torch.no_grad():
            vx, vy = val_set.tensors
            logits = model(vx.to(ctx.device))
            loss = float(nn.functional.cross_entropy(logits, vy.to(ctx.device)))
            acc = float((logits.argmax(1).cpu() == vy).float().mean())
        everything = all_indices(seen)
        metrics = {
            "val_loss": loss,
            "val_acc": acc,
            "samples_seen": float(len(everything)),
            "duplicate_samples": float(len(everything) - len(set(everything))),
            "samples_expected": float(len(sampler) * ctx.world_size),
        }
        seen = []
        # Every rank prints; rank 0's lines reach the console of `orchestrator run`, as
        # `[rank 0] ...` (every rank's with --verbose; all are in Ray's session logs).
        print(
            f"epoch {epoch}: {len(everything)} samples seen, {len(everything) - len(set(everything))} twice"
        )
        session.report(
            metrics,
            epoch=epoch,
            step=global_step,
            state=checkpoint(False),
            rank_state={"loader": None, "seen": []},
        )

"""A model sharded with FSDP2 (`fully_shard`) on CPU, checkpointed by every rank in parallel.

    orchestrator run examples/fsdp/job.yaml

Each rank holds only its shards of the MLP's weights and of AdamW's moments. The session
saves them with torch.distributed.checkpoint: every rank writes its own files, and rank 0's
record lists them all before the coordinator commits (docs/worker-api.md, "Sharded
checkpoints"). `session.restore(sharded=...)` loads them back in place, resharded when the
world size changed. Each epoch right after a restore also reports `restored_val_loss`: the
loaded model's validation loss before it trains on, which equals the val_loss reported when
that checkpoint was saved.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F

from workers.tasks.digits import datasets


class MLP(nn.Module):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def shard(model: MLP) -> MLP:
    """Each Linear its own FSDP2 unit, then the root (on one process without a group: as is)."""
    if dist.is_initialized():
        for layer in model.layers:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    return model


def evaluate(model: nn.Module, val_set: Any) -> tuple[float, float]:
    """Every rank evaluates the whole validation split (FSDP gathers the weights as it goes)."""
    model.eval()
    with torch.no_grad():
        x, y = val_set.tensors
        logits = model(x)
        loss, acc = float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())
    model.train()
    return loss, acc


def train(session: Any) -> None:
    ctx = session.context
    opts = {"batch_size": 32, "lr": 0.003, "hidden": 128, **ctx.options}
    train_set, val_set = datasets(ctx.seed, 0.2)
    torch.manual_seed(ctx.seed)  # the same weights on every rank before fully_shard splits them
    model = shard(MLP(opts["hidden"]))
    opt = torch.optim.AdamW(model.parameters(), lr=opts["lr"])
    parts = {"model": model, "optimizer": opt}

    first, restored = 1, {}
    state = session.restore(sharded=parts)  # every rank: its shards, loaded in place
    if state is not None:
        first = state["epoch"] + 1
        restored = {"restored_val_loss": evaluate(model, val_set)[0]}

    x, y = train_set.tensors
    per_step = opts["batch_size"] * ctx.world_size
    steps = len(y) // per_step
    for epoch in range(first, ctx.epochs + 1):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(ctx.seed * 1000 + epoch))
        for step in range(steps):
            session.step(epoch, step, steps)
            idx = order[step * per_step : (step + 1) * per_step][ctx.rank :: ctx.world_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        val_loss, val_acc = evaluate(model, val_set)
        session.report(
            {"val_loss": val_loss, "val_acc": val_acc, **restored},
            epoch=epoch,
            state={"epoch": epoch},
            sharded=parts,
        )
        restored = {}

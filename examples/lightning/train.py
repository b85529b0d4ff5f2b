"""A PyTorch Lightning model trained through the session API.

    orchestrator run examples/lightning/job.yaml

An MLP on scikit-learn's 8x8 digits (the data ships with scikit-learn: nothing is
downloaded). Lightning runs on Ray Train's process group through Ray's own
`RayDDPStrategy`, `RayLightningEnvironment` and `prepare_trainer`; the session's plugin and
callback (workers/integrations/lightning.py) report every epoch's metrics and Lightning's
checkpoint, and a restarted group resumes with `trainer.fit(ckpt_path=io.resume_path())`.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from workers.integrations.lightning import SessionCallback, SessionCheckpointIO
from workers.tasks.digits import datasets


class DigitsMLP(pl.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)}


def train(session: Any) -> None:
    ctx = session.context
    # val_check_interval < 1: validate within each epoch too; each such validation's checkpoint
    # competes for best-k.
    opts = {"batch_size": 32, "hidden": 64, "lr": 0.05, "val_check_interval": 1.0, **ctx.options}
    train_set, val_set = datasets(ctx.seed, 0.2)
    model = DigitsMLP(opts["hidden"], opts["lr"])
    io = SessionCheckpointIO(session)
    trainer = pl.Trainer(
        max_epochs=ctx.epochs,
        accelerator="cpu",
        devices="auto",
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment(), io],
        callbacks=[SessionCallback(session)],
        enable_checkpointing=False,  # the session checkpoints
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=opts["val_check_interval"],
    )
    trainer = prepare_trainer(trainer)
    # Lightning adds a DistributedSampler for each rank (seeded, reshuffled every epoch).
    trainer.fit(
        model,
        DataLoader(train_set, batch_size=opts["batch_size"], shuffle=True),
        DataLoader(val_set, batch_size=256),
        ckpt_path=io.resume_path(),
    )

"""PyTorch Lightning on the session API: Lightning's own checkpoints, committed by this project.

    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer
    from workers.integrations.lightning import SessionCallback, SessionCheckpointIO

    def train(session):
        io = SessionCheckpointIO(session)
        trainer = pl.Trainer(max_epochs=session.context.epochs, accelerator="cpu", devices="auto",
                             strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment(), io],
                             callbacks=[SessionCallback(session)], enable_checkpointing=False)
        trainer = prepare_trainer(trainer)
        trainer.fit(model, train_loader, val_loader, ckpt_path=io.resume_path())

Ray Train has already set up the process group on every rank; Ray's `RayDDPStrategy` and
`RayLightningEnvironment` make Lightning use it (rank, world size and device from Ray's
context), and `prepare_trainer` checks the pair.

Saving: at the end of every training epoch (after that epoch's validation, so the logged
validation metrics are there) `SessionCallback` asks Lightning for its checkpoint with
`trainer.save_checkpoint("session://...")`. Lightning builds the whole checkpoint on every
rank (weights, optimizer and LR scheduler states, its loops' progress, epoch, global step,
callbacks' and precision plugin's states, hyper-parameters) and hands it to the strategy's
`CheckpointIO` on global rank 0: `SessionCheckpointIO` keeps it instead of writing a file,
and the callback reports it with `trainer.callback_metrics` through `session.report`. The
LightningModule's `state_dict` is stored under "model" (the checkpoint's model.pt, what
`orchestrator best --download`, export and serving load); the rest is train_state.pt.

Resuming: `trainer.fit(ckpt_path=...)` is Lightning's one full restore (weights, optimizers,
schedulers, loop progress, so the fit starts at the next epoch with the same global step),
and it reads the checkpoint through the strategy's `CheckpointIO`. `resume_path()` returns
`session://<checkpoint id>` when the session has a committed checkpoint to resume from (None
at the start of a run), and `SessionCheckpointIO.load_checkpoint` answers that path with what
`session.restore()` read and verified, in Lightning's layout. No temporary file is written
and nothing of Lightning's restore is redone by hand. Every other path goes to Lightning's
own `TorchCheckpointIO`, so a `ModelCheckpoint` or `fit(ckpt_path="file.ckpt")` still works.

Validations within an epoch (`val_check_interval` < 1, or a number of batches): after each
one that logged the monitor, `on_validation_end` reports Lightning's checkpoint with that
validation's metrics (fresh: measured on these weights, so it competes for best-k; the metrics
it did not log, such as an epoch-level train loss, are the epoch before's and left out), as
Lightning's own `ModelCheckpoint` saves there. The epoch's last validation is reported at the
epoch's end as above; when it ran before the epoch's last batch (an interval that does not
divide the epoch) or not in this epoch at all (`check_val_every_n_epoch` > 1), the epoch's
checkpoint carries the monitor measured on other weights and does not compete for best-k.
Resuming from a mid-epoch checkpoint is Lightning's own mid-epoch restore.

Checkpoints are loaded weights-only: keep hyper-parameters (`save_hyperparameters`) plain
data.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from workers.distributed import broadcast

PREFIX = "session://"


class SessionCheckpointIO(CheckpointIO):
    """Lightning's `CheckpointIO` for `session://` paths: a save is kept for `SessionCallback`
    to report, a load answers with the session's restored checkpoint. Other paths go to
    `files` (Lightning's `TorchCheckpointIO` by default)."""

    def __init__(self, session: Any, files: CheckpointIO | None = None) -> None:
        self.session = session
        self.files = files if files is not None else TorchCheckpointIO()
        self._kept: dict[str, Any] | None = None
        self._restored: tuple[str, dict[str, Any]] | None = None

    def resume_path(self) -> str | None:
        """`trainer.fit(ckpt_path=...)` for this attempt: the session's latest commit, or None."""
        state = self.session.restore()
        if state is None:
            return None
        path = PREFIX + str(self.session.restored_from)
        self._restored = (path, state)
        return path

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if not str(path).startswith(PREFIX):
            return self.files.save_checkpoint(checkpoint, path, storage_options)
        self._kept = checkpoint  # global rank 0 only: Lightning's strategy calls no other rank

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not str(path).startswith(PREFIX):
            return self.files.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        if self._restored is None or self._restored[0] != str(path):
            raise FileNotFoundError(
                f"{path}: not this attempt's restored checkpoint; pass "
                "ckpt_path=SessionCheckpointIO.resume_path()"
            )
        state = dict(self._restored[1])
        self._restored = None  # Lightning holds it until the restore ends; so need not we
        state.pop("rank_state", None)
        state["state_dict"] = state.pop("model")
        return state

    def remove_checkpoint(self, path: Any) -> None:
        if not str(path).startswith(PREFIX):  # the coordinator's retention deletes the session's
            self.files.remove_checkpoint(path)

    def teardown(self) -> None:
        self.files.teardown()

    def take(self) -> dict[str, Any] | None:
        kept, self._kept = self._kept, None
        return kept


class SessionCallback(pl.Callback):
    """Reports every training epoch's logged metrics and Lightning's checkpoint through the
    session, and each validation within an epoch (`val_check_interval` < 1) that measured the
    monitor; passes each batch to `session.step` (the progress line and `chaos.kills`)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self._before: dict[str, Any] = {}  # trainer.callback_metrics as a validation found them
        self._validated: tuple[int, set[str]] = (-1, set())  # the last validation: its step, its metrics
        self._reported_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(trainer.strategy.checkpoint_io, SessionCheckpointIO):
            raise TypeError(
                "SessionCallback needs the Trainer's checkpoint IO to be SessionCheckpointIO: "
                "pass plugins=[..., SessionCheckpointIO(session)] to pl.Trainer"
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        steps = trainer.num_training_batches
        self.session.step(
            trainer.current_epoch + 1,
            batch_idx,
            int(steps) if steps != float("inf") else 0,
            trainer.global_step,
        )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._before = dict(trainer.callback_metrics)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A validation within a training epoch: its metrics were measured on these weights, so
        its checkpoint competes for best-k. The epoch's last one is on_train_epoch_end's."""
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        # callback_metrics keeps every metric logged so far: this validation's are the values
        # it replaced; the rest (an epoch-level train loss) are the epoch before's, not this one's.
        mine = {k: v for k, v in trainer.callback_metrics.items() if self._before.get(k) is not v}
        metrics = _numbers(mine)
        self._validated = (trainer.global_step, set(metrics))
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the epoch's end: on_train_epoch_end reports it
        # Rank 0's word, on every rank: a monitor logged with rank_zero_only=True is in rank 0's
        # metrics alone, and a rank that skipped the report would leave the others waiting in
        # its collectives (save_checkpoint's barrier, report's broadcasts) for good.
        if broadcast(self.session.cfg.monitor in metrics):
            self._report(trainer, metrics, end_of_epoch=False, fresh=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == self._reported_step:  # a validation just reported this step (a stop)
            return
        # A monitor that an earlier validation measured (on other weights: val_check_interval
        # not ending on the last batch, check_val_every_n_epoch > 1) is carried, not fresh.
        step, keys = self._validated
        carried = self.session.cfg.monitor in keys and step != trainer.global_step
        self._report(
            trainer, _numbers(trainer.callback_metrics), end_of_epoch=True, fresh=False if carried else None
        )

    def _report(
        self, trainer: pl.Trainer, metrics: dict[str, float], end_of_epoch: bool, fresh: bool | None
    ) -> None:
        epoch = trainer.current_epoch + 1  # Lightning counts from 0, the session from 1
        io = trainer.strategy.checkpoint_io
        assert isinstance(io, SessionCheckpointIO)
        # every rank builds it; rank 0's IO keeps it
        trainer.save_checkpoint(f"{PREFIX}epoch{epoch}-step{trainer.global_step}")
        checkpoint = io.take()
        # Only rank 0's state is written; the others still pass one, so every rank takes the
        # same path through report (it joins them in collectives).
        state: dict[str, Any] = {}
        if checkpoint is not None:
            state = {"model": checkpoint.pop("state_dict"), **checkpoint}
        self._reported_step = trainer.global_step
        self.session.report(
            metrics,
            epoch=epoch,
            step=trainer.global_step,
            state=state,
            end_of_epoch=end_of_epoch,
            fresh=fresh,
        )


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v.numel() == 1}

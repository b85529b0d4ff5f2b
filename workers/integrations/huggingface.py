"""The Hugging Face `Trainer` on the session API.

    from workers.integrations.huggingface import SessionCallback, train

    def train_fn(session):
        args = TrainingArguments(output_dir=..., num_train_epochs=session.context.epochs,
                                 eval_strategy="epoch", save_strategy="no", ...)
        trainer = Trainer(model=model, args=args, train_dataset=..., eval_dataset=...,
                          callbacks=[SessionCallback(session)])
        train(trainer, session)          # trainer.train(), resumed from the session's latest commit

Ray Train has already set up the process group and the variables torch's launchers set
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR); the Trainer (through Accelerate) joins that
group, wraps the model in DDP and shards the data. Ray's
`ray.train.huggingface.transformers.prepare_trainer` is only needed for Ray Data
iterables as datasets; it composes with this (call it before `train`).

Saving: after every evaluation the Trainer runs during training (`eval_strategy`; at the end
of each epoch when evaluation is off) `SessionCallback` reports the evaluation's metrics with
the latest training ones logged in the same epoch ("loss", "learning_rate", ...) through
`session.report`. An evaluation's metrics are fresh (measured on the weights reported) wherever
it ran, so with `eval_strategy="steps"` a mid-epoch checkpoint competes for best-k too. The
report carries a state built from the live objects the Trainer hands its callbacks: the
model's state_dict under "model" (the checkpoint's model.pt), the optimizer's and LR
scheduler's states, the `TrainerState` as its trainer_state.json text (global step, epoch, log
history, stateful callbacks), and each rank's RNG streams as that rank's `rank_state`. The
model's config (config.json) and the Trainer's `processing_class` (a tokenizer), as their
`save_pretrained` writes them, travel as the checkpoint's extra files (`extras/`, checked like
the weights; `orchestrator best --download` and `export` copy them out beside the weights). The
session writes it all in the background; the Trainer's own `save_strategy` should be "no".

Sharding: a Trainer that shards the model (FSDP, DeepSpeed: TrainingArguments.fsdp,
.deepspeed, or Accelerate's config) is refused before its first step, on every rank, with an
input error (exit 2) naming the cause: the callback's state_dict() on rank 0 alone would be a
collective the other ranks never join, and the save would hang. It is refused by what is asked
for, not by what Accelerate made of it: on CPU (gloo) Accelerate 1.16 runs a Trainer with
`fsdp="full_shard"` as plain DDP (seen here: `is_fsdp_enabled` False, the model in DDP), while
on GPUs the same arguments shard it. DDP (the default) is what the callback runs; a sharded
model goes through a train function and `session.report(sharded=...)`.

Resuming: the Trainer's restore reads a checkpoint directory (`trainer.train(
resume_from_checkpoint=DIR)`): it loads the weights, optimizer, scheduler and RNG, and skips
the epochs and steps already trained from trainer_state.json. It has no pluggable reader, so
`train()` writes what `session.restore()` read and verified into a local temporary directory
in the Trainer's own layout and hands it that; the directory is removed when training ends.
Nothing of the Trainer's restore is redone by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, SCALER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.training_args import ParallelMode
from transformers.utils import WEIGHTS_NAME

from workers.rng import capture_rng
from workers.session import StopRun


class SessionCallback(TrainerCallback):
    """Reports the Trainer's metrics and state through the session after each evaluation
    (each epoch's end when there is none), and passes each step to `session.step` (the
    progress line and `chaos.kills`)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.trainer: Trainer | None = None  # set by train(): the scaler and stateful callbacks
        self._reported_step = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        refuse_sharded(self.trainer, args)  # for a trainer.train() called without train()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        per_epoch = _steps_per_epoch(args, state, kwargs.get("train_dataloader"))
        self.session.step(
            state.global_step // per_epoch + 1, state.global_step % per_epoch, per_epoch, state.global_step
        )

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.eval_strategy == "no":
            self._report(args, state, control, {}, kwargs, evaluated=None)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        metrics = metrics or {}
        # The evaluation's own metrics are fresh wherever it ran, mid-epoch too (eval_strategy
        # "steps"); a monitor the Trainer only logged (the train "loss") is left to the session.
        self._report(
            args,
            state,
            control,
            metrics,
            kwargs,
            evaluated=True if self.session.cfg.monitor in metrics else None,
        )

    def _report(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, Any],
        objects: dict[str, Any],
        evaluated: bool | None,
    ) -> None:
        # Evaluations outside training (before the first step, trainer.evaluate() after the
        # last) have nothing new to checkpoint.
        if state.global_step == 0 or state.global_step == self._reported_step:
            return
        self._reported_step = state.global_step
        per_epoch = _steps_per_epoch(args, state, objects.get("train_dataloader"))
        end_of_epoch = state.global_step % per_epoch == 0
        epoch = math.ceil(state.global_step / per_epoch)
        merged: dict[str, Any] = {}
        for row in state.log_history:  # the latest value of each metric logged in this epoch
            if row.get("step", 0) > (epoch - 1) * per_epoch:  # an earlier epoch's is not this one's
                merged.update(row)
        merged.update(metrics)
        numbers = {k: float(v) for k, v in merged.items() if _is_metric(k, v)}
        ckpt: dict[str, Any] = {}
        extras = tempfile.TemporaryDirectory(prefix="hf-extras-")  # report() copies what it needs
        if self.session.rank == 0:  # only rank 0's state is written; the others pass an empty one
            self._save_pretrained(objects["model"], extras.name)
            ckpt = {
                "model": objects["model"].state_dict(),
                "optimizer": objects["optimizer"].state_dict(),
                "scheduler": objects["lr_scheduler"].state_dict(),
                "trainer_state": self._trainer_state_json(state, control),
            }
            scaler = getattr(self.trainer.accelerator, "scaler", None) if self.trainer is not None else None
            if scaler is not None:
                ckpt["scaler"] = scaler.state_dict()
        with extras:
            self.session.report(
                numbers,
                epoch=epoch,
                step=state.global_step,
                end_of_epoch=end_of_epoch,
                state=ckpt,
                rank_state={"rng": capture_rng()},
                extra_files=extras.name if os.listdir(extras.name) else None,
                fresh=evaluated,
            )

    def _save_pretrained(self, model: Any, into: str) -> None:
        """The model's config (config.json) and the Trainer's processing class (a tokenizer, an
        image processor), as their save_pretrained writes them: the checkpoint's extra files."""
        config = getattr(model, "config", None)
        processor = getattr(self.trainer, "processing_class", None) if self.trainer is not None else None
        for part in (config, processor):
            if part is not None and hasattr(part, "save_pretrained"):
                part.save_pretrained(into)

    def _trainer_state_json(self, state: TrainerState, control: TrainerControl) -> str:
        """trainer_state.json as the Trainer's own save writes it: with the current state of
        every stateful callback and of the TrainerControl."""
        out = dataclasses.asdict(state)
        callbacks = self.trainer.callback_handler.callbacks if self.trainer is not None else []
        saved = dict(out.get("stateful_callbacks") or {})
        for cb in [*callbacks, control]:
            if isinstance(cb, ExportableState):
                name = type(cb).__name__
                saved[name] = [*saved[name], cb.state()] if isinstance(saved.get(name), list) else cb.state()
        out["stateful_callbacks"] = saved
        return json.dumps(out, indent=2, sort_keys=True) + "\n"


def train(trainer: Trainer, session: Any, **kwargs: Any) -> Any:
    """`trainer.train(**kwargs)`, resumed from the session's latest commit when there is one.
    Adds a `SessionCallback` when the trainer has none."""
    callback = next(
        (cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SessionCallback)), None
    )
    if callback is None:
        callback = SessionCallback(session)
        trainer.add_callback(callback)
    callback.trainer = trainer
    refuse_sharded(trainer, trainer.args)
    state = session.restore()
    if state is None:
        return trainer.train(**kwargs)
    with checkpoint_dir(trainer, state) as path:
        return trainer.train(resume_from_checkpoint=path, **kwargs)


def refuse_sharded(trainer: Trainer | None, args: TrainingArguments) -> None:
    """Refuse, before the first step and on every rank alike, a Trainer that shards the model
    (FSDP or DeepSpeed, from TrainingArguments or Accelerate's config): SessionCallback takes
    the model's and optimizer's state_dict on rank 0 alone, which under either is a collective
    every rank must join, so the save would hang (and rank 0 would hold only its shard)."""
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(args, "deepspeed", None):
        how = "DeepSpeed (TrainingArguments.deepspeed or Accelerate's config)"
    elif getattr(trainer, "is_fsdp_enabled", False) or getattr(args, "fsdp", None):
        how = "FSDP (TrainingArguments.fsdp or Accelerate's config)"
    else:
        return
    raise StopRun(
        f"the Hugging Face Trainer shards the model with {how}: SessionCallback checkpoints the "
        "model's full state_dict from rank 0 alone, which under sharding is a collective every "
        "rank must join (the save would hang). Train without it (the Trainer's DDP, its default "
        "under Ray Train: leave fsdp and deepspeed unset), or write a train function that saves "
        "with session.report(sharded={'model': ..., 'optimizer': ...}) (docs/worker-api.md, "
        "Sharded checkpoints)",
        "input",
    )


@contextlib.contextmanager
def checkpoint_dir(trainer: Trainer, state: dict[str, Any]) -> Iterator[str]:
    """A restored session state as a local directory in the Trainer's checkpoint layout, for
    `resume_from_checkpoint`; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="session-resume-") as path:
        torch.save(state["model"], os.path.join(path, WEIGHTS_NAME))
        torch.save(state["optimizer"], os.path.join(path, OPTIMIZER_NAME))
        torch.save(state["scheduler"], os.path.join(path, SCHEDULER_NAME))
        if "scaler" in state:
            torch.save(state["scaler"], os.path.join(path, SCALER_NAME))
        with open(os.path.join(path, TRAINER_STATE_NAME), "w", encoding="utf-8") as f:
            f.write(state["trainer_state"])
        rank_state = state.get("rank_state")  # None after a change of world size
        if rank_state is not None:
            args = trainer.args
            name = f"rng_state_{args.process_index}.pth" if args.world_size > 1 else "rng_state.pth"
            torch.save(
                _hf_rng(rank_state["rng"], args.parallel_mode == ParallelMode.DISTRIBUTED),
                os.path.join(path, name),
            )
        yield path


def _hf_rng(rng: dict[str, Any], distributed: bool) -> dict[str, Any]:
    """workers.rng's streams in the Trainer's rng_state.pth layout."""
    py, n = rng["python"], rng["numpy"]
    out: dict[str, Any] = {
        "python": (py[0], tuple(py[1]), py[2]),
        "numpy": (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        ),
        "cpu": rng["torch"],
    }
    if "cuda" in rng and torch.cuda.is_available():
        out["cuda"] = rng["cuda"] if distributed else rng["cuda"][torch.cuda.current_device()]
    return out


def _is_metric(name: str, value: Any) -> bool:
    """A number the Trainer logged, less its position (the session adds epoch and step) and
    its timings (eval_runtime, eval_samples_per_second, ...), which say nothing of the model."""
    timing = name.endswith(("_runtime", "_per_second")) or name == "total_flos"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and not timing and name not in ("epoch", "step")


def _steps_per_epoch(args: TrainingArguments, state: TrainerState, loader: Any) -> int:
    """Optimizer steps in one epoch, as the Trainer counts them."""
    try:
        batches = len(loader)
    except TypeError:  # no loader, or an iterable without a length
        return max(state.max_steps // max(int(state.num_train_epochs), 1), 1)
    return max(math.ceil(batches / args.gradient_accumulation_steps), 1)

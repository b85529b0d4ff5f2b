"""A Hugging Face `Trainer` run through the session API.

    orchestrator run examples/huggingface/job.yaml

A tiny BERT classifier built from a config (nothing is downloaded: no pretrained weights,
no tokenizer) on synthetic token sequences: class 0 draws its tokens from the lower half of
the vocabulary, class 1 from the upper half. The session's callback
(workers/integrations/huggingface.py) reports every evaluation (each epoch's, or every
`eval_steps` steps) and the Trainer's state, and `train(trainer, session)` resumes a
restarted group from the latest commit.
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from workers.integrations.huggingface import SessionCallback, train

VOCAB, LENGTH = 64, 16


def model_config(options: dict[str, Any]) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=options.get("hidden", 32),
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=2,
    )


class Tokens(Dataset):
    """Sequences of token ids and their class, the same on every rank for a seed."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        low = torch.randint(1, VOCAB // 2, (n, LENGTH), generator=g)
        self.ids = low + self.labels[:, None] * (VOCAB // 2 - 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            "labels": self.labels[i],
        }


def accuracy(pred: Any) -> dict[str, float]:
    return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}


def train_fn(session: Any) -> None:
    ctx = session.context
    # eval_steps: evaluate every that many steps (eval_strategy "steps") instead of each epoch's
    # end; each evaluation's checkpoint competes for best-k, mid-epoch too.
    opts = {"batch_size": 16, "lr": 1e-3, "eval_steps": None, **ctx.options}
    model = BertForSequenceClassification(model_config(opts))
    with tempfile.TemporaryDirectory(prefix="hf-output-") as out:  # the session checkpoints, not the Trainer
        args = TrainingArguments(
            output_dir=out,
            num_train_epochs=ctx.epochs,
            per_device_train_batch_size=opts["batch_size"],
            per_device_eval_batch_size=64,
            learning_rate=opts["lr"],
            eval_strategy="steps" if opts["eval_steps"] else "epoch",
            eval_steps=opts["eval_steps"],
            logging_strategy="epoch",
            save_strategy="no",
            seed=ctx.seed,
            use_cpu=True,
            report_to="none",
            disable_tqdm=True,
            ddp_find_unused_parameters=False,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=Tokens(512, ctx.seed),
            eval_dataset=Tokens(128, ctx.seed + 1),
            compute_metrics=accuracy,
            callbacks=[SessionCallback(session)],
        )
        train(trainer, session)

"""PyTorch Lightning and the Hugging Face Trainer on the session API, each through the CLI on
two ranks, with rank 1 SIGKILLed in epoch 2 (the examples' `chaos.kills`): the restarted group
resumes the framework's own restore from the epoch-1 commit and the run ends with every
epoch reported once and a best checkpoint whose model.pt loads weights-only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from harness.cli import ROOT, jsonl, run_cli

pytestmark = pytest.mark.e2e


def example(path: str) -> Any:
    spec = importlib.util.spec_from_file_location(Path(path).stem + "_example", ROOT / path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_killed_and_resumed(job: str, root: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the example; check the kill, the one restart and a resume from epoch 1's commit
    that the framework continued (not restarted from scratch, not redone). Returns the summary
    and the best epoch's metrics row.

    Saves are synchronous here: rank 1 reaches its kill in epoch 2 only through DDP's
    all-reduces with rank 0, which has then committed epoch 1. With background saves (the
    default) a kill this early may beat that commit, and the run restarts from scratch
    instead: also correct, but not the resume this test is about."""
    p = run_cli(
        "run",
        job,
        "--set",
        f"storage.root={root}",
        "--set",
        "checkpoint.async_save=false",
        "--address",
        "local",
        "--json",
    )
    assert p.returncode == 0, p.stderr[-4000:]
    summary = json.loads(p.stdout)
    run_dir = root / name
    events = jsonl(run_dir / "events.jsonl")
    assert [e["kind"] for e in events].count("chaos_kill") == 1 and summary["restarts"] == 1

    commits = {e["id"]: e for e in events if e["kind"] == "commit"}
    attempts = [e for e in events if e["kind"] == "attempt_started"]
    assert len(attempts) == 2 and attempts[0]["restore"] is None
    assert commits[attempts[1]["restore"]]["epoch"] == 1  # the commit before the kill

    rows = jsonl(run_dir / "metrics.jsonl")
    assert [(r["epoch"], r["attempt"]) for r in rows] == [(1, 1), (2, 2), (3, 2)]
    steps = [r["global_step"] for r in rows]  # the resumed loop kept counting where it stopped
    assert steps == [steps[0], 2 * steps[0], 3 * steps[0]] and steps[0] > 0
    best = min(rows, key=lambda r: r[summary["best"]["monitor"]])
    assert summary["best"]["epoch"] == best["epoch"]
    return summary, best


def test_lightning_example_resumes_after_a_kill(tmp_path):
    pytest.importorskip(
        "lightning", reason="lightning is not installed (pip install 'ray-orchestrator[integrations]')"
    )
    summary, row = run_killed_and_resumed("examples/lightning/job.yaml", tmp_path, "lightning-digits")
    assert {"val_loss", "val_acc", "train_loss"} <= set(row)

    best = Path(summary["best"]["uri"])
    model = example("examples/lightning/train.py").DigitsMLP(hidden=64)
    model.load_state_dict(torch.load(best / "model.pt", weights_only=True))
    # What Lightning's restore needs is there too, and loads weights-only.
    state = torch.load(best / "train_state.pt", weights_only=True)
    assert {"optimizer_states", "lr_schedulers", "loops"} <= set(state)
    assert (state["epoch"] + 1, state["global_step"]) == (row["epoch"], row["global_step"])


def test_huggingface_trainer_example_resumes_after_a_kill(tmp_path):
    pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install 'ray-orchestrator[integrations]')"
    )
    pytest.importorskip("accelerate", reason="accelerate (the Trainer's requirement) is not installed")
    summary, row = run_killed_and_resumed("examples/huggingface/job.yaml", tmp_path, "hf-tiny-bert")
    assert {"eval_loss", "eval_accuracy", "loss"} <= set(row)
    assert not any(k.endswith("_runtime") for k in row)

    best = Path(summary["best"]["uri"])
    mod = example("examples/huggingface/train.py")
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(mod.model_config({}))
    model.load_state_dict(torch.load(best / "model.pt", weights_only=True))
    state = torch.load(best / "train_state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "trainer_state", "rank_states"} <= set(state)
    trainer_state = json.loads(state["trainer_state"])
    assert (trainer_state["epoch"], trainer_state["global_step"]) == (row["epoch"], row["global_step"])
    # the model's config.json travels with the checkpoint as an extra file, verified
    from transformers import BertConfig

    record = json.loads((best / "checkpoint.json").read_text())
    assert "extras/config.json" in {f["path"] for f in record["files"]}
    config = BertConfig.from_pretrained(best / "extras")
    assert (config.hidden_size, config.vocab_size) == (32, mod.VOCAB)


def run_evaluating_within_epochs(job: str, root: Path, name: str, option: str) -> tuple[Any, ...]:
    """The example for 2 epochs on one rank, no kill, with `option` set (evaluations within
    epochs). Returns the summary, the commit events and the metrics rows."""
    p = run_cli(
        "run",
        job,
        *("--set", f"storage.root={root}", "--set", "epochs=2", "--set", "chaos.kills=[]"),
        *("--set", "scaling.num_workers=1", "--set", "checkpoint.top_k=2", "--set", option),
        *("--address", "local", "--json"),
    )
    assert p.returncode == 0, p.stderr[-4000:]
    events = jsonl(root / name / "events.jsonl")
    commits = [e for e in events if e["kind"] == "commit"]
    return json.loads(p.stdout), commits, jsonl(root / name / "metrics.jsonl")


def best_of(commits: list[dict[str, Any]], monitor: str) -> dict[str, Any]:
    return min(commits, key=lambda c: (c["metrics"][monitor], -c["global_step"]))


def test_huggingface_step_evaluations_compete_for_best(tmp_path):
    """eval_strategy="steps" (512 samples, batch 16: 32 steps an epoch; evaluations every 10
    steps and at the last): a mid-epoch evaluation's checkpoint competes for best-k, and each
    epoch's row holds that epoch's metrics only (the train "loss" logged at epoch 1's end is
    not epoch 2's)."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="accelerate (the Trainer's requirement) is not installed")
    summary, commits, rows = run_evaluating_within_epochs(
        "examples/huggingface/job.yaml", tmp_path, "hf-tiny-bert", "task.options.eval_steps=10"
    )
    assert [c["global_step"] for c in commits] == [10, 20, 30, 40, 50, 60, 64]
    assert ["best-k" in c["kept"] for c in commits[:2]] == [True, True], commits[:2]  # top_k 2
    assert [(r["epoch"], r["global_step"]) for r in rows] == [(1, 30), (2, 64)]
    assert "loss" not in rows[1], rows[1]
    best = best_of(commits, "eval_loss")
    assert summary["best"] is not None and summary["best"]["id"] == best["id"], summary["best"]


def test_lightning_mid_epoch_validations_compete_for_best(tmp_path):
    """val_check_interval=0.5: Lightning validates at the middle of each epoch and one batch
    before its end (45 batches: after 22 and 44), each such checkpoint competes for best-k; the
    epoch-end checkpoint carries the validation of the batch before, so it does not; each
    epoch's row is its last validation, without the epoch before's train loss."""
    pytest.importorskip("lightning", reason="lightning is not installed")
    summary, commits, rows = run_evaluating_within_epochs(
        "examples/lightning/job.yaml", tmp_path, "lightning-digits", "task.options.val_check_interval=0.5"
    )
    per_epoch = max(c["global_step"] for c in commits) // 2
    ends = [c for c in commits if c["global_step"] % per_epoch == 0]
    mid = [c for c in commits if c["global_step"] % per_epoch != 0]
    assert len(ends) == 2 and len(mid) == 4, commits
    assert not [c for c in ends if "best-k" in c["kept"]], ends
    assert [(r["epoch"], r["global_step"]) for r in rows] == [
        (1, mid[1]["global_step"]),
        (2, mid[3]["global_step"]),
    ]
    assert not [r for r in rows if "train_loss" in r], rows
    best = best_of(mid, "val_loss")
    assert summary["best"] is not None and summary["best"]["id"] == best["id"], summary["best"]


def test_a_monitor_logged_on_rank_0_alone_reports_on_every_rank(tmp_path):
    """Lightning's `self.log(..., rank_zero_only=True)` puts the monitor in rank 0's metrics
    alone, a review thought: a mid-epoch validation must then report on every rank (rank 0's
    word) or none, or the ranks that skipped leave rank 0 in report()'s collectives. (Lightning
    2.6.6 reported on both ranks before the broadcast too; this guards the rule.)"""
    pytest.importorskip("lightning", reason="lightning is not installed")
    src = (ROOT / "examples/lightning/train.py").read_text()
    line = 'self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)'
    assert src.count(line) == 1
    train = tmp_path / "rank0_train.py"
    train.write_text(src.replace(line, line.replace("sync_dist=True", "rank_zero_only=True")))
    p = run_cli(
        "run",
        "examples/lightning/job.yaml",
        *("--set", f"storage.root={tmp_path}", "--set", "epochs=1", "--set", "chaos.kills=[]"),
        *("--set", f"task.name={train}:train", "--set", "task.options.val_check_interval=0.5"),
        *("--address", "local", "--json"),
        timeout=400,  # a hang (ranks in different collectives) fails here, not at CI's limit
    )
    assert p.returncode == 0, p.stderr[-4000:]
    commits = [e for e in jsonl(tmp_path / "lightning-digits" / "events.jsonl") if e["kind"] == "commit"]
    # validations after batches 11 and 22 of 23 (the second: one before the end), the epoch's end
    assert [c["global_step"] for c in commits] == [11, 22, 23], commits


def test_huggingface_trainer_with_fsdp_is_refused_before_training(tmp_path):
    """The callback's state_dict() on rank 0 alone would hang under FSDP: the real Trainer
    configured with fsdp="full_shard" is refused on every rank before its first step."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="accelerate (the Trainer's requirement) is not installed")
    src = (ROOT / "examples/huggingface/train.py").read_text()
    assert src.count('save_strategy="no",') == 1
    fsdp = tmp_path / "fsdp_train.py"
    fsdp.write_text(src.replace('save_strategy="no",', 'save_strategy="no",\n            fsdp="full_shard",'))
    p = run_cli(
        "run",
        "examples/huggingface/job.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        f"task.name={fsdp}:train_fn",
        "--set",
        "chaos.kills=[]",
        "--address",
        "local",
    )
    assert p.returncode == 2, p.stderr[-4000:]
    assert "the Hugging Face Trainer shards the model with FSDP" in p.stderr, p.stderr[-4000:]
    assert "session.report(sharded=" in p.stderr
    assert not (tmp_path / "hf-tiny-bert" / "checkpoints").exists() or not any(
        (tmp_path / "hf-tiny-bert" / "checkpoints").iterdir()
    )

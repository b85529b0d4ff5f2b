"""Export a committed checkpoint for serving, in formats a server reads without this package.

    safetensors  model.safetensors: the weights alone; load with safetensors.torch.load_file
                 and the task's model constructor. Never imports the task.
    torchscript  model.ts: the model traced on one validation batch (torch.jit.load).
    onnx         model.onnx: the same, through torch.onnx (batch dimension dynamic).

Every export writes config.json beside it: the task and its options, the checkpoint's
id, epoch and metrics, the monitor it was chosen by, the run's URI and the sha256 of the
source files (as recorded at commit). TorchScript and ONNX need the model itself, so
they import the task (user code) to build it; safetensors does not.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import yaml

from orchestrator.api import MODEL_FILE, Checkpoint, NoCheckpoint, Run, build_model
from orchestrator.core.manifest import SPEC
from orchestrator.core.verify import copy_verified

FORMATS = {"safetensors": "model.safetensors", "torchscript": "model.ts", "onnx": "model.onnx"}


def pick(run: Run, which: str) -> Checkpoint:
    """best, latest, or a checkpoint id."""
    if which == "best":
        return run.best(verify=False)
    cks = run.checkpoints()
    if not cks:
        raise NoCheckpoint(f"{run.uri}: no committed checkpoint")
    if which == "latest":
        return max(cks, key=lambda c: c.record.seq)
    for c in cks:
        if c.id == which:
            return c
    raise NoCheckpoint(f"{run.uri}: no committed checkpoint {which!r}; it has {', '.join(c.id for c in cks)}")


def export(run: Run, out_dir: str, fmt: str, which: str = "best") -> dict[str, Any]:
    """Write the chosen checkpoint as fmt into out_dir; return what config.json holds."""
    import torch

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="orchestrator-export-") as tmp:
        skipped: list[dict[str, str]] = []
        if which == "best":
            found = run.verified_best(into=tmp, only={MODEL_FILE})
            ck, path, skipped = found.checkpoint, found.paths[0], found.skipped
        else:
            ck = pick(run, which)
            path = copy_verified(run.storage, ck.record, tmp, only={MODEL_FILE})[0]
        state = torch.load(path, map_location="cpu", weights_only=True)
    spec = yaml.safe_load(run.storage.read_bytes(SPEC)) or {}
    task = spec.get("task") or {}
    target = os.path.join(out_dir, FORMATS[fmt])
    extra: dict[str, Any] = {}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, target, metadata={"checkpoint": ck.id})
    else:
        model = build_model(run.uri, run.storage.options)
        model.load_state_dict(state)
        model.eval()
        sample = _sample_batch(run)
        extra["input_shape"] = ["batch", *sample.shape[1:]]
        with torch.no_grad():
            if fmt == "torchscript":
                torch.jit.trace(model, sample).save(target)
            else:
                batch = torch.export.Dim("batch")
                # external_data=False: one self-contained file, not model.onnx + model.onnx.data
                torch.onnx.export(model, (sample,), target, input_names=["input"], output_names=["output"],
                                  dynamic_shapes=({0: batch},), external_data=False)  # fmt: skip
    config = {
        "format": fmt,
        "file": FORMATS[fmt],
        "task": task.get("name"),
        "task_options": task.get("options") or {},
        "checkpoint": ck.id,
        "epoch": ck.epoch,
        "global_step": ck.global_step,
        "monitor": run.monitor,
        "mode": run.mode,
        "metrics": ck.metrics,
        "run_uri": run.uri,
        "source_sha256": {f.path: f.sha256 for f in ck.record.files if f.path == MODEL_FILE},
        "skipped": skipped,  # better-ranked checkpoints passed over: their files failed verification
        **extra,
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1, allow_nan=True)
    return config


def _sample_batch(run: Run) -> Any:
    """The inputs of one validation batch of the run's task, to trace the model with."""
    import torch

    from orchestrator.core.tasks import resolve_task
    from workers.task import TaskContext, collate

    spec = yaml.safe_load(run.storage.read_bytes(SPEC)) or {}
    task_spec = spec.get("task") or {}
    task = resolve_task(task_spec.get("name", "digits"))(
        dict(task_spec.get("options") or {}),
        TaskContext(rank=0, world_size=1, seed=int(spec.get("seed", 0)), device=torch.device("cpu")),
    )
    batch = collate(task.val_data, list(range(min(task.batch_size, len(task.val_data)))), torch.device("cpu"))
    return batch[0] if isinstance(batch, (tuple, list)) else batch

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
from typing import Any

from orchestrator.api import Run, weight_files
from workers.task import example_input

FORMATS = {"safetensors": "model.safetensors", "torchscript": "model.ts", "onnx": "model.onnx"}


def export(run: Run, out_dir: str, fmt: str, which: str = "best") -> dict[str, Any]:
    """Write the chosen checkpoint as fmt into out_dir; return what config.json holds."""
    import torch

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    ck, state, skipped = run.weights(which)
    task = run.stored_spec().get("task") or {}
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, FORMATS[fmt])
    extra: dict[str, Any] = {}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, target, metadata={"checkpoint": ck.id})
    else:
        built = run.build_task()  # once: its model to trace, and an input to trace it on
        model = built.model
        model.load_state_dict(state)
        model.eval()
        sample = example_input(built, torch.device("cpu"))
        extra["input_shape"] = ["batch", *sample.shape[1:]]
        module = type(model).__module__  # a task given as path/file.py:fn is imported under a made-up name
        file_task = module.startswith("orchestrator_task_")
        where = task.get("name", "").rpartition(":")[0] + ":" if file_task else module + "."
        extra["model_class"] = where + type(model).__qualname__
        with torch.no_grad():
            if fmt == "torchscript":
                torch.jit.trace(model, sample).save(target)
            else:
                batch = torch.export.Dim("batch")
                # external_data=False: one self-contained file, not model.onnx + model.onnx.data
                torch.onnx.export(
                    model,
                    (sample,),
                    target,
                    input_names=["input"],
                    output_names=["output"],
                    dynamic_shapes=({0: batch},),
                    external_data=False,
                )
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
        "source_sha256": {f.path: f.sha256 for f in ck.record.files if f.path in weight_files(ck.record)},
        "skipped": skipped,  # better-ranked checkpoints passed over: their files failed verification
        **extra,
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1, allow_nan=True)
    return config

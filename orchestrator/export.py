"""Export a committed checkpoint for serving, in formats a server reads without this package.

    safetensors  model.safetensors: the weights alone; load with safetensors.torch.load_file
                 and the task's model constructor. Never imports the task.
    torchscript  model.ts: the model traced on one validation batch (torch.jit.load).
    onnx         model.onnx: the same, through torch.onnx (batch dimension dynamic).

The files are written with mode 0644 whatever the umask: an export is handed to a server,
often another user's process. What torch.onnx, onnxscript and torch.jit print while they
work (warnings, progress lines, C++ messages on the process's stdout and stderr) is caught
and dropped when the export succeeds; when it fails, ExportFailed says so in one line, with
the last thing they printed.

Every export writes config.json beside it: the task and its options, the checkpoint's
id, epoch and metrics, the monitor it was chosen by, the run's URI and the sha256 of the
source files (as recorded at commit). TorchScript and ONNX need the model itself, so
they import the task (user code) to build it; safetensors does not.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

from orchestrator.api import Run, readable_by_all, weight_files
from orchestrator.core.errors import OrchestratorError
from orchestrator.core.verify import copy_verified
from workers.task import example_input

FORMATS = {"safetensors": "model.safetensors", "torchscript": "model.ts", "onnx": "model.onnx"}


class ExportFailed(OrchestratorError, RuntimeError):
    """Writing the export failed inside torch (tracing, torch.onnx); the message is one line."""


@contextlib.contextmanager
def third_party_output() -> Iterator[list[str]]:
    """Catch what third-party code prints while it runs: Python warnings, writes to sys.stdout
    and sys.stderr, and whatever reaches file descriptors 1 and 2 (C++ messages, loggers bound
    to the original streams). The list it yields holds those lines once the block has ended."""
    lines: list[str] = []
    text = io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        saved = os.dup(1), os.dup(2)
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield lines
        finally:
            for fd, old in zip((1, 2), saved, strict=True):
                os.dup2(old, fd)
                os.close(old)
            sink.seek(0)
            printed = sink.read().decode(errors="replace") + text.getvalue()
            lines += [f"{w.category.__name__}: {w.message}" for w in caught]
            lines += [line.strip() for line in printed.splitlines() if line.strip()]


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
        extra["model_args"] = dict(built.model_args)  # model_class(**model_args) rebuilds it
        extra["input_dtype"] = str(getattr(sample, "dtype", "")).removeprefix("torch.") or None
        extra["preprocessing"] = built.preprocessing
        _traced(model, sample, target, fmt, ck.id)
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
        "dtype": weights_dtype(state),
        **extra,
    }
    if extras := ck.record.extra_files:  # a tokenizer, a config saved beside the weights: verified
        config["extra_files"] = sorted(extras)
        readable_by_all(copy_verified(run.storage, ck.record, out_dir, only=extras))
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1, allow_nan=True)
    readable_by_all([target, config_path])
    return config


def _traced(model: Any, sample: Any, target: str, fmt: str, checkpoint: str) -> None:
    """model traced on sample, written to target as TorchScript or ONNX, quietly: what torch
    prints on the way is dropped, or named in ExportFailed's one line when it fails."""
    import torch

    printed: list[str] = []
    try:
        with third_party_output() as printed, torch.no_grad():
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
    except (ImportError, OSError):
        raise  # the CLI names the missing package, or the local path
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        said = f"; it printed last: {printed[-1][:300]}" if printed else ""
        raise ExportFailed(
            f"{fmt} export of {checkpoint} failed: {type(e).__name__}: {first}{said}. "
            "safetensors export needs no tracing (--format safetensors)"
        ) from e


def weights_dtype(state: dict[str, Any]) -> str | None:
    """The dtype of the model's floating-point weights (`float32`, `bfloat16`), or `mixed`."""
    kinds = {str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None)

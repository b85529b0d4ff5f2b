"""Task names: a built-in, `package.module:function` or `path/to/file.py:function`.

Resolving a name imports the user's module (and whatever it imports); only the
worker and the spec check (before Ray starts) do that. Read-only commands never do.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.core.errors import InputError

BUILTIN_TASKS = {"digits": "workers.tasks.digits:build"}


class TaskError(InputError, ValueError):
    """A task name that does not resolve to a function; the message says why."""


def resolve_task(name: str) -> Callable[..., Any]:
    """Return the function a task name points to, or raise TaskError saying why not."""
    target = BUILTIN_TASKS.get(name, name)
    if ":" not in target:
        raise TaskError(
            f"unknown task {name!r}: use a built-in ({', '.join(sorted(BUILTIN_TASKS))}), "
            "package.module:function or path/to/file.py:function"
        )
    module_name, _, func_name = target.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise TaskError(f"task {name!r}: file {module_name} does not exist")
            mod_id = f"orchestrator_task_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(mod_id)
            if module is None:
                spec = importlib.util.spec_from_file_location(mod_id, path)
                assert spec and spec.loader
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_id] = module
                spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except TaskError:
        raise
    except Exception as e:  # an import error in user code: report it, do not hide it
        raise TaskError(f"task {name!r}: cannot import {module_name}: {type(e).__name__}: {e}") from e
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise TaskError(f"task {name!r}: {module_name} has no function {func_name!r}")
    return fn


def is_train_function(fn: Any) -> bool:
    """A train function takes one argument (the session); a task builder two (options, ctx)."""
    import inspect

    try:
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.default is inspect.Parameter.empty and p.kind in positional
        ]
    except (TypeError, ValueError):
        return False
    return len(params) == 1


SERVING_HOOK = "serving_model"


def serving_hook(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A train function's `serving_model(options) -> (model, example_input)`, defined beside it
    in its module: how export, load_best(build=True) and the Serve app build its model, which
    the loop never sees. TaskError, naming the hook, when the module has none."""
    hook = getattr(sys.modules.get(fn.__module__), SERVING_HOOK, None)
    if not callable(hook):
        raise TaskError(
            f"task {name!r} is a train function, so its model is built inside it; export, "
            f"load_best(build=True) and the Serve app need `def {SERVING_HOOK}(options) -> (model, "
            f"example_input)` beside it in its module (the model as training builds it, and one input "
            f"batch to trace it on; see docs/worker-api.md)"
        )
    return hook


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_OURS = tuple(os.path.join(_ROOT, pkg) + os.sep for pkg in ("orchestrator", "workers"))


def user_frames(error: TaskError) -> str:
    """The frames of the user's own code in a failed import (not importlib's, not ours), as a
    traceback prints them, ending with the error line: what the user needs to see."""
    cause = error.__cause__
    if cause is None:
        return str(error)
    frames = [
        f
        for f in traceback.extract_tb(cause.__traceback__)
        if not f.filename.startswith("<") and not os.path.abspath(f.filename).startswith(_OURS)
    ]
    return "".join(traceback.format_list(frames)) + "".join(traceback.format_exception_only(cause)).strip()

"""The digits task, buildable only inside a Ray worker, as a task whose data only the workers'
machines hold: the driver's monitor check before Ray cannot build it, so the workers check
the monitor (tests/test_e2e_nan.py)."""

from __future__ import annotations

from typing import Any

import ray

from workers.task import Task, TaskContext
from workers.tasks import digits


def build(options: dict[str, Any], ctx: TaskContext) -> Task:
    if not ray.is_initialized():
        raise FileNotFoundError("the training data is only on the workers' machines")
    return digits.build(options, ctx)

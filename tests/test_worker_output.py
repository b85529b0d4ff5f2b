"""Which worker lines reach the driver's console (pure logic: the label a rank's own output
carries, and the driver's filter over what Ray forwards; tests/test_session_api.py sees it
end to end)."""

from __future__ import annotations

import io
import logging

import pytest

from orchestrator.ray_compat import console_lines
from workers.output import Labeled


def test_the_users_lines_are_labeled_and_logging_and_rays_magic_are_not():
    raw = io.StringIO()
    out = Labeled(raw, "[rank 0] ")
    print("hello", "world", file=out)
    out.write("two\nlines\n")
    out.write(":actor_name:RayTrainWorker\n")  # Ray's log monitor reads this one as is
    handler = logging.StreamHandler(out)
    log = logging.getLogger("test_worker_output")
    log.addHandler(handler)
    log.propagate = False
    log.warning("Reporting training result 1")  # Ray Train's logs come this way
    log.removeHandler(handler)
    assert raw.getvalue().splitlines() == [
        "[rank 0] hello world",
        "[rank 0] two",
        "[rank 0] lines",
        ":actor_name:RayTrainWorker",
        "Reporting training result 1",
    ]


@pytest.mark.parametrize(
    "patch",
    [
        "ray.experimental.tqdm_ray:safe_print",  # once a tqdm_ray bar exists in the process
        "ray.train.v2._internal.logging.patch_print:redirected_print",  # Ray Train's, in a worker
    ],
)
def test_a_print_that_ray_patched_is_still_the_users_line(patch, monkeypatch):
    """Ray replaces builtins.print in a process that used a tqdm_ray bar (for good) and in Ray
    Train's workers; the print's own caller still decides. The suite found the first: a
    driver in the same test process had made a tqdm_ray bar manager, and this module's first
    test lost its label."""
    import builtins
    import importlib

    module, name = patch.split(":")
    monkeypatch.setattr(builtins, "print", getattr(importlib.import_module(module), name))
    raw = io.StringIO()
    print("hello", file=Labeled(raw, "[rank 0] "))
    assert raw.getvalue() == "[rank 0] hello\n"


def test_the_console_shows_rank_0s_own_lines_and_folds_rays_noise():
    worker = {"pid": 12, "lines": ["[rank 0] hello", "[rank 1] hello", "Reporting training result 1"]}
    assert console_lines(worker, verbose=False) == ["[rank 0] hello"]
    assert console_lines(worker, verbose=True) is None  # everything, as Ray prints it
    died = "A worker died or was killed while executing a task by an unexpected system error. To troubleshoot"
    assert console_lines({"pid": "raylet", "lines": [died]}, verbose=False) == []
    other = {"pid": "raylet", "lines": ["Resources requested cannot be scheduled"]}
    assert console_lines(other, verbose=False) is None  # Ray's other warnings are kept
    assert console_lines({"pid": "autoscaler", "lines": ["x"]}, verbose=False) is None

"""One error hierarchy (orchestrator/core/errors.py): every error the project raises on
purpose is an OrchestratorError with its exit code, and the CLI's entry point is the one
handler for what no command rephrases."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import orchestrator
from harness.cli import run_cli
from orchestrator.core.errors import OrchestratorError

# Exceptions that are not errors a user sees, each with why.
NOT_OURS = {
    "orchestrator.core.storage.LocalIOError": "an OSError of the local side, kept an OSError for the CLI's blame",
}


def _classes() -> list[type[BaseException]]:
    found = []
    for mod in pkgutil.walk_packages(orchestrator.__path__, "orchestrator."):
        if mod.name.endswith("__main__"):  # importing it runs the CLI
            continue
        module = importlib.import_module(mod.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == mod.name:
                found.append(obj)
    return found


def test_every_error_the_control_plane_defines_is_an_orchestrator_error() -> None:
    classes = _classes()
    assert len(classes) >= 15  # the walk found them (a broken walk must not pass)
    stray = [f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, OrchestratorError)]
    assert sorted(stray) == sorted(NOT_OURS), stray


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("orchestrator.spec.SpecError", 2),
        ("orchestrator.core.tasks.TaskError", 2),
        ("orchestrator.api.RunNotFound", 2),
        ("orchestrator.core.repair.NotARun", 2),
        ("orchestrator.core.lease.LeaseHeld", 3),
        ("orchestrator.core.lease.LeaseLost", 3),
        ("orchestrator.core.storage.StorageError", 4),
        ("orchestrator.core.manifest.ManifestError", 4),
        ("orchestrator.preflight.RayUnreachable", 5),
        ("orchestrator.driver.RunFailed", 1),
        ("orchestrator.api.NoCheckpoint", 1),
        ("orchestrator.core.verify.VerificationError", 1),
        ("orchestrator.export.ExportFailed", 1),
    ],
)
def test_each_kind_carries_its_exit_code(path: str, code: int) -> None:
    module, _, name = path.rpartition(".")
    assert getattr(importlib.import_module(module), name).exit_code == code


def test_the_builtin_bases_still_hold() -> None:
    from orchestrator.api import NoCheckpoint
    from orchestrator.driver import RunInterrupted
    from orchestrator.spec import SpecError

    assert issubclass(SpecError, ValueError) and issubclass(NoCheckpoint, LookupError)
    assert RunInterrupted("x", 15).exit_code == 143  # an instance's own code beats its class's


def test_the_one_handler_prints_the_message_and_exits_with_its_code(tmp_path) -> None:
    """`checkpoints` and `best` on a path that holds no run: RunNotFound reaches the entry
    point (no command rephrases it): one line, exit 2, no traceback."""
    for cmd in ("checkpoints", "best", "export"):
        extra = ["--out", str(tmp_path / "o")] if cmd == "export" else []
        p = run_cli(cmd, str(tmp_path / "nothing"), *extra)
        assert p.returncode == 2, (cmd, p.stderr)
        assert p.stderr.startswith("error: ") and "Traceback" not in p.stderr, (cmd, p.stderr)

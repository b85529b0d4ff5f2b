"""The one rule of the shape: the core (orchestrator/core) imports neither Ray nor torch.

Checked in a fresh interpreter, so nothing this test session imported hides an import."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import orchestrator.core

CORE = sorted(f"orchestrator.core.{m.name}" for m in pkgutil.iter_modules(orchestrator.core.__path__))

CHECK = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "torch"))
print(",".join(heavy))
"""


def test_core_modules_are_all_checked():
    assert {
        "orchestrator.core.storage",
        "orchestrator.core.manifest",
        "orchestrator.core.retention",
        "orchestrator.core.verify",
        "orchestrator.core.lease",
    } <= set(CORE)


def test_core_imports_neither_ray_nor_torch():
    p = subprocess.run([sys.executable, "-c", CHECK, *CORE], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    heavy = p.stdout.strip()
    assert heavy == "", f"importing {CORE} pulled in: {heavy}"


def test_the_check_sees_a_heavy_import():
    # The check itself can fail: importing the worker loop does pull torch in.
    p = subprocess.run(
        [sys.executable, "-c", CHECK, "workers.state"], capture_output=True, text=True, timeout=120
    )
    assert "torch" in p.stdout.split(",")

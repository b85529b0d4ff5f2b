"""The shape the project keeps: no function in orchestrator/ or workers/ over 80 lines (a longer
one says why in a `# long:` comment on its first line), and the code as `ruff format` writes it."""

from __future__ import annotations

import ast
import subprocess
import sys

from harness.cli import ROOT

LIMIT = 80


def long_functions() -> list[str]:
    out = []
    for package in ("orchestrator", "workers"):
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = path.read_text().splitlines()
            for node in ast.walk(ast.parse("\n".join(lines))):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                length = node.end_lineno - node.lineno + 1
                if length > LIMIT and "# long:" not in lines[node.lineno - 1]:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_function_over_80_lines():
    assert long_functions() == []


def test_the_check_sees_a_long_function(tmp_path, monkeypatch):
    """The check above can fail: a 90-line function in a copy of the layout is found."""
    body = "\n".join(f"    x{i} = {i}" for i in range(90))
    (tmp_path / "orchestrator").mkdir()
    (tmp_path / "workers").mkdir()
    (tmp_path / "orchestrator" / "big.py").write_text(f"def big():\n{body}\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert long_functions() == ["orchestrator/big.py:1 big (91 lines)"]


def test_the_code_is_formatted():
    dirs = ["orchestrator", "workers", "tests", "bench", "harness", "deploy", "examples"]
    p = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", *dirs], cwd=ROOT, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]

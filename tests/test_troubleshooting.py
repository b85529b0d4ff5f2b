"""docs/troubleshooting.md stays true: every error the code raises for a user (SpecError,
StorageError, ManifestError, RunFailed, ...) or dies with (`die(...)`), and every exit code,
is in its table. A new message fails this test until it has a row: cause and fix."""

from __future__ import annotations

import ast
import re

from harness.cli import ROOT
from orchestrator.cli import exits

DOC = ROOT / "docs" / "troubleshooting.md"
# Errors whose text reaches a user (the CLI prints them, or a run's reason carries them).
USER_ERRORS = {
    "SpecError",
    "StorageError",
    "ManifestError",
    "ManifestUnreadable",
    "RunFailed",
    "RunInterrupted",
    "RayUnreachable",
    "LeaseHeld",
    "LeaseLost",
    "NoCheckpoint",
    "RunNotFound",
    "RepairError",
    "NotARun",
    "CheckpointRefused",
    "VerificationError",
    "TaskError",
    "StopRun",
    "CommitError",
    "NotServable",
    "ExportFailed",
    "AliasError",
    "AliasConflict",
}
SOURCES = [*ROOT.glob("orchestrator/**/*.py"), *ROOT.glob("workers/**/*.py"), ROOT / "deploy/serve/app.py"]


def _plain(text: str) -> str:
    return re.sub(r"[`*]", "", text).lower()


def _fragments(node: ast.AST) -> list[str]:
    """The constant pieces of a message: a string, an f-string between its fields, a sum."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        out, cur = [], ""
        for v in node.values:
            if isinstance(v, ast.Constant):
                cur += str(v.value)
            else:
                out, cur = [*out, cur], ""
        return [*out, cur]
    if isinstance(node, ast.BinOp):
        return _fragments(node.left) + _fragments(node.right)
    return []


def messages() -> list[tuple[str, list[str]]]:
    """(where, the message's constant pieces of 10+ characters) for each user-facing error."""
    out = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            call = None
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                f = node.exc.func
                if getattr(f, "id", getattr(f, "attr", "")) in USER_ERRORS:
                    call = node.exc
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "die":
                call = node
            if call is None or not call.args:
                continue
            pieces = [_plain(p).strip(" :;,.()'\"\n") for p in _fragments(call.args[0])]
            pieces = [p[:40] for p in pieces if len(p) >= 10]
            if pieces:
                out.append((f"{path.relative_to(ROOT)}:{node.lineno}", pieces))
    return out


def test_every_error_message_has_a_row():
    doc = _plain(DOC.read_text())
    found = messages()
    assert len(found) > 50, "the scan found too few messages to mean anything"
    missing = [f"{where}: {pieces[0]!r}" for where, pieces in found if not any(p in doc for p in pieces)]
    assert not missing, "docs/troubleshooting.md has no row for:\n" + "\n".join(missing)


def test_every_exit_code_is_explained():
    doc = DOC.read_text()
    codes = {v for k, v in vars(exits).items() if k.startswith("EXIT_")}
    assert codes >= {1, 2, 3, 4, 5}
    for code in codes | {0}:
        assert re.search(rf"^\| {code} \|", doc, re.M), f"exit code {code} is not in the table"

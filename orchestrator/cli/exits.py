"""What every command shares: its exit codes, how it dies, how it reads key=value options."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

import typer

# The codes live with the error kinds (orchestrator/core/errors.py): 1 failed, 2 bad input,
# 3 owned by another driver, 4 storage, 5 Ray unreachable.
from orchestrator.core.errors import EXIT_API, EXIT_FAILED, EXIT_INPUT, EXIT_LEASE, EXIT_STORAGE  # noqa: F401

OPT_HELP = "fsspec storage option for RUN_URI: --storage-option endpoint_url=http://... (repeatable)."


def die(msg: str, code: int) -> NoReturn:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def parse_options(items: list[str] | None, flag: str = "--storage-option") -> dict[str, Any]:
    """key=value pairs, values read as YAML (so 3, true and {a: 1} keep their types)."""
    out: dict[str, Any] = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            die(f"{flag} {item!r}: expected key=value", EXIT_INPUT)
        from orchestrator.spec import SpecError, read_value

        try:
            out[k] = read_value(v, f"{flag} {item}")
        except SpecError as e:
            die(str(e), EXIT_INPUT)
    return out


@contextlib.contextmanager
def stdout_to_stderr(active: bool) -> Iterator[None]:
    """While active, whatever writes to fd 1 (Ray, torch.onnx) goes to stderr, so stdout holds
    only the JSON a script reads."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def local_error(e: OSError, path: str, flag: str, run_uri: str) -> NoReturn:
    """An OSError while copying a run into a local path: the local side's fault (exit 2, blame
    the flag) only when it names that path; otherwise reading the run failed (exit 4)."""
    where = os.path.abspath(str(getattr(e, "filename", "") or ""))
    if getattr(e, "filename", None) and where.startswith(os.path.abspath(path)):
        die(f"{flag} {path}: {e.strerror or e}", EXIT_INPUT)
    die(f"{run_uri}: reading the run failed: {type(e).__name__}: {e}", EXIT_STORAGE)

"""Submitting runs to a Ray cluster through the Jobs API (filled in by the cluster work)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the job commands (submit, status, logs, stop, list) to the CLI."""

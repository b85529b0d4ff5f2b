"""A local multi-node Ray cluster on this machine (filled in by the cluster work)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Start and stop a local Ray cluster (a head plus worker raylets).", no_args_is_help=True)

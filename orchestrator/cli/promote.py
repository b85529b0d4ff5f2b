"""Aliases: `promote RUN_URI --as NAME` points a name at a verified checkpoint; `aliases ROOT`
lists them. The Serve app follows an alias (docs/serving.md)."""

from __future__ import annotations

import json
import time

import typer

from orchestrator import aliases
from orchestrator.cli.exits import EXIT_STORAGE, OPT_HELP, die, parse_options
from orchestrator.cli.inspect import _open
from orchestrator.core.storage import Storage, StorageError


def promote(
    run_uri: str = typer.Argument(..., help="Storage root + run name, e.g. runs/digits."),
    name: str = typer.Option(..., "--as", help="The alias: ROOT/aliases/NAME.json."),
    checkpoint: str = typer.Option(None, help="A checkpoint id (default: the run's best that verifies)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """Point alias NAME, under the run's storage root, at a verified checkpoint of the run.

    The checkpoint's files are checked against its record first. The alias is written by
    compare-and-swap: if another promote changes it meanwhile, this one writes nothing and
    says what the alias now points at. A Serve app given `alias=NAME root=ROOT` follows it."""
    run = _open(run_uri, storage_option)
    p = aliases.promote(run, name, checkpoint)
    for s in p.skipped:
        typer.echo(f"warning: {s['id']} failed verification ({s['reason']}); using the next best", err=True)
    a = p.alias
    if as_json:
        typer.echo(json.dumps(aliases.as_dict(a, p.root.uri), indent=2))
        return
    before = f" (was {a.previous['run_uri']} {a.previous['checkpoint']})" if a.previous else ""
    typer.echo(
        f"{p.root.uri}/{aliases.ALIASES}/{a.name}.json -> {a.run_uri} {a.checkpoint} (verified){before}"
    )


def list_aliases(
    root: str = typer.Argument(..., help="A storage root: runs, s3://bucket/prefix, ..."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """The aliases under a storage root: name, run, checkpoint, who promoted it and when."""
    try:
        top = Storage(root, parse_options(storage_option))
        found = aliases.list_aliases(top)
    except (StorageError, OSError) as e:
        die(f"{root}: {e}", EXIT_STORAGE)
    if as_json:
        typer.echo(json.dumps([aliases.as_dict(a) for a in found], indent=2))
        return
    if not found:
        typer.echo(f"no aliases under {root}")
        return
    typer.echo(f"{'alias':<20} {'checkpoint':<26} {'promoted':<19}  {'by':<20} run")
    for a in found:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.promoted_at))
        typer.echo(f"{a.name:<20} {a.checkpoint:<26} {when:<19}  {a.promoted_by:<20} {a.run_uri}")


def register(app: typer.Typer) -> None:
    app.command("promote")(promote)
    app.command("aliases")(list_aliases)

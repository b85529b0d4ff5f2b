"""The `orchestrator` command line.

    orchestrator run configs/digits.yaml                 train; prints progress and the best checkpoint
    orchestrator resume RUN_URI                          continue a run whose driver died
    orchestrator checkpoints RUN_URI [--json]            what is kept, and why
    orchestrator best RUN_URI [--json] [--download DIR]  the best checkpoint, for serving
    orchestrator events RUN_URI [--json]                 commits, deletions, restarts, retries
    orchestrator verify RUN_URI [--json]                 is every kept checkpoint's shared copy intact?
    orchestrator repair RUN_URI [--dry-run]              restore an unreadable manifest.json from its backup
    orchestrator delete RUN_URI [--yes]                  remove a run (a failed one with nothing committed)
    orchestrator promote RUN_URI --as NAME               point a name at a verified checkpoint (Serve follows)
    orchestrator aliases ROOT [--json]                   the aliases under a storage root

Exit codes: 0 success, 1 the run failed, 2 bad input (spec, arguments), 3 run owned
by another live driver, 4 storage unreachable or unreadable, 5 the Ray cluster or its Jobs
API unreachable or refused us, 130/143 `run`/`resume` interrupted by Ctrl-C/SIGTERM (resumable).
"""

from __future__ import annotations

import sys

import typer

from orchestrator.cli import delete, export, inspect, jobs, promote, repair, see, train, verify

app = typer.Typer(
    help="Fault-tolerant distributed PyTorch training on Ray, with top-k checkpoints "
    "that are never lost or half-read.\n\n"
    "Exit codes: 0 success, 1 the run failed, 2 bad input (spec, arguments), 3 the run is "
    "owned (or was taken over) by another driver, 4 storage unreachable or unreadable, "
    "5 the Ray cluster or its Jobs API unreachable or refused us, 130/143 run or resume "
    "interrupted by Ctrl-C/SIGTERM "
    "(the run stays resumable).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from orchestrator import __version__

        typer.echo(f"orchestrator {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


train.register(app)
inspect.register(app)
verify.register(app)
export.register(app)
see.register(app)
jobs.register(app)
repair.register(app)
delete.register(app)
promote.register(app)


def main() -> None:
    from orchestrator.core import console
    from orchestrator.core.errors import OrchestratorError

    console.configure()  # the project's log records: `[tag] message` lines on stdout / stderr
    try:
        app(prog_name="orchestrator")
    except OrchestratorError as e:  # the one handler: what no command said more about
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)

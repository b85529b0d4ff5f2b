"""Running a job: `run` trains a spec to the end, `resume` continues a run whose driver died."""

from __future__ import annotations

import json
from typing import Any

import typer

from orchestrator.cli.exits import (
    EXIT_API,
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_LEASE,
    EXIT_STORAGE,
    OPT_HELP,
    die,
    parse_options,
    stdout_to_stderr,
)
from orchestrator.core.lease import LeaseHeld
from orchestrator.core.manifest import ManifestError
from orchestrator.core.storage import StorageError, redact, secrets_in
from orchestrator.spec import SpecError, load_spec

SET_HELP = "Override a spec field: --set checkpoint.top_k=5 (repeatable; values are YAML)."


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    typer.echo(
        f"[run] {summary['status']}: {summary['epochs']} epochs, {summary['restarts']} restart(s), "
        f"{summary['attempts']} attempt(s)"
    )
    best = summary.get("best")
    if best:
        typer.echo(
            f"[run] best checkpoint: {best['uri']}  "
            f"({best['monitor']} {best['value']:.6g}, epoch {best['epoch']})"
        )
    if summary.get("error"):  # its first line: a traceback follows once, in the error itself
        typer.echo(f"[run] reason: {summary['error'].splitlines()[0]}", err=True)


def _train(spec: Any, address: str | None, as_json: bool, quiet: bool, resume: bool, verbose: bool) -> None:
    from orchestrator.driver import RunFailed, RunInterrupted, run
    from orchestrator.preflight import RayUnreachable

    try:
        with stdout_to_stderr(as_json):  # Ray prints to fd 1; --json keeps stdout for the JSON
            summary = run(spec, address=address, quiet=quiet or as_json, resume=resume, verbose=verbose)
    except LeaseHeld as e:  # LeaseLost too: taken over mid-run
        die(str(e), EXIT_LEASE)
    except SpecError as e:
        die(str(e), EXIT_INPUT)
    except RayUnreachable as e:
        die(str(e), EXIT_API)
    except RunInterrupted as e:
        if e.summary is not None:
            _print_summary(e.summary.as_dict(), as_json)
        die(f"run {spec.name} interrupted: {e}", e.exit_code)
    except RunFailed as e:
        if e.summary is not None:
            _print_summary(e.summary.as_dict(), as_json)
        die(f"run {spec.name} failed: {e}", EXIT_FAILED)
    except (StorageError, ManifestError) as e:
        die(str(e), EXIT_STORAGE)
    except OSError as e:  # before training starts, storage is all that does I/O
        why = redact(f"{type(e).__name__}: {e}", secrets_in(spec.storage.options))
        die(f"storage {spec.run_uri}: {why}", EXIT_STORAGE)
    else:
        _print_summary(summary.as_dict(), as_json)


def run(
    config: str = typer.Argument(..., help="Job spec YAML, e.g. configs/digits.yaml."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    address: str = typer.Option(
        None,
        help="Ray cluster to join (e.g. 127.0.0.1:6379), or 'local' for a "
        "new embedded Ray; default: RAY_ADDRESS, a cluster started on this "
        "machine with `ray start`, else an embedded one.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the final summary as JSON."),
    quiet: bool = typer.Option(False, help="No per-epoch progress lines."),
    verbose: bool = typer.Option(False, help="Also stream Ray's and the workers' own logs."),
) -> None:
    """Train a job spec to the end, surviving worker crashes; print the best checkpoint."""
    try:
        spec = load_spec(config, set_ or [])
    except SpecError as e:
        die(str(e), EXIT_INPUT)
    _train(spec, address, as_json, quiet, resume=False, verbose=verbose)


def resume(
    run_uri: str = typer.Argument(..., help="The run to continue: storage root + run name."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP + " E.g. --set epochs=20."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
    address: str = typer.Option(None, help="Ray cluster to join (see `run`)."),
    as_json: bool = typer.Option(False, "--json", help="Print the final summary as JSON."),
    quiet: bool = typer.Option(False, help="No per-epoch progress lines."),
    verbose: bool = typer.Option(False, help="Also stream Ray's and the workers' own logs."),
) -> None:
    """Continue a run from its latest committed checkpoint, with the spec stored in the run.

    --set may change how the run goes on (epochs, failure.*, scaling.*, retention counts,
    save cadence); not what it computes (seed, task.*, checkpoint.monitor/mode) or where it
    lives (name, storage.root)."""
    from orchestrator.driver import load_stored_spec
    from orchestrator.spec import apply_overrides, check_resume_overrides, parse_spec

    try:
        check_resume_overrides(set_ or [])
        spec = load_stored_spec(run_uri, parse_options(storage_option))
        if set_:
            spec = parse_spec(apply_overrides(spec.model_dump(), set_), source=f"{run_uri} --set")
    except SpecError as e:
        die(str(e), EXIT_INPUT)
    except (StorageError, OSError) as e:
        die(f"{run_uri}: {e}", EXIT_STORAGE)
    _train(spec, address, as_json, quiet, resume=True, verbose=verbose)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("resume")(resume)

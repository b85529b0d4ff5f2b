"""Running a job: `run` trains a spec to the end, `resume` continues a run whose driver died."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import typer

from orchestrator.cli.exits import (
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_STORAGE,
    OPT_HELP,
    die,
    parse_options,
    stdout_to_stderr,
)
from orchestrator.core.manifest import ManifestError
from orchestrator.core.storage import StorageError, redact, secrets_in
from orchestrator.spec import SpecError, load_spec
from orchestrator.tracking import off_line

SET_HELP = "Override a spec field: --set checkpoint.top_k=5 (repeatable; values are YAML)."
RESUME_IF_EXISTS_HELP = (
    "Continue the run at RUN_URI (storage.root/name) if it exists and its stored spec equals this "
    "one; start it if there is none; refuse (exit 2, naming the fields) if the specs differ. A "
    "finished run is reported, exit 0, without starting Ray. For an entrypoint that is run again "
    "unchanged after its driver dies (a KubeRay RayJob's backoffLimit)."
)
_UNSET = object()  # a key one spec has and the other has not


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
    for e in summary.get("trackers_off") or []:  # warned of once during the run; here for the record
        when, error, then = off_line(e)
        typer.echo(f"[run] tracker {e.get('tracker')}: off {when} ({error}){then}", err=True)


def _train(
    spec: Any,
    address: str | None,
    as_json: bool,
    quiet: bool,
    resume: bool,
    verbose: bool,
    force: bool = False,
) -> None:
    from orchestrator.driver import RunFailed, RunInterrupted, run

    try:
        with stdout_to_stderr(as_json):  # Ray prints to fd 1; --json keeps stdout for the JSON
            summary = run(
                spec, address=address, quiet=quiet or as_json, resume=resume, verbose=verbose, force=force
            )
    except RunInterrupted as e:  # LeaseHeld (3), SpecError (2), RayUnreachable (5): the one handler
        if e.summary is not None:
            _print_summary(e.summary.as_dict(), as_json)
        die(f"run {spec.name} interrupted: {e}", e.exit_code)
    except RunFailed as e:
        if e.summary is not None:
            _print_summary(e.summary.as_dict(), as_json)
        die(f"run {spec.name} failed: {e}", EXIT_FAILED)
    except (StorageError, ManifestError):
        raise  # to the one handler (exit 4), not the OSError below
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
    resume_if_exists: bool = typer.Option(False, "--resume-if-exists", help=RESUME_IF_EXISTS_HELP),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace a run at RUN_URI that committed no checkpoint (stale, interrupted or failed: "
        "nothing to resume from), e.g. with a corrected spec. A run with a committed checkpoint "
        "is never replaced: resume it or `orchestrator delete` it.",
    ),
) -> None:
    """Train a job spec to the end, surviving worker crashes; print the best checkpoint.

    A run that already exists at RUN_URI is refused (continue it with `resume`), unless
    --resume-if-exists is given and the spec is the one the run was started with. One that
    failed before committing any checkpoint is replaced; --force replaces any run that
    committed none (a stale or interrupted one too)."""
    try:
        spec = load_spec(config, set_ or [])
    except SpecError as e:
        die(str(e), EXIT_INPUT)
    resume = _continue_existing(spec, as_json) if resume_if_exists else False
    _train(spec, address, as_json, quiet, resume=resume, verbose=verbose, force=force)


def _continue_existing(spec: Any, as_json: bool) -> bool:
    """--resume-if-exists: True to continue the run at RUN_URI, False to start it (none there).
    Exits 0 for a finished run with this spec, 2 when the stored spec differs."""
    from orchestrator.core.manifest import read_manifest
    from orchestrator.driver import spec_record

    with _reading(spec):
        storage = spec.open_run_storage()
        existing = read_manifest(storage)
        if existing is None:
            return False  # no run (a spec.yaml alone: its driver died before the run began)
        differences = _spec_differences(_stored_record(storage, spec.run_uri), spec_record(spec))
        if differences:
            die(_differ_message(spec, existing.status, differences), EXIT_INPUT)
        if existing.status == "finished":
            _report_finished(spec, existing, as_json)
            raise typer.Exit(0)
    return True


@contextlib.contextmanager
def _reading(spec: Any) -> Iterator[None]:
    """Errors while reading the run at RUN_URI, as `run` reports them: exit 2 or 4."""
    try:
        yield
    except SpecError as e:
        die(str(e), EXIT_INPUT)
    except (StorageError, ManifestError) as e:
        die(str(e), EXIT_STORAGE)
    except OSError as e:
        why = redact(f"{type(e).__name__}: {e}", secrets_in(spec.storage.options))
        die(f"storage {spec.run_uri}: {why}", EXIT_STORAGE)


def _stored_record(storage: Any, run_uri: str) -> dict[str, Any]:
    """The run's spec.yaml, validated and normalized as the given spec is (the task is not
    imported: the given spec's was)."""
    import yaml

    from orchestrator.core.manifest import SPEC
    from orchestrator.driver import spec_record
    from orchestrator.spec import parse_spec

    where = f"{run_uri}/{SPEC}"
    if not storage.exists(SPEC):
        raise SpecError(
            f"{run_uri} holds a run but no {SPEC}, so its spec cannot be compared; "
            f"`orchestrator resume {run_uri}` cannot continue it either"
        )
    try:
        data = yaml.safe_load(storage.read_bytes(SPEC))
    except yaml.YAMLError as e:
        raise SpecError(f"{where}: not valid YAML: {e}") from None
    return spec_record(parse_spec(data, source=where, check_task=False))


def _spec_differences(stored: Any, given: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field path, stored value, given value) wherever two specs' data differ."""
    if isinstance(stored, dict) and isinstance(given, dict):
        keys = list(stored) + [k for k in given if k not in stored]
        return [
            d
            for k in keys
            for d in _spec_differences(
                stored.get(k, _UNSET), given.get(k, _UNSET), f"{path}.{k}" if path else str(k)
            )
        ]
    return [] if stored == given else [(path, stored, given)]


def _shown(value: Any) -> str:
    text = "(not set)" if value is _UNSET else json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _differ_message(spec: Any, status: str, differences: list[tuple[str, Any, Any]]) -> str:
    lines = "\n".join(f"  {path}: {_shown(old)} -> {_shown(new)}" for path, old, new in differences)
    return (
        f"{spec.run_uri} holds a {status} run, and this spec differs from the stored spec it was "
        f"started with (stored -> given):\n{lines}\n--resume-if-exists continues a run only with "
        f"its own spec. Continue it as it was with `orchestrator resume {spec.run_uri}` (its --set "
        "may change epochs, failure.*, scaling.* and retention), or start a new run under another "
        "name (--set name=...)"
    )


def _report_finished(spec: Any, manifest: Any, as_json: bool, said: str = ", with this spec") -> None:
    """What `run` prints at the end, for a run that had already ended (`said`: how we know
    there is nothing to do), read from storage alone."""
    from orchestrator.api import Run
    from orchestrator.driver import _best_entry

    run = Run(spec.run_uri, spec.storage.options)  # ranks as `orchestrator best` does
    ranked = run.ranked()
    best = {"id": ranked[0].id, "epoch": ranked[0].epoch, "metrics": ranked[0].metrics} if ranked else None
    summary = {
        "run_uri": spec.run_uri,
        "status": "finished",
        "already_finished": True,
        "epochs": max((r.get("epoch", 0) for r in run.metrics(as_frame=False)), default=0),
        "restarts": manifest.restarts,
        "attempts": manifest.attempts,
        "kept": manifest.kept,
        "error": None,
        "best": _best_entry(spec, best),
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    typer.echo(f"[run] {spec.run_uri} already finished{said}; nothing to do (Ray not started)")
    _print_summary(summary, as_json)
    typer.echo(
        f"[run] more epochs: `orchestrator resume {spec.run_uri} --set epochs=N`; a new run: --set name=..."
    )


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
        spec = load_stored_spec(run_uri, parse_options(storage_option), check_task=False)
        stored_epochs = spec.epochs
        if set_:
            data = apply_overrides(spec.model_dump(), set_)
            spec = parse_spec(data, source=f"{run_uri} --set", check_task=False)
    except SpecError as e:
        die(str(e), EXIT_INPUT)
    except (StorageError, OSError) as e:
        die(f"{run_uri}: {e}", EXIT_STORAGE)
    if spec.epochs <= stored_epochs:  # no more epochs asked: a finished run is answered from storage
        from orchestrator.core.manifest import read_manifest

        with _reading(spec):
            existing = read_manifest(spec.open_run_storage())
        if existing is not None and existing.status == "finished":
            _report_finished(spec, existing, as_json, f" (epochs: {stored_epochs})")
            raise typer.Exit(0)
    try:  # the task is imported (checked) only for a run that goes on
        spec = parse_spec(spec.model_dump(), source=f"{run_uri} --set" if set_ else f"{run_uri}/spec.yaml")
    except SpecError as e:
        die(str(e), EXIT_INPUT)
    _train(spec, address, as_json, quiet, resume=True, verbose=verbose)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("resume")(resume)

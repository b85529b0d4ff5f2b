"""`delete`: remove a run, all of it, when nothing in it is worth keeping."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from orchestrator.cli.exits import (
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_LEASE,
    EXIT_STORAGE,
    OPT_HELP,
    die,
    parse_options,
)
from orchestrator.core.lease import Lease, LeaseHeld
from orchestrator.core.manifest import MANIFEST, Manifest, ManifestError, read_manifest
from orchestrator.core.storage import Storage, StorageError
from orchestrator.lifecycle import committed_count, delete_run, is_run, run_state


def delete(
    run_uri: str = typer.Argument(..., help="The run to delete: storage root + run name, e.g. runs/digits."),
    yes: bool = typer.Option(
        False, "--yes", "-y", help="Delete a run that has committed checkpoints without asking."
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """Delete a run: the whole RUN_URI directory (checkpoints, metrics, events, spec, manifest).

    For a run that holds nothing worth keeping, e.g. one that failed before its first
    checkpoint (a wrong checkpoint.monitor), so its name can be used again. (`orchestrator run`
    of a corrected spec replaces such a run by itself.)

    A run with committed checkpoints is deleted only with --yes, or after a yes at the prompt
    on a terminal. A run a live driver owns is refused; a dead driver's lease is taken over
    first, so no driver can start on the run while it is deleted. MLflow runs and
    TensorBoard copies elsewhere are left alone.

    Exit codes: 0 deleted, 1 not confirmed at the prompt, 2 not a run or --yes missing,
    3 a live driver owns the run, 4 storage unreachable."""
    try:
        storage = Storage(run_uri, parse_options(storage_option))
        if not is_run(storage):
            die(f"{run_uri}: no manifest.json or spec.yaml here, so not a run; nothing deleted", EXIT_INPUT)
        state = _state(storage)  # before this command holds the lease: stale, not running
        lease = Lease(storage)
        lease.acquire()  # refuses while a live driver owns the run; no driver starts while held
    except LeaseHeld as e:
        die(f"{e}\ndelete removes a run only while no driver runs it", EXIT_LEASE)
    except (StorageError, OSError) as e:
        die(f"{run_uri}: {e}", EXIT_STORAGE)
    try:
        out = _delete_held(storage, lease, state, yes, as_json)
    except (StorageError, OSError) as e:
        die(
            f"{run_uri}: deleting failed part way: {e}; run `orchestrator delete {run_uri}` again",
            EXIT_STORAGE,
        )
    finally:
        lease.release()  # gone with the run when deleted; released when refused
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    else:
        typer.echo(f"deleted {run_uri} ({state} run, {out['checkpoints']} committed checkpoint(s))")


def _manifest(storage: Storage) -> Manifest | None:
    try:
        return read_manifest(storage)
    except ManifestError:  # unreadable (or a newer format): its checkpoint directories count
        return None


def _state(storage: Storage) -> str:
    manifest = _manifest(storage)
    if manifest is None:
        return "unreadable" if storage.exists(MANIFEST) else "not started"
    return run_state(storage, manifest).state


def _delete_held(storage: Storage, lease: Lease, state: str, yes: bool, as_json: bool) -> dict[str, Any]:
    """With the run's lease held: count what would be lost, ask, delete."""
    manifest = _manifest(storage)
    count = committed_count(storage, manifest)
    if count and not yes:
        what = f"{storage.uri} holds a {state} run with {count} committed checkpoint(s)"
        if as_json or not sys.stdin.isatty():
            die(f"{what}; pass --yes to delete it with them (nothing deleted)", EXIT_INPUT)
        if not typer.confirm(f"{what}. Delete it, checkpoints and all?", default=False):
            die(f"{storage.uri}: not deleted", EXIT_FAILED)
    removed = delete_run(storage, lease)
    return {
        "run_uri": storage.uri,
        "deleted": True,
        "state": state,
        "status": manifest.status if manifest else None,
        "checkpoints": count,
        "removed": removed,
    }


def register(app: typer.Typer) -> None:
    app.command("delete")(delete)

"""`orchestrator verify RUN_URI`: does every kept checkpoint's shared copy still match its record?

Read-only, like the other query commands: it opens RUN_URI, never a Ray cluster, and changes
nothing (no checkpoint is marked, healed or deleted).
"""

from __future__ import annotations

import json
import time
from typing import Any

import typer

from orchestrator.cli.exits import EXIT_FAILED, EXIT_STORAGE, OPT_HELP, die
from orchestrator.cli.inspect import _open
from orchestrator.core.manifest import CheckpointRecord, ManifestError, read_manifest
from orchestrator.core.storage import StorageError
from orchestrator.core.verify import check_stored


def verify(
    run_uri: str = typer.Argument(
        ..., help="Storage root + run name, e.g. runs/digits or s3://bucket/runs/x."
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """Check every kept checkpoint's shared copy against its record.

    Each file's size is compared with the record, then its sha256: the
    store's own where it keeps one (S3 objects uploaded with a SHA256
    checksum), else the file is streamed through sha256, never held in
    memory. Sharded checkpoints have every rank's files checked.

    Why: a restore served from a node's local copy (checkpoint.local_cache)
    does not read shared storage, the only copy that outlives the node.
    The worker then checks the shared copy in the background and rewrites
    a damaged file from its verified local copy (events shared_copy_damaged,
    shared_copy_healed). This command checks every kept checkpoint, at any
    time, without Ray: before you retire nodes, copy a run, or trust an
    old one.

    Prints one line per checkpoint: ok, or DAMAGED with each file and why;
    progress goes to stderr. Read-only: nothing is marked bad, rewritten or
    deleted (a resume marks a damaged checkpoint bad and falls back to the
    previous one when no node holds a good copy). A checkpoint that
    retention deletes while it is checked (a live run) is skipped.

    Exit 0: every kept checkpoint intact. 1: some damaged. 2: no run at
    RUN_URI. 4: storage unreachable or unreadable.

    \b
    Examples:
      orchestrator verify runs/digits
      orchestrator verify s3://bucket/runs/digits --json | jq .damaged
    """
    run = _open(run_uri, storage_option)
    records = sorted(run.manifest.checkpoints, key=lambda c: c.seq)
    start, rows = time.time(), []
    for i, record in enumerate(records, 1):
        total = sum(f.size for f in record.files)
        typer.echo(f"[{i}/{len(records)}] {record.id}: {len(record.files)} file(s), {_mb(total)}", err=True)
        rows.append(_check(run, record))
    took = time.time() - start
    typer.echo(f"checked {len(records)} checkpoint(s) in {took:.1f}s", err=True)
    damaged = [{"id": r["id"], "epoch": r["epoch"], **p} for r in rows for p in r["problems"]]
    if as_json:
        out = {"run_uri": run.uri, "ok": not damaged, "checkpoints": rows, "damaged": damaged}
        typer.echo(json.dumps(out, indent=2))
    else:
        _print(run.uri, rows, damaged)
    if damaged:
        raise typer.Exit(EXIT_FAILED)


def _check(run: Any, record: CheckpointRecord) -> dict[str, Any]:
    """One checkpoint's result: status ok, damaged, or deleted (by retention, while checked)."""
    size = sum(f.size for f in record.files)
    row: dict[str, Any] = {
        "id": record.id,
        "epoch": record.epoch,
        "sharded": record.sharded,
        "files": len(record.files),
        "bytes": size,
    }
    try:
        problems = check_stored(run.storage, record)
        if problems and _dropped(run, record):
            return {**row, "status": "deleted", "problems": []}
    except (StorageError, ManifestError, OSError) as e:
        die(f"{run.uri}: checking {record.id}: {e}", EXIT_STORAGE)
    status = "damaged" if problems else "ok"
    return {**row, "status": status, "problems": [{"file": p.file, "why": p.why} for p in problems]}


def _dropped(run: Any, record: CheckpointRecord) -> bool:
    """The coordinator no longer keeps record (a live run's retention deleted it meanwhile)."""
    fresh = read_manifest(run.storage)
    return fresh is not None and fresh.get(record.id) is None


def _print(uri: str, rows: list[dict[str, Any]], damaged: list[dict[str, Any]]) -> None:
    files, size = sum(r["files"] for r in rows), sum(r["bytes"] for r in rows)
    typer.echo(f"{uri}: {len(rows)} kept checkpoint(s), {files} file(s), {_mb(size)} checked")
    for r in rows:
        what = f"epoch {r['epoch']}, {r['files']} file(s)" + (", sharded" if r["sharded"] else "")
        if r["status"] == "deleted":
            typer.echo(f"skipped  {r['id']}  deleted by retention while it was checked")
        elif r["status"] == "ok":
            typer.echo(f"ok       {r['id']}  {what}")
        else:
            typer.echo(f"DAMAGED  {r['id']}  {what}")
            for p in r["problems"]:
                typer.echo(f"           {p['file']}: {p['why']}")
    if damaged:
        n = len({d["id"] for d in damaged})
        typer.echo(f"{n} checkpoint(s) damaged in shared storage: their files no longer match their records")
    else:
        typer.echo("every kept checkpoint matches its record")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)

"""Inspecting a run from its storage alone: checkpoints, best, metrics, events.

Read-only: these commands open RUN_URI, never a Ray cluster.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import typer

from orchestrator.cli.exits import EXIT_FAILED, EXIT_INPUT, EXIT_STORAGE, OPT_HELP, die, parse_options
from orchestrator.core.manifest import (
    EVENTS,
    METRICS,
    CheckpointRecord,
    Manifest,
    ManifestError,
    read_jsonl,
    read_manifest,
)
from orchestrator.core.retention import rank_best
from orchestrator.core.storage import Storage, StorageError
from orchestrator.spec import SpecError


def _open(run_uri: str, options: list[str] | None) -> tuple[Storage, Manifest]:
    try:
        storage = Storage(run_uri, parse_options(options))
        manifest = read_manifest(storage)
    except (StorageError, ManifestError, OSError) as e:
        die(f"{run_uri}: {e}", EXIT_STORAGE)
    if manifest is None:
        die(
            f"{run_uri}: no manifest.json; is this a run directory (storage root + run name)?",
            EXIT_INPUT,
        )
    return storage, manifest


def _monitor(storage: Storage, manifest: Manifest) -> tuple[str, str]:
    """The monitor and mode the run ranks by: from its manifest; for a run written before
    the manifest carried them, from its stored spec (read, never imported). Never a guess."""
    if manifest.retention:
        return manifest.retention["monitor"], manifest.retention["mode"]
    from orchestrator.driver import load_stored_spec

    try:
        spec = load_stored_spec(storage.uri, storage.options, check_task=False)
    except (SpecError, StorageError, OSError) as e:
        die(f"{storage.uri}: cannot tell which metric ranks this run's checkpoints: {e}", EXIT_STORAGE)
    return spec.checkpoint.monitor, spec.checkpoint.mode


def checkpoints(
    run_uri: str = typer.Argument(..., help="Storage root + run name, e.g. runs/digits."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """List committed checkpoints: epoch, metrics, and why each is kept."""
    storage, m = _open(run_uri, storage_option)
    monitor, mode = _monitor(storage, m)
    rows: list[dict[str, Any]] = [
        {
            "id": c.id,
            "uri": storage.child_uri(c.dir),
            "epoch": c.epoch,
            "global_step": c.global_step,
            "end_of_epoch": c.end_of_epoch,
            "metrics": c.metrics,
            "metrics_fresh": c.metrics_fresh,
            "kept_because": m.kept.get(c.id, []),
        }
        for c in sorted(m.checkpoints, key=lambda c: c.seq)
    ]
    bad = [{"id": b.record.id, "reason": b.reason} for b in m.bad]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "run_uri": run_uri,
                    "monitor": monitor,
                    "mode": mode,
                    "status": m.status,
                    "generation": m.generation,
                    "checkpoints": rows,
                    "bad": bad,
                },
                indent=2,
            )
        )
        return
    typer.echo(f"{run_uri}  ({m.status}, manifest generation {m.generation}, monitor {monitor}/{mode})")
    typer.echo(f"{'id':<24} {'epoch':>5} {'step':>7} {monitor:>10}  kept because")
    for r in rows:
        v = r["metrics"].get(monitor)
        vs = "-" if v is None else f"{v:.5g}" + ("" if r["metrics_fresh"] else "*")
        typer.echo(
            f"{r['id']:<24} {r['epoch']:>5} {r['global_step']:>7} {vs:>10}  {', '.join(r['kept_because'])}"
        )
    if any(not r["metrics_fresh"] for r in rows):
        typer.echo("* mid-epoch checkpoint: metric carried from the last evaluation, not ranked in best-k")
    for b in bad:
        typer.echo(f"bad: {b['id']}: {b['reason']}")


def best(
    run_uri: str = typer.Argument(..., help="Storage root + run name."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    download: str = typer.Option(None, help="Copy the best checkpoint's files (verified) into DIR."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """The best committed checkpoint by the run's monitored metric, verified against its record.

    A best checkpoint whose files no longer match their record is skipped, with a warning,
    for the next best. On a live run, one that retention deletes while it is read is
    looked up again."""
    storage, m = _open(run_uri, storage_option)
    monitor, mode = _monitor(storage, m)
    rec, blobs, skipped = _verified_best(storage, m, monitor, mode)
    out: dict[str, Any] = {
        "id": rec.id,
        "uri": storage.child_uri(rec.dir),
        "epoch": rec.epoch,
        "global_step": rec.global_step,
        "monitor": monitor,
        "mode": mode,
        "value": rec.metrics.get(monitor),
        "metrics": rec.metrics,
        "files": [f.model_dump() for f in rec.files],
        "verified": True,
        "skipped": skipped,
    }
    for s in skipped:
        typer.echo(f"warning: {s['id']} failed verification ({s['reason']}); using the next best", err=True)
    if download:
        os.makedirs(download, exist_ok=True)
        for name, data in blobs.items():
            with open(os.path.join(download, name), "wb") as fb:
                fb.write(data)
        with open(os.path.join(download, "checkpoint.json"), "w") as ft:
            json.dump(rec.model_dump(), ft, indent=1)
        out["downloaded_to"] = os.path.abspath(download)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    where = f"epoch {rec.epoch}, step {rec.global_step}"
    typer.echo(f"{out['uri']}  {monitor} {out['value']:.6g} ({mode}), {where} (verified)")
    if download:
        typer.echo(
            f"downloaded (verified) to {out['downloaded_to']}; load with "
            "torch.load('model.pt', weights_only=True)"
        )


def _verified_best(
    storage: Storage, m: Manifest, monitor: str, mode: str
) -> tuple[CheckpointRecord, dict[str, bytes], list[dict[str, str]]]:
    """The best checkpoint whose files verify, its bytes, and the better ones skipped."""
    from orchestrator.core.verify import VerificationError, read_verified

    skipped: list[dict[str, str]] = []
    for _ in range(5):  # a live run's retention may delete what we chose: choose again
        for view in rank_best([c.view(monitor) for c in m.checkpoints], mode):
            if any(s["id"] == view.id for s in skipped):
                continue
            rec = m.get(view.id)
            assert rec is not None
            try:
                return rec, read_verified(storage, rec), skipped
            except VerificationError as e:
                fresh = read_manifest(storage)
                if fresh is not None and fresh.get(rec.id) is None:
                    m = fresh  # dropped by retention while we read it, not damaged
                    break
                skipped.append({"id": rec.id, "reason": str(e)})
            except StorageError as e:
                die(f"{rec.id}: {e}", EXIT_STORAGE)
        else:
            why = "verifies" if skipped else f"carries {monitor!r}"
            die(f"{storage.uri}: no committed checkpoint {why}", EXIT_FAILED)
    die(f"{storage.uri}: the best checkpoint kept changing while it was read; try again", EXIT_STORAGE)


def events(
    run_uri: str = typer.Argument(..., help="Storage root + run name."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    kind: list[str] = typer.Option(None, help="Only these kinds (repeatable): commit, delete, restart, ..."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """The run's event log: commits, deletions, restarts, verification failures, retries."""
    storage, _ = _open(run_uri, storage_option)
    rows = [e for e in read_jsonl(storage, EVENTS) if not kind or e.get("kind") in kind]
    for e in rows:
        if as_json:
            typer.echo(json.dumps(e, sort_keys=True))
        else:
            rest = " ".join(
                f"{k}={str(v).splitlines()[0] if str(v) else v}"
                for k, v in e.items()
                if k not in ("ts", "kind")
            )
            ts = time.strftime("%H:%M:%S", time.localtime(e.get("ts", 0)))
            typer.echo(f"{ts} {e.get('kind', '?'):<20} {rest}")


def metrics(
    run_uri: str = typer.Argument(..., help="Storage root + run name."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """Per-epoch metrics history of a run."""
    storage, _ = _open(run_uri, storage_option)
    for row in read_jsonl(storage, METRICS):
        typer.echo(
            json.dumps(row, sort_keys=True)
            if as_json
            else "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        )


def register(app: typer.Typer) -> None:
    app.command("checkpoints")(checkpoints)
    app.command("best")(best)
    app.command("events")(events)
    app.command("metrics")(metrics)

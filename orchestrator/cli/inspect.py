"""Inspecting a run from its storage alone: checkpoints, best, metrics, events.

Read-only: these commands open RUN_URI, never a Ray cluster.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import typer

from orchestrator.api import MODEL_FILE, Run, RunNotFound, readable_by_all
from orchestrator.cli.exits import (
    EXIT_INPUT,
    EXIT_STORAGE,
    OPT_HELP,
    die,
    local_error,
    parse_options,
)
from orchestrator.core.lease import LEASE as RUN_LEASE
from orchestrator.core.manifest import EVENT_KINDS, ManifestError
from orchestrator.core.storage import Storage, StorageError
from orchestrator.lifecycle import RunState
from orchestrator.report.curves import best_epoch as best_of


def _open(run_uri: str, options: list[str] | None) -> Run:
    try:  # a RunNotFound goes to the one handler (exit 2)
        return Run(run_uri, parse_options(options))
    except RunNotFound:
        raise
    except (StorageError, ManifestError, OSError) as e:
        die(f"{run_uri}: {e}", EXIT_STORAGE)


def checkpoints(
    run_uri: str = typer.Argument(..., help="Storage root + run name, e.g. runs/digits."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """List committed checkpoints: epoch, metrics, rank by the monitor, and why each is kept.

    The first line says the run's state (see `orchestrator runs --help`): an interrupted or
    stale run is named so, with the command that continues it."""
    run = _open(run_uri, storage_option)
    m, monitor = run.manifest, run.monitor
    state = _state(run)
    rows = [c.as_dict() for c in run.checkpoints()]
    bad = [{"id": b.record.id, "reason": b.reason} for b in m.bad]
    if as_json:
        out = {
            "run_uri": run_uri,
            "monitor": monitor,
            "mode": run.mode,
            "status": m.status,
            "state": state.state,
            "state_detail": state.detail,
            "next": state.next,
            "generation": m.generation,
            "checkpoints": rows,
            "bad": bad,
        }
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(
        f"{run_uri}  ({state.state}, manifest generation {m.generation}, monitor {monitor}/{run.mode})"
    )
    if state.detail or state.next:
        typer.echo(state.line())
    typer.echo(f"{'id':<26} {'epoch':>5} {'step':>7} {monitor:>10} {'rank':>4}  kept because")
    for r in rows:
        v = r["metrics"].get(monitor)
        vs = "-" if v is None else f"{v:.5g}" + ("" if r["metrics_fresh"] else "*")
        rank = "-" if r["rank"] is None else str(r["rank"])
        why = ", ".join(r["kept_because"])
        typer.echo(f"{r['id']:<26} {r['epoch']:>5} {r['global_step']:>7} {vs:>10} {rank:>4}  {why}")
    if any(not r["metrics_fresh"] for r in rows):
        typer.echo("* mid-epoch checkpoint: metric carried from the last evaluation, not ranked in best-k")
    for b in bad:
        typer.echo(f"bad: {b['id']}: {b['reason']}")


def best(
    run_uri: str = typer.Argument(..., help="Storage root + run name."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    rank: int = typer.Option(1, min=1, help="1 for the best, 2 for the runner-up, ..."),
    download: str = typer.Option(None, help="Copy the checkpoint's files (verified, streamed) into DIR."),
    weights_only: bool = typer.Option(
        True,
        "--weights-only/--all-files",
        help="With --download: model.pt and the checkpoint's extra files (extras/: what serving "
        "needs), or also train_state.pt (optimizer, RNG, data position: what resuming needs).",
    ),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """The best committed checkpoint by the run's monitored metric, verified against its record.

    A best checkpoint whose files no longer match their record is skipped, with a warning,
    for the next best. On a live run, one that retention deletes while it is read is
    looked up again."""
    if download and os.path.exists(download) and not os.path.isdir(download):
        die(f"--download {download}: exists and is not a directory", EXIT_INPUT)
    if download:
        try:
            os.makedirs(download, exist_ok=True)
        except OSError as e:
            die(f"--download {download}: {e.strerror or e}", EXIT_INPUT)
    run = _open(run_uri, storage_option)
    # The weights and the extra files a train function saved beside them (a tokenizer, a config).
    only = (lambda r: {MODEL_FILE} | r.extra_files) if weights_only else None
    try:
        found = run.verified_best(rank, into=download or None, only=only if download else None)
    except OSError as e:  # NoCheckpoint (1) and StorageError (4) go to the one handler
        local_error(e, download or "", "--download", run_uri)
    c = found.checkpoint
    out: dict[str, Any] = {**c.as_dict(), "monitor": run.monitor, "mode": run.mode}
    out.update(value=c.metrics.get(run.monitor), verified=True, skipped=found.skipped)
    for s in found.skipped:
        typer.echo(f"warning: {s['id']} failed verification ({s['reason']}); using the next best", err=True)
    if download:
        record_path = os.path.join(download, "checkpoint.json")
        with open(record_path, "w") as ft:
            json.dump(c.record.model_dump(mode="json"), ft, indent=1)
        readable_by_all([record_path])  # 0644, as the files beside it
        out["downloaded_to"] = os.path.abspath(download)
        out["downloaded"] = sorted(os.path.relpath(p, download) for p in found.paths)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    where = f"epoch {c.epoch}, step {c.global_step}"
    typer.echo(f"{c.uri}  {run.monitor} {out['value']:.6g} ({run.mode}), {where}, rank {c.rank} (verified)")
    if download:
        typer.echo(
            f"downloaded (verified) to {out['downloaded_to']}: {', '.join(out['downloaded'])}; load with "
            "torch.load('model.pt', weights_only=True)"
        )


def events(
    run_uri: str = typer.Argument(..., help="Storage root + run name."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    kind: list[str] = typer.Option(None, help=f"Only these kinds (repeatable): {', '.join(EVENT_KINDS)}."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """The run's event log: commits, deletions, restarts, verification failures, retries."""
    unknown = sorted(set(kind or []) - set(EVENT_KINDS))
    if unknown:
        die(f"--kind {', '.join(unknown)}: unknown; kinds are {', '.join(EVENT_KINDS)}", EXIT_INPUT)
    run = _open(run_uri, storage_option)
    for e in run.events(kind or None):
        if as_json:
            typer.echo(json.dumps(e, sort_keys=True))
        else:
            rest = " ".join(
                f"{k}={str(v).splitlines()[0] if str(v) else v}"
                for k, v in e.items()
                if k not in ("ts", "kind", "rid") and not (k == "reason" and "cause" in e)  # --json has it
            )
            ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("ts", 0)))
            typer.echo(f"{ts} {e.get('kind', '?'):<20} {rest}")


def metrics(
    run_uri: str = typer.Argument(..., help="Storage root + run name."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    csv_out: bool = typer.Option(False, "--csv", help="CSV with a header row, for spreadsheets."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """Per-epoch metrics of a run: a table with the best epoch marked and restarts shown."""
    run = _open(run_uri, storage_option)
    rows = run.metrics(as_frame=False)
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, sort_keys=True))
        return
    lead = ("epoch", "global_step", "attempt")
    seen = {k for r in rows for k in r}
    keys = [k for k in lead if k in seen] + sorted(seen - set(lead))
    if csv_out:
        import csv
        import sys

        w = csv.DictWriter(sys.stdout, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        return
    best_epoch = best_of(rows, run.monitor, run.mode)
    metric_keys = [k for k in keys if k not in ("epoch", "global_step", "attempt")]
    typer.echo(f"{'epoch':>5} {'step':>7} {'att':>3}  " + "  ".join(f"{k:>10}" for k in metric_keys))
    attempt = None
    for r in rows:
        if attempt is not None and r.get("attempt") != attempt:
            typer.echo(f"{'':>5} --- attempt {r.get('attempt')} resumed here (a restart or a resume) ---")
        attempt = r.get("attempt")
        vals = "  ".join(
            f"{r[k]:>10.5g}" if isinstance(r.get(k), float) else f"{r.get(k, '-')!s:>10}" for k in metric_keys
        )
        mark = f"  <- best {run.monitor}" if r.get("epoch") == best_epoch else ""
        at = f"{r.get('epoch', '-'):>5} {r.get('global_step', '-'):>7} {r.get('attempt', '-')!s:>3}"
        typer.echo(f"{at}  {vals}{mark}")


def _state(run: Run) -> RunState:
    """run.state(), or the stored status alone when the lease cannot be read (said in detail)."""
    try:
        return run.state()
    except (StorageError, OSError) as e:
        why = f"whether its driver is alive is unknown: {RUN_LEASE} could not be read: {e}"
        return RunState(run.status, run.status, why, None, len(run.manifest.checkpoints))


def runs(
    root: str = typer.Argument(..., help="A storage root: runs, s3://bucket/prefix, ..."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """The runs under a storage root: name, state, epochs, best metric, last update.

    The state is the stored status (running, finished, failed) or what it means now:
    `interrupted` (Ctrl-C/SIGTERM on the driver; resumable) or `stale` (stored running,
    but its driver is gone: its lease is stale or missing); each with the command that
    continues or clears it. --json keeps `status` as stored and adds `state`,
    `state_detail` and `next`."""
    try:
        top = Storage(root, parse_options(storage_option))
        names = top.list_dirs("")
    except (StorageError, OSError) as e:
        die(f"{root}: {e}", EXIT_STORAGE)
    out: list[dict[str, Any]] = []
    for name in names:
        try:
            run = Run(top.child_uri(name), top.options)
        except RunNotFound:
            continue  # not a run
        except (ManifestError, StorageError, OSError) as e:  # a run, but not readable: say so
            why = str(e).splitlines()[0]
            out.append(
                {
                    "name": name,
                    "run_uri": top.child_uri(name),
                    "status": "unreadable",
                    "state": "unreadable",
                    "epochs": 0,
                    "monitor": "",
                    "best": None,
                    "updated": 0.0,
                    "error": why,
                }
            )
            continue
        m, ranked, state = run.manifest, run.ranked(), _state(run)
        last = max((c.epoch for c in run.checkpoints()), default=0)
        out.append(
            {
                "name": name,
                "run_uri": run.uri,
                "status": m.status,
                "state": state.state,
                "state_detail": state.detail,
                "next": state.next,
                "checkpoints": state.checkpoints,
                "epochs": last,
                "monitor": run.monitor,
                "best": ranked[0].metrics.get(run.monitor) if ranked else None,
                "updated": m.updated_at,
            }
        )
    out.sort(key=lambda r: r["updated"], reverse=True)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    _runs_table(root, out)


def _runs_table(root: str, out: list[dict[str, Any]]) -> None:
    if not out:
        typer.echo(f"no runs under {root}")
        return
    typer.echo(f"{'name':<32} {'status':<11} {'epochs':>6} {'best':>22}  updated")
    for r in out:
        b = "-" if r["best"] is None else f"{r['monitor']} {r['best']:.5g}"
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["updated"])) if r["updated"] else "-"
        state = r.get("state", r["status"])
        note = r.get("error") or "; ".join(x for x in (r.get("state_detail"), r.get("next")) if x)
        typer.echo(f"{r['name']:<32} {state:<11} {r['epochs']:>6} {b:>22}  {ts}{'  ' + note if note else ''}")


def register(app: typer.Typer) -> None:
    app.command("checkpoints")(checkpoints)
    app.command("best")(best)
    app.command("events")(events)
    app.command("metrics")(metrics)
    app.command("runs")(runs)

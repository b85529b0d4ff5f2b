"""The `orchestrator` command line.

    orchestrator run configs/digits.yaml                 train; prints progress and the best checkpoint
    orchestrator resume RUN_URI                          continue a run whose driver died
    orchestrator checkpoints RUN_URI [--json]            what is kept, and why
    orchestrator best RUN_URI [--json] [--download DIR]  the best checkpoint, for serving
    orchestrator events RUN_URI [--json]                 commits, deletions, restarts, retries

Exit codes: 0 success, 1 the run failed, 2 bad input (spec, arguments), 3 run owned
by another live driver, 4 storage unreachable or unreadable, 5 Ray's Jobs API unreachable.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import typer

from orchestrator.exits import EXIT_FAILED, EXIT_INPUT, EXIT_LEASE, EXIT_STORAGE, die, parse_options
from orchestrator.lease import LeaseHeld
from orchestrator.manifest import (
    EVENTS,
    METRICS,
    Manifest,
    ManifestError,
    read_jsonl,
    read_manifest,
)
from orchestrator.retention import rank_best
from orchestrator.spec import SpecError, load_spec
from orchestrator.storage import Storage, StorageError, redact, secrets_in

app = typer.Typer(
    help="Fault-tolerant distributed PyTorch training on Ray, with top-k checkpoints "
    "that are never lost or half-read.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SET_HELP = "Override a spec field: --set checkpoint.top_k=5 (repeatable; values are YAML)."
OPT_HELP = "fsspec storage option for RUN_URI: --storage-option endpoint_url=http://... (repeatable)."


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
    if summary.get("error"):
        typer.echo(f"[run] reason: {summary['error']}", err=True)


@contextlib.contextmanager
def _stdout_to_stderr(active: bool) -> Iterator[None]:
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _train(spec: Any, address: str | None, as_json: bool, quiet: bool, resume: bool, verbose: bool) -> None:
    from orchestrator.driver import RunFailed, run

    try:
        with _stdout_to_stderr(as_json):  # Ray prints to fd 1; --json keeps stdout for the JSON
            summary = run(spec, address=address, quiet=quiet or as_json, resume=resume, verbose=verbose)
    except LeaseHeld as e:
        die(str(e), EXIT_LEASE)
    except RunFailed as e:
        if e.summary is not None:
            _print_summary(e.summary.as_dict(), as_json)
        die(f"run {spec.name} failed: {e}", EXIT_FAILED)
    except StorageError as e:
        die(str(e), EXIT_STORAGE)
    except OSError as e:  # before training starts, storage is all that does I/O
        why = redact(f"{type(e).__name__}: {e}", secrets_in(spec.storage.options))
        die(f"storage {spec.run_uri}: {why}", EXIT_STORAGE)
    else:
        _print_summary(summary.as_dict(), as_json)


@app.command()
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


@app.command()
def resume(
    run_uri: str = typer.Argument(..., help="The run to continue: storage root + run name."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP + " E.g. --set epochs=20."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
    address: str = typer.Option(None, help="Ray cluster to join (see `run`)."),
    as_json: bool = typer.Option(False, "--json", help="Print the final summary as JSON."),
    quiet: bool = typer.Option(False, help="No per-epoch progress lines."),
    verbose: bool = typer.Option(False, help="Also stream Ray's and the workers' own logs."),
) -> None:
    """Continue a run from its latest committed checkpoint, with the spec stored in the run."""
    from orchestrator.driver import load_stored_spec
    from orchestrator.spec import apply_overrides, parse_spec

    try:
        spec = load_stored_spec(run_uri, parse_options(storage_option))
        if set_:
            spec = parse_spec(apply_overrides(spec.model_dump(), set_), source=f"{run_uri} --set")
    except SpecError as e:
        die(str(e), EXIT_INPUT)
    except (StorageError, OSError) as e:
        die(f"{run_uri}: {e}", EXIT_STORAGE)
    _train(spec, address, as_json, quiet, resume=True, verbose=verbose)


def _monitor(storage: Storage, manifest: Manifest) -> tuple[str, str]:
    from orchestrator.driver import load_stored_spec

    try:
        spec = load_stored_spec(storage.uri, storage.options)
        return spec.checkpoint.monitor, spec.checkpoint.mode
    except (SpecError, StorageError, OSError):
        return "val_loss", "min"


@app.command()
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


@app.command()
def best(
    run_uri: str = typer.Argument(..., help="Storage root + run name."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    download: str = typer.Option(None, help="Copy the best checkpoint's files (verified) into DIR."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """The best committed checkpoint by the run's monitored metric."""
    from workers.restore import VerificationError, read_verified

    storage, m = _open(run_uri, storage_option)
    monitor, mode = _monitor(storage, m)
    ranked = rank_best([c.view(monitor) for c in m.checkpoints], mode)
    if not ranked:
        die(f"{run_uri}: no committed checkpoint carries {monitor!r}", EXIT_FAILED)
    rec = m.get(ranked[0].id)
    assert rec is not None
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
    }
    if download:
        try:
            blobs = read_verified(storage, rec)
        except (VerificationError, StorageError) as e:
            die(f"{rec.id}: {e}", EXIT_STORAGE)
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
    typer.echo(
        f"{out['uri']}  {monitor} {out['value']:.6g} ({mode}), epoch {rec.epoch}, step {rec.global_step}"
    )
    if download:
        typer.echo(
            f"downloaded (verified) to {out['downloaded_to']}; load with "
            "torch.load('model.pt', weights_only=True)"
        )


@app.command()
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


@app.command()
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


def _register_cluster_commands() -> None:
    from orchestrator import cluster, jobs

    app.add_typer(cluster.app, name="cluster")
    jobs.register(app)


_register_cluster_commands()


def main() -> None:
    app(prog_name="orchestrator")


if __name__ == "__main__":
    main()

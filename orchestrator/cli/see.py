"""Seeing a run: its training and validation curves (`plot`) and a one-page HTML report (`report`).

    orchestrator plot RUN_URI --out curves.png [--metric val_acc]
    orchestrator report RUN_URI --out report.html [--every 30]

The figure is the one model checkpointing is usually explained with: training and validation
loss per epoch with the best epoch marked, plus what this orchestrator adds: where Ray Train
restarted the worker group (and from which epoch the next attempt resumed), and which
checkpoints are kept. `summarize` and `curves_figure` are pure (rows, events and checkpoints
in; no storage), so the report and the tests use them as the commands do. Read-only.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import typer

from orchestrator.api import Checkpoint, Run
from orchestrator.cli.exits import EXIT_FAILED, EXIT_INPUT, EXIT_STORAGE, OPT_HELP, die
from orchestrator.cli.inspect import _open
from orchestrator.core.manifest import SPEC
from orchestrator.core.storage import StorageError
from orchestrator.report.curves import (  # noqa: F401  # re-exported for the tests
    NOT_METRICS,
    TRAIN,
    Restart,
    Summary,
    curves_figure,
    known_metrics,
    restarts_of,
    summarize,
)
from orchestrator.report.page import report_html

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# -- the commands -----------------------------------------------------------

Loaded = tuple[Run, list[dict[str, Any]], list[dict[str, Any]], list[Checkpoint], str]


def _load(run_uri: str, options: list[str] | None, metric: str | None) -> Loaded:
    """The run's rows, events and checkpoints, and the metric to draw; dies with the reason."""
    run = _open(run_uri, options)
    try:
        rows, events, checkpoints = run.metrics(as_frame=False), run.events(), run.checkpoints()
    except (StorageError, OSError) as e:
        die(f"{run_uri}: {e}", EXIT_STORAGE)
    if not rows:
        die(f"{run_uri}: no metrics yet (no epoch has ended): nothing to plot", EXIT_FAILED)
    known = known_metrics(rows)
    if metric and metric not in known:
        die(f"--metric {metric}: not a metric of this run; its metrics are: {', '.join(known)}", EXIT_INPUT)
    chosen = metric or run.monitor
    if chosen not in known:
        why = f"no metrics row has the monitor {chosen!r}; name one with --metric: {', '.join(known)}"
        die(f"{run_uri}: {why}", EXIT_INPUT)
    return run, rows, events, checkpoints, chosen


def _check_out(out: str, formats: Sequence[str] | None = None) -> str:
    """Refuse an --out that cannot be written before reading the run; returns its format."""
    fmt = os.path.splitext(out)[1].lstrip(".").lower()
    if formats is not None and fmt not in formats:
        die(f"--out {out}: name a file ending in one of .{', .'.join(sorted(formats))}", EXIT_INPUT)
    if os.path.isdir(out):
        die(f"--out {out}: is a directory; name a file", EXIT_INPUT)
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):  # created when written
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        die(f"--out {out}: {parent} is not a directory", EXIT_INPUT)
    if not os.access(parent, os.W_OK) or (os.path.exists(out) and not os.access(out, os.W_OK)):
        die(f"--out {out}: not writable", EXIT_INPUT)
    return fmt


def _write(out: str, data: bytes) -> None:
    """out replaced whole (a temp file beside it, renamed): a browser reloading the page of a
    running run (`report --every`) never reads half of it."""
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    except OSError as e:
        die(f"--out {out}: {e.strerror or e}", EXIT_INPUT)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _render(fig: Figure, fmt: str) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    return buf.getvalue()


def _title(run: Run) -> str:
    return f"{run.manifest.run}: training and validation per epoch"


def _done(out: str, s: Summary, as_json: bool, what: str) -> None:
    if as_json:
        typer.echo(json.dumps({"out": os.path.abspath(out), **s.as_dict()}, indent=2))
    else:
        typer.echo(f"wrote {out}  ({s.best_text()}; {what})")


IMAGE_FORMATS = ("png", "svg", "pdf")


def plot(
    run_uri: str = typer.Argument(..., help="Storage root + run name, e.g. runs/digits."),
    out: str = typer.Option(..., "--out", "-o", help="Image to write: .png (or .svg, .pdf)."),
    metric: str = typer.Option(None, help="Validation curve beside train_loss (default: the monitor)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """Training and validation curves per epoch, the best epoch marked, restarts and kept
    checkpoints drawn."""
    fmt = _check_out(out, IMAGE_FORMATS)
    run, rows, events, checkpoints, chosen = _load(run_uri, storage_option, metric)
    fig = curves_figure(rows, events, checkpoints, run.monitor, run.mode, chosen, _title(run))
    _write(out, _render(fig, fmt))
    s = summarize(rows, events, checkpoints, run.monitor, run.mode, chosen)
    _done(out, s, as_json, f"{len(s.restarts)} restart(s), {len(s.kept)} checkpoint(s) kept")


REFRESH_S = 30  # how often the page of a running run reloads itself, without --every


def report(
    run_uri: str = typer.Argument(..., help="Storage root + run name, e.g. runs/digits."),
    out: str = typer.Option(..., "--out", "-o", help="HTML file to write (one self-contained page)."),
    metric: str = typer.Option(None, help="Validation curve in the figure (default: the monitor)."),
    every: int = typer.Option(
        None,
        "--every",
        min=1,
        help="While the run is running, write the page again every N seconds (an open page "
        "reloads itself as often) until the run ends; then write it once more and exit.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """One self-contained HTML page: the run's status, its curves, the kept checkpoints, the
    event timeline and the spec it was started with (no external requests: the figure is
    inline). The page of a running run reloads itself (every 30 s, or --every N)."""
    _check_out(out)
    while True:
        run, rows, events, checkpoints, chosen = _load(run_uri, storage_option, metric)
        live = run.state().state == "running"  # not an orphaned run: nothing more will come
        fig = curves_figure(rows, events, checkpoints, run.monitor, run.mode, chosen, _title(run))
        png, refresh = _render(fig, "png"), (every or REFRESH_S) if live else None
        page = report_html(run, rows, events, checkpoints, chosen, png, _spec_text(run), refresh)
        _write(out, page.encode("utf-8"))
        if not (every and live):
            break
        time.sleep(every)
    s = summarize(rows, events, checkpoints, run.monitor, run.mode, chosen)
    _done(out, s, as_json, f"{len(checkpoints)} checkpoint(s), {len(events)} event(s)")


def _spec_text(run: Run) -> str | None:
    """spec.yaml as the run stored it (secrets redacted when it was stored), or None."""
    try:
        return run.storage.read_bytes(SPEC).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


def register(app: typer.Typer) -> None:
    app.command("plot")(plot)
    app.command("report")(report)

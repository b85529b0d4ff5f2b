"""Seeing a run: its training and validation curves (`plot`) and a one-page HTML report (`report`).

    orchestrator plot RUN_URI --out curves.png [--metric val_acc]
    orchestrator report RUN_URI --out report.html

The figure is the one model checkpointing is usually explained with: training and validation
loss per epoch with the best epoch marked, plus what this orchestrator adds: where Ray Train
restarted the worker group (and from which epoch the next attempt resumed), and which
checkpoints are kept. `summarize` and `curves_figure` are pure (rows, events and checkpoints
in; no storage), so the report and the tests use them as the commands do. Read-only.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import typer

from orchestrator.api import Checkpoint, Run
from orchestrator.cli.exits import EXIT_FAILED, EXIT_INPUT, EXIT_STORAGE, OPT_HELP, die
from orchestrator.cli.inspect import _open
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

if TYPE_CHECKING:
    from matplotlib.figure import Figure


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1d2330; background: #f4f5f7 }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px }
h1 { font-size: 22px; margin: 0 0 4px } h2 { font-size: 16px; margin: 28px 0 8px }
.uri { font-family: ui-monospace, Menlo, Consolas, monospace; color: #555; word-break: break-all }
.facts { display: flex; flex-wrap: wrap; gap: 8px; margin: 12px 0 }
.fact { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: 6px 10px }
.fact b { display: block; font-size: 11px; color: #6b7280; font-weight: 600; text-transform: uppercase }
.best { background: #fff4f2; border-color: #f2b8ad; color: #a3271a; font-weight: 600 }
.status-finished { color: #1a7f37 } .status-failed { color: #b42318 } .status-running { color: #9a6700 }
figure { margin: 0; background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: 8px }
figure img { width: 100%; height: auto; display: block }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid #dde1e7 }
th, td { padding: 5px 8px; border-bottom: 1px solid #eceef2; text-align: left; vertical-align: top }
th { background: #f0f2f5; font-size: 12px }
td.when { white-space: nowrap } td.num { text-align: right; font-variant-numeric: tabular-nums }
tr.is-best td { background: #fff4f2; font-weight: 600 }
code, .mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px }
.kind { font-weight: 600 } .kind-commit { color: #1a7f37 } .kind-delete { color: #6b7280 }
.kind-restart, .kind-run_failed, .kind-verification_failed, .kind-chaos_kill, .kind-stopped { color: #b42318 }
details pre { white-space: pre-wrap; font-size: 11.5px; background: #f6f8fa; padding: 8px;
              border-radius: 4px; margin: 6px 0 0 }
.muted { color: #6b7280 }
"""
# Nothing but the inline style and data: images may load: the page makes no request, and a
# browser reports any attempt as a console error (which the tests look for).
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v: Any) -> str:
    return f"{v:.5g}" if isinstance(v, float) else str(v)


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(ts))


def _tr(cells: Sequence[str], cls: str = "") -> str:
    """A row of already-escaped cells."""
    return (f'<tr class="{cls}">' if cls else "<tr>") + "".join(cells) + "</tr>"


def _td(v: Any, cls: str = "") -> str:
    return (f'<td class="{cls}">' if cls else "<td>") + _e(_fmt(v)) + "</td>"


def _table(tid: str, heads: Sequence[str], rows: Sequence[str], empty: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in heads)
    body = "".join(rows) or f'<tr><td colspan="{len(heads)}" class="muted">{_e(empty)}</td></tr>'
    return f'<table id="{tid}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _event_details(e: dict[str, Any]) -> str:
    """key=value pairs; a long or multi-line value (a traceback) folded under its first line."""
    short, long = [], []
    for k, v in e.items():
        if k in ("ts", "kind", "rid"):
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{kk}={_fmt(vv)}" for kk, vv in v.items())
        elif isinstance(v, list):
            v = ", ".join(_fmt(x) for x in v)
        text = _fmt(v)
        if "\n" in text or len(text) > 160:
            head = text.strip().splitlines()[0][:160] if text.strip() else ""
            long.append(
                f"<details><summary><code>{_e(k)}</code>: {_e(head)}</summary><pre>{_e(text)}</pre></details>"
            )
        else:
            short.append(f"<code>{_e(k)}</code>={_e(text)}")
    return " ".join(short) + "".join(long)


def report_html(
    run: Run,
    rows: list[dict[str, Any]],
    events: list[dict[str, Any]],
    checkpoints: list[Checkpoint],
    metric: str,
    png: bytes,
) -> str:
    """The report page from what was read: one file (the figure inline as a data: URI, the CSS
    inline, no script), every value from the run escaped."""
    m, monitor = run.manifest, run.monitor
    s = summarize(rows, events, checkpoints, monitor, run.mode, metric)
    facts = [
        ("status", f'<span class="status-{_e(m.status)}">{_e(m.status)}</span>'),
        ("monitor", _e(f"{monitor} ({run.mode})")),
        ("epochs reported", _e(max((r.get("epoch", 0) for r in rows), default=0))),
        ("attempts", _e(m.attempts)),
        ("restarts", _e(m.restarts)),
        ("checkpoints kept", _e(len(checkpoints))),
        ("updated", _e(_when(m.updated_at))),
    ]
    fact_divs = [f'<div class="fact best" id="best"><b>best</b>{_e(s.best_text())}</div>']
    fact_divs += [f'<div class="fact"><b>{_e(k)}</b>{v}</div>' for k, v in facts]

    mkeys = list(dict.fromkeys([monitor, *(k for c in checkpoints for k in c.metrics)]))
    ck_rows = [
        _tr(
            [_td(c.id, "mono"), _td(c.epoch, "num"), _td(c.global_step, "num")]
            + [
                _td(_fmt(c.metrics[k]) + ("" if c.metrics_fresh else "*"), "num")
                if k in c.metrics
                else _td("-", "num")
                for k in mkeys
            ]
            + [_td("-" if c.rank is None else c.rank, "num"), _td(", ".join(c.kept_because) or "-")],
            "is-best" if c.rank == 1 else "",
        )  # fmt: skip
        for c in checkpoints
    ]
    ck_heads = ["id", "epoch", "step", *mkeys, f"rank by {monitor}", "kept because"]
    ev_rows = [
        _tr(
            [
                _td(_when(e.get("ts")), "mono when"),
                _td(e.get("kind", "?"), "kind kind-" + re.sub(r"[^a-z_]", "", str(e.get("kind", "")))),
                f"<td>{_event_details(e)}</td>",
            ]
        )  # fmt: skip
        for e in events
    ]
    mcols = ["epoch", "global_step", "attempt", *known_metrics(rows)]
    m_rows = [
        _tr([_td(r.get(k, "-"), "num") for k in mcols], "is-best" if r.get("epoch") == s.best_epoch else "")
        for r in rows
    ]
    restarts = [
        f"<li>restart {_e(r.number)} at {_e(_when(r.ts))}: <b>{_e(r.label)}</b>, resumed from epoch "
        f"{_e(r.epoch)} <span class='muted'>({_e(r.reason[:300])})</span></li>"
        for r in s.restarts
    ]
    bad = [f"<li><code>{_e(b.record.id)}</code>: {_e(b.reason)}</li>" for b in m.bad]
    alt = f"{TRAIN} and {metric} per epoch; {s.best_text()}"
    img = base64.b64encode(png).decode("ascii")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(m.run)}: run report</title>",
        f"<style>{_CSS}</style></head>",
        "<body><main>",
        f"<h1>{_e(m.run)}</h1>",
        f'<div class="uri">{_e(run.uri)}</div>',
        f'<div class="facts">{"".join(fact_divs)}</div>',
        f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{img}"></figure>',
        f"<h2>Restarts</h2><ul>{''.join(restarts)}</ul>" if restarts else "",
        "<h2>Checkpoints kept</h2>",
        _table("checkpoints", ck_heads, ck_rows, "no committed checkpoint"),
        "<p class='muted'>* mid-epoch checkpoint: metric carried from the last evaluation, not ranked</p>"
        if any(not c.metrics_fresh for c in checkpoints)
        else "",
        f"<h2>Bad checkpoints</h2><ul>{''.join(bad)}</ul>" if bad else "",
        "<h2>Events</h2>",
        _table("events", ["time", "kind", "details"], ev_rows, "no events"),
        "<h2>Metrics per epoch</h2>",
        f"<details><summary>{_e(len(rows))} row(s)</summary>",
        _table("metrics", ["epoch", "step", "attempt", *mcols[3:]], m_rows, "no metrics"),
        "</details>",
        f'<p class="muted">orchestrator report, {_e(_when(time.time()))}</p>',
        "</main></body></html>",
        "",
    ]
    return "\n".join(p for p in parts if p)


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
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "wb") as f:
            f.write(data)
    except OSError as e:
        die(f"--out {out}: {e.strerror or e}", EXIT_INPUT)


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


def report(
    run_uri: str = typer.Argument(..., help="Storage root + run name, e.g. runs/digits."),
    out: str = typer.Option(..., "--out", "-o", help="HTML file to write (one self-contained page)."),
    metric: str = typer.Option(None, help="Validation curve in the figure (default: the monitor)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """One self-contained HTML page: the run's status, its curves, the kept checkpoints and the
    event timeline (no external requests: the figure is inline)."""
    _check_out(out)
    run, rows, events, checkpoints, chosen = _load(run_uri, storage_option, metric)
    fig = curves_figure(rows, events, checkpoints, run.monitor, run.mode, chosen, _title(run))
    page = report_html(run, rows, events, checkpoints, chosen, _render(fig, "png"))
    _write(out, page.encode("utf-8"))
    s = summarize(rows, events, checkpoints, run.monitor, run.mode, chosen)
    _done(out, s, as_json, f"{len(checkpoints)} checkpoint(s), {len(events)} event(s)")


def register(app: typer.Typer) -> None:
    app.command("plot")(plot)
    app.command("report")(report)

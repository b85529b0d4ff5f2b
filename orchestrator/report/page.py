"""The one-page HTML report (`orchestrator report`): a Jinja2 template with autoescaping
(templates/report.html.j2), filled from what was read. One file: the figure inline as a
data: URI, the CSS inline, no script, and a Content-Security-Policy that lets nothing load.
Every value from the run reaches the page through the template's escaping."""

from __future__ import annotations

import base64
import re
import time
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from orchestrator.report.curves import TRAIN, known_metrics, summarize
from orchestrator.tracking import off_line

if TYPE_CHECKING:
    import jinja2

    from orchestrator.api import Checkpoint, Run

# Nothing but the inline style and data: images may load: the page makes no request, and a
# browser reports any attempt as a console error (which the tests look for).
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@cache
def _template() -> jinja2.Template:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("orchestrator.report", "templates"),
        autoescape=True,  # every value is escaped unless the template says |safe (the CSS only)
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("report.html.j2")


def fmt(v: Any) -> str:
    return f"{v:.5g}" if isinstance(v, float) else str(v)


def when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(ts))


def event_view(e: dict[str, Any]) -> dict[str, Any]:
    """An event's key=value pairs; a long or multi-line value (a traceback) folded under its
    first line."""
    short, long = [], []
    for k, v in e.items():
        if k in ("ts", "kind", "rid"):
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{kk}={fmt(vv)}" for kk, vv in v.items())
        elif isinstance(v, list):
            v = ", ".join(fmt(x) for x in v)
        text = fmt(v)
        if "\n" in text or len(text) > 160:
            long.append((k, text.strip().splitlines()[0][:160] if text.strip() else "", text))
        else:
            short.append((k, text))
    kind = str(e.get("kind", "?"))
    return {
        "when": when(e.get("ts")),
        "kind": kind,
        "kind_class": re.sub(r"[^a-z_]", "", kind),
        "short": short,
        "long": long,
    }


def _checkpoint_rows(checkpoints: list[Checkpoint], keys: list[str]) -> list[dict[str, Any]]:
    rows = []
    for c in checkpoints:
        star = "" if c.metrics_fresh else "*"  # a mid-epoch checkpoint's metrics are carried
        values = [(fmt(c.metrics[k]) + star if k in c.metrics else "-", "num") for k in keys]
        rank = "-" if c.rank is None else fmt(c.rank)
        cells = [
            (c.id, "mono"),
            (fmt(c.epoch), "num"),
            (fmt(c.global_step), "num"),
            *values,
            (rank, "num"),
            (", ".join(c.kept_because) or "-", ""),
        ]
        rows.append({"cls": "is-best" if c.rank == 1 else "", "cells": cells})
    return rows


def _trackers_off(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """A `trackers off` fact when a tracker was switched off: which, when, why."""
    said = []
    for e in events:
        if e.get("kind") == "tracker_off":
            when, error, _fix = off_line(e)
            said.append(f"{e.get('tracker')} ({when}: {error})")
    return [("trackers off", "; ".join(said))] if said else []


def report_html(
    run: Run,
    rows: list[dict[str, Any]],
    events: list[dict[str, Any]],
    checkpoints: list[Checkpoint],
    metric: str,
    png: bytes,
    spec: str | None = None,
    refresh_s: int | None = None,
) -> str:
    """The report page from what was read: spec is the stored spec.yaml's text (None: none
    stored); refresh_s, for a running run, makes the page reload itself that often."""
    m, monitor = run.manifest, run.monitor
    s = summarize(rows, events, checkpoints, monitor, run.mode, metric)
    mkeys = list(dict.fromkeys([monitor, *(k for c in checkpoints for k in c.metrics)]))
    mcols = ["epoch", "global_step", "attempt", *known_metrics(rows)]
    return (
        _template()
        .render(
            csp=CSP,
            css=resources.files("orchestrator.report").joinpath("templates/report.css").read_text(),
            run=m.run,
            uri=run.uri,
            best=s.best_text(),
            facts=[
                ("status", m.status),
                ("monitor", f"{monitor} ({run.mode})"),
                ("epochs reported", max((r.get("epoch", 0) for r in rows), default=0)),
                ("attempts", m.attempts),
                ("restarts", m.restarts),
                ("checkpoints kept", len(checkpoints)),
                ("updated", when(m.updated_at)),
                *_trackers_off(events),
            ],
            alt=f"{TRAIN} and {metric} per epoch; {s.best_text()}",
            png=base64.b64encode(png).decode("ascii"),
            restarts=[
                {
                    "number": r.number,
                    "when": when(r.ts),
                    "label": r.label,
                    "epoch": r.epoch,
                    "reason": r.reason[:300],
                }
                for r in s.restarts
            ],
            checkpoint_heads=["id", "epoch", "step", *mkeys, f"rank by {monitor}", "kept because"],
            checkpoints=_checkpoint_rows(checkpoints, mkeys),
            any_stale=any(not c.metrics_fresh for c in checkpoints),
            bad=[{"id": b.record.id, "reason": b.reason} for b in m.bad],
            events=[event_view(e) for e in events],
            metric_heads=["epoch", "step", "attempt", *mcols[3:]],
            metric_rows=[
                {
                    "cls": "is-best" if r.get("epoch") == s.best_epoch else "",
                    "cells": [(fmt(r.get(k, "-")), "num") for k in mcols],
                }
                for r in rows
            ],
            now=when(time.time()),
            spec=spec,
            refresh_s=refresh_s,
        )
        .lstrip()
    )  # the macro's definition leaves a line before the doctype

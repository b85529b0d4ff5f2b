"""What the driver shows while a run trains, from the coordinator's progress.

On a terminal: a live display (rich) with the epoch, the step within it, throughput, the
ETA, the best so far and, after a restart, which checkpoint the run resumed from. Not on a
terminal (logs, CI, a Ray job): one plain line per epoch and per restart. A tracker switched
off is a warning on stderr, once, even when quiet (--json).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from orchestrator.core import console
from orchestrator.tracking import off_line

log = logging.getLogger(__name__)


class ProgressView:
    """Polls the coordinator's progress once a second and renders it."""

    def __init__(
        self,
        poll: Callable[[int], dict[str, Any]],
        epochs: int,
        monitor: str,
        mode: str,
        quiet: bool = False,
        out: TextIO | None = None,
        live: bool | None = None,
        replicas: bool = False,
    ) -> None:
        self._poll, self.epochs, self.monitor, self.quiet = poll, epochs, monitor, quiet
        self.replicas = replicas  # failure.mode replicas: Ray Train replaces the failed worker alone
        self.sign = 1 if mode == "min" else -1
        self.out = out or sys.stdout
        self.live = self.out.isatty() if live is None else live
        self._stop = threading.Event()
        self._next = 0
        self._best: tuple[float, int] | None = None  # best monitored value reported so far
        self._restarts = 0
        self._attempts = 0
        self._cadence: float | None = None  # the time of the every_n_steps: auto choice last shown
        self._notes = 0  # the coordinator's notes (restarts, attempts) already shown
        self._trackers_said: set[tuple[Any, Any]] = set()  # (tracker, ts) of tracker_off events warned of
        self._seeded = False
        self._rate: tuple[float, int] | None = None  # (time, global step) of the first sample
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._display: Any = None

    def __enter__(self) -> ProgressView:
        if self.live and not self.quiet:
            from rich.console import Console
            from rich.live import Live

            self._display = Live(console=Console(file=self.out), refresh_per_second=2, transient=False)
            self._display.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.update()  # the last rows; the coordinator may be gone, which the driver reports
        except Exception:
            pass
        finally:
            if self._display is not None:
                self._display.stop()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.update()
            except Exception:  # the coordinator may be restarting; the next poll catches up
                pass

    def update(self) -> None:
        since = self._next
        p = self._poll(since)
        if p["next"] < since:  # the coordinator restarted: its report count began again
            since, p = 0, self._poll(0)
            self._notes = 0
        self._next = p["next"]
        self._say_trackers_off(p.get("trackers_off") or [])
        if self.quiet:
            return
        if self._best is None and not self._seeded:  # a resumed run: the best committed before it
            self._seeded = True
            start = p.get("best_at_start")
            v = (start or {}).get("metrics", {}).get(self.monitor)
            if isinstance(v, float) and math.isfinite(v):
                self._best = (v, start["epoch"])  # type: ignore[index]
        lines = [self._epoch_line(m) if kind == "row" else m for _, _, kind, m in self._story(p, since)]
        if (c := p.get("cadence")) and c.get("ts") != self._cadence:  # every_n_steps: auto chose anew
            self._cadence = c.get("ts")
            lines.append(f"[run] checkpoint every {c['every_n_steps']} steps: {c.get('why', '')}")
        for line in lines:
            if self._display is not None:
                self._display.console.print(line, highlight=False, markup=False)
            else:
                console.write_line(line, self.out)
        if self._display is not None:
            self._display.update(self._status(p.get("live")))

    def _say_trackers_off(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            if (key := (e.get("tracker"), e.get("ts"))) not in self._trackers_said:
                self._trackers_said.add(key)
                when, error, then = off_line(e)
                log.warning(f"[run] warning: tracker {e.get('tracker')} switched off {when}: {error}{then}")

    def _story(self, p: dict[str, Any], since: int) -> list[tuple[int, int, str, Any]]:
        """This poll's rows, restarts and attempts, in the order they happened: each note says
        how many reports came before it (`at`), so epoch 4's row, reported before the kill in
        epoch 5, comes before the restart even when one poll brings both."""
        items: list[tuple[int, int, str, Any]] = [(since + i, 1, "row", m) for i, m in enumerate(p["new"])]
        notes = p.get("notes")
        if notes is None:  # a coordinator without notes: the counters alone, placed after the rows
            notes = self._notes_from_counters(p)
        elif len(notes) < self._notes:
            self._notes = 0  # a restarted coordinator's notes began again
        for note in notes[self._notes :]:
            at = max(int(note.get("at", 0)), since)
            if note["kind"] == "restart":
                self._restarts = max(self._restarts, int(note["restarts"]))
                # alone: the coordinator's word; a note without it (counters only): not the driver's fallback
                alone = self.replicas and bool(note.get("alone", not note.get("whole")))
                what = "a failed worker replaced alone" if alone else "worker group restarted"
                cause = f": {note['cause']}" if note.get("cause") else ""
                items.append((at, 0, "line", f"[run] {what} ({note['restarts']} so far){cause}"))
            elif note["kind"] == "writer":  # failure.mode replicas: a survivor took the writer's place
                self._attempts = max(self._attempts, int(note["attempt"]))
                line = (
                    f"[run] rank {note['rank']} took over writing the checkpoints (attempt {note['attempt']})"
                )
                items.append((at, 0, "line", f"{line}: the writer left the quorum; training goes on"))
            elif note["kind"] == "attempt":
                self._attempts = max(self._attempts, int(note["attempt"]))
                if note["attempt"] > 1:
                    where = note.get("resumed_from") or "the start (nothing committed yet)"
                    items.append((at, 0, "line", f"[run] attempt {note['attempt']} resumed from {where}"))
        self._notes = len(notes)
        return sorted(items, key=lambda item: item[:2])  # stable: notes keep their order

    def _notes_from_counters(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        """Notes from the counters alone: placed before the first row of the current attempt."""
        notes: list[dict[str, Any]] = []
        current = [i for i, m in enumerate(p["new"]) if m.get("attempt", p["attempts"]) >= p["attempts"]]
        at = p["next"] - len(p["new"]) + (current[0] if current else len(p["new"]))
        if p["restarts"] > self._restarts:
            notes.append({"kind": "restart", "at": at, "restarts": p["restarts"]})
        if p["attempts"] > self._attempts:
            notes.append(
                {"kind": "attempt", "at": at, "attempt": p["attempts"], "resumed_from": p.get("resumed_from")}
            )
        self._notes = 0
        return notes

    def _epoch_line(self, m: dict[str, Any]) -> str:
        v = m.get(self.monitor)
        if (
            isinstance(v, float)
            and math.isfinite(v)
            and (self._best is None or self.sign * v < self.sign * self._best[0])
        ):
            self._best = (v, m["epoch"])
        vals = "  ".join(f"{k} {v:.4f}" for k, v in m.items() if k not in ("epoch", "global_step", "attempt"))
        best = f"  best {self.monitor} {self._best[0]:.4f} (epoch {self._best[1]})" if self._best else ""
        return f"[run] epoch {m['epoch']}/{self.epochs}  {vals}{best}"

    def _status(self, live: dict[str, Any] | None) -> Any:
        """The live line: epoch, step in epoch, steps/s, ETA, best so far."""
        from rich.text import Text

        if not live:
            return Text("[run] starting workers ...", style="dim")
        now, step = live["ts"], live["global_step"]
        if self._rate is None or step < self._rate[1]:
            self._rate = (now, step)
        dt, ds = now - self._rate[0], step - self._rate[1]
        rate = ds / dt if dt > 0 and ds > 0 else None
        left = (self.epochs - live["epoch"]) * live["steps"] + (live["steps"] - live["step"])
        eta = f"ETA {_clock(left / rate)}" if rate else "ETA -"
        best = f"best {self.monitor} {self._best[0]:.4f} (epoch {self._best[1]})" if self._best else ""
        bar = _bar(live["step"] / max(live["steps"], 1))
        return Text(
            f"epoch {live['epoch']}/{self.epochs} {bar} step {live['step']}/{live['steps']}  "
            f"{rate or 0:.1f} steps/s  {eta}  {best}"
        )


def all_nan_warning(monitor: str, rows: list[dict[str, Any]], stop_on_nan: bool) -> str | None:
    """The warning for the end of a run in which the monitored metric was never a number:
    every value of it reported (metrics.jsonl's rows) NaN or inf, so no checkpoint was ranked
    and no best can be served. None when any value is finite, or none was reported."""
    values = [r[monitor] for r in rows if isinstance(r.get(monitor), (int, float))]
    if not values or any(math.isfinite(v) for v in values):
        return None
    what = "NaN" if all(math.isnan(v) for v in values) else "NaN or inf"
    head = (
        f"[run] warning: every {monitor} this run reported ({len(values)} value(s)) was {what}: "
        "no checkpoint could be ranked best"
    )
    if stop_on_nan:
        return f"{head}; lower the learning rate (or fix the data), then run again"
    return (
        f"{head}; set checkpoint.stop_on_nan: true (--set checkpoint.stop_on_nan=true) to stop a run "
        "at its first NaN/inf metric instead of training on, and lower the learning rate (or fix the data)"
    )


def _bar(fraction: float, width: int = 20) -> str:
    n = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * n + "." * (width - n) + "]"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

"""What a run looks like: the summary (best epoch, restarts, kept checkpoints) and the curves
figure, pure (rows, events and checkpoints in; no storage, no CLI). `orchestrator plot` and
`report` (orchestrator/cli/see.py) and the MLflow artifact (orchestrator/tracking.py) draw the
same figure from here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.api import Checkpoint

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NOT_METRICS = ("epoch", "global_step", "attempt")
TRAIN = "train_loss"


@dataclass(frozen=True)
class Restart:
    """One worker-group restart: drawn at the epoch the next attempt resumed from."""

    number: int
    epoch: int  # 0: the next attempt started over (no checkpoint yet)
    label: str  # short: the exception class, e.g. WorkerGroupError
    reason: str  # the first line of Ray Train's reason
    ts: float | None


@dataclass(frozen=True)
class Summary:
    """What the figure and the report show, computed from the run's rows, events and checkpoints."""

    metric: str
    monitor: str
    mode: str
    best_epoch: int | None
    best_value: float | None
    restarts: list[Restart] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)  # {id, epoch, x, end_of_epoch}

    def best_text(self) -> str:
        if self.best_epoch is None:
            return f"no epoch with a finite {self.monitor} yet"
        return f"best epoch {self.best_epoch}: {self.monitor} {self.best_value:.4g}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def known_metrics(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The numeric columns of the metrics rows, in first-seen order."""
    keys = dict.fromkeys(k for r in rows for k in r if k not in NOT_METRICS)
    return [
        k
        for k in keys
        if any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows)
    ]


def _short_cause(reason: str) -> str:
    """`WorkerGroupError: Training failed ...` -> `WorkerGroupError`; else the first words."""
    first = (reason or "").strip().splitlines()[0] if (reason or "").strip() else "unknown cause"
    m = re.match(r"([A-Za-z_][\w.]*(?:Error|Exception|Failure|Interrupt|Exit|Died|Lost))\b", first)
    m = m or re.match(r"((?:[a-z_]\w*\.)*[A-Z]\w*):\s", first)  # `pkg.mod.SomeClass: message`
    if m:
        return m.group(1).rsplit(".", 1)[-1]
    return first if len(first) <= 40 else first[:39] + "…"


def restarts_of(events: Sequence[dict[str, Any]]) -> list[Restart]:
    """Each `restart` event, placed at the restore_epoch of the attempt that followed it. Without
    a following attempt (the run ended there), at the last epoch committed before it. A chaos
    kill since the previous restart is named in the label: it is the real cause."""
    out: list[Restart] = []
    since = 0  # index of the first event after the previous restart
    for i, e in enumerate(events):
        if e.get("kind") != "restart":
            continue
        nxt = next((x for x in events[i + 1 :] if x.get("kind") == "attempt_started"), None)
        if nxt is not None:
            epoch = int(nxt.get("restore_epoch") or 0)
        else:
            commits = [x.get("epoch") for x in events[:i] if x.get("kind") == "commit"]
            epoch = max((c for c in commits if isinstance(c, int)), default=0)
        reason = str(e.get("reason") or "").strip()
        label = _short_cause(reason)
        if any(x.get("kind") == "chaos_kill" for x in events[since:i]):
            label += " (chaos kill)"
        first = reason.splitlines()[0] if reason else ""
        out.append(Restart(int(e.get("restarts") or len(out) + 1), epoch, label, first, e.get("ts")))
        since = i + 1
    return out


def _steps_per_epoch(rows: Sequence[dict[str, Any]], epoch: int) -> int | None:
    steps = {r.get("epoch"): r.get("global_step") for r in rows}
    now, before = steps.get(epoch), steps.get(epoch - 1, 0 if epoch == 1 else None)
    if isinstance(now, int) and isinstance(before, int) and now > before:
        return now - before
    return None


def summarize(
    rows: Sequence[dict[str, Any]],
    events: Sequence[dict[str, Any]],
    checkpoints: Sequence[Checkpoint],
    monitor: str,
    mode: str,
    metric: str | None = None,
) -> Summary:
    """Best epoch (by monitor and mode; ties go to the newer epoch), restarts, kept checkpoints."""
    rows = list(rows)
    best = best_epoch(rows, monitor, mode)
    value = next((r[monitor] for r in rows if r.get("epoch") == best), None) if best is not None else None
    kept = []
    for c in checkpoints:
        x = float(c.epoch)
        if not c.end_of_epoch:  # mid-epoch: between the epoch before and this one
            spe = _steps_per_epoch(rows, c.epoch)
            frac = c.record.step_in_epoch / spe if spe else 0.5
            x = c.epoch - 1 + min(max(frac, 0.0), 1.0)
        kept.append({"id": c.id, "epoch": c.epoch, "x": x, "end_of_epoch": c.end_of_epoch})
    return Summary(metric or monitor, monitor, mode, best, value, restarts_of(events), kept)


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(r.get("epoch"), int) and isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["epoch"])
            ys.append(float(v))
    return xs, ys


def _is_loss(name: str) -> bool:
    return "loss" in name.lower()


@dataclass
class _Axes:
    """What the draw functions share: the axes, the metric's axis (the same one for a loss),
    the series drawn and the metric's value per epoch."""

    ax: Any
    vax: Any
    tx: list[Any]
    ty: list[float]
    mx: list[Any]
    by_epoch: dict[Any, float]


def curves_figure(
    rows: Sequence[dict[str, Any]],
    events: Sequence[dict[str, Any]],
    checkpoints: Sequence[Checkpoint],
    monitor: str,
    mode: str,
    metric: str | None = None,
    title: str | None = None,
) -> Figure:
    """Training and validation curves per epoch: train_loss and `metric` (default: the monitor;
    one that is not a loss gets its own y axis on the right), the best epoch by the monitor
    marked and labelled, restarts as vertical lines labelled with their cause, kept checkpoints
    ringed. Pure: draws on a new Agg-backed Figure (pyplot's global state is not touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metric = metric or monitor
    s = summarize(rows, events, checkpoints, monitor, mode, metric)
    fig = Figure(figsize=(9.6, 5.4), dpi=110, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    axes = _draw_curves(ax, rows, metric, s)
    _draw_kept(axes, s)
    restart_texts = _draw_restarts(ax, s)
    if s.best_epoch is not None:
        _draw_best(axes, canvas.get_renderer(), s, monitor, mode, metric, restart_texts)

    handles, labels = ax.get_legend_handles_labels()
    if axes.vax is not ax:
        h2, l2 = axes.vax.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    fig.legend(
        handles, labels, loc="outside lower center", ncols=min(len(handles), 3), fontsize=8.5, frameon=False
    )
    what = f"{TRAIN} and {metric}" if metric != TRAIN else TRAIN
    fig.suptitle(title or f"{what} per epoch", fontsize=12.5, fontweight="bold")
    ax.set_title(
        f"{what}; best by {monitor} ({mode}); {len(s.restarts)} restart(s), {len(s.kept)} checkpoint(s) kept",
        fontsize=9,
        color="0.3",
    )
    return fig


def _draw_curves(ax: Any, rows: Sequence[dict[str, Any]], metric: str, s: Summary) -> _Axes:
    """The training loss and the metric (on its own right-hand axis unless it is a loss); a
    loss falling by decades in log scale; every epoch, restart and kept checkpoint in view."""
    tx, ty = _series(rows, TRAIN)
    mx, my = _series(rows, metric)
    if mx or tx:
        lo = min(mx + tx + [r.epoch for r in s.restarts])
        hi = max(mx + tx + [k["x"] for k in s.kept])
        ax.set_xlim(lo - 0.5, hi + 0.5)
    loss_axis_values = (ty if metric != TRAIN else []) + (my if _is_loss(metric) else [])
    if metric != TRAIN and tx:
        ax.plot(tx, ty, "o-", color="C0", ms=4, lw=2, label=f"training loss ({TRAIN})")
    if _is_loss(metric):
        lbl = (
            "training loss" if metric == TRAIN else "validation loss" if metric.startswith("val") else metric
        )
        ax.plot(mx, my, "o-", color="C0" if metric == TRAIN else "C1", ms=4, lw=2, label=f"{lbl} ({metric})")
        vax = ax
    else:
        vax = ax.twinx()
        vax.plot(mx, my, "s-", color="C2", ms=4, lw=2, label=metric)
        vax.set_ylabel(metric, color="C2")
        vax.tick_params(axis="y", colors="C2")
    ax.set_ylabel("loss" if loss_axis_values else "")
    pos = [v for v in loss_axis_values if math.isfinite(v)]
    if pos and min(pos) > 0 and max(pos) / min(pos) > 20:
        ax.set_yscale("log")
        ax.set_ylabel("loss (log scale)")
    return _Axes(ax, vax, tx, ty, mx, dict(zip(mx, my, strict=False)))


def _draw_kept(a: _Axes, s: Summary) -> None:
    """Kept checkpoints: ringed on the metric's curve (mid-epoch ones on the x axis)."""
    ends = [k for k in s.kept if k["end_of_epoch"] and k["epoch"] in a.by_epoch]
    on_curve = [(k["x"], a.by_epoch[k["epoch"]]) for k in ends]
    if on_curve:
        a.vax.plot(
            *zip(*on_curve, strict=True), "o", ms=13, mfc="none", mec="0.2", mew=1.5, label="kept checkpoint"
        )
    off_curve = [k["x"] for k in s.kept if not (k["end_of_epoch"] and k["epoch"] in a.by_epoch)]
    if off_curve:
        a.ax.plot(
            off_curve,
            [0.0] * len(off_curve),
            "^",
            ms=9,
            color="0.2",
            clip_on=False,
            transform=a.ax.get_xaxis_transform(),
            label="kept checkpoint (mid-epoch)",
        )


def _draw_restarts(ax: Any, s: Summary) -> list[Any]:
    """Restarts: where the next attempt resumed, labelled with the cause; returns the labels."""
    from matplotlib.patheffects import withStroke

    halo = [withStroke(linewidth=3, foreground="white")]  # legible where a curve crosses the words
    texts = []
    for r in s.restarts:
        ax.axvline(r.epoch, color="0.35", ls="--", lw=1.2)
        texts.append(
            ax.annotate(
                f"restart {r.number}: {r.label}",
                xy=(r.epoch, 0.98),
                xycoords=("data", "axes fraction"),
                xytext=(-4, 0),
                textcoords="offset points",
                rotation=90,
                ha="right",
                va="top",
                fontsize=8.5,
                color="0.2",
                path_effects=halo,
            )
        )
    if s.restarts:
        ax.plot([], [], "--", color="0.35", lw=1.2, label="restart (the next attempt resumed from here)")
    return texts


def _draw_best(
    a: _Axes, renderer: Any, s: Summary, monitor: str, mode: str, metric: str, restart_texts: list[Any]
) -> None:
    """The best epoch: a vertical line, a star on the monitor's curve (or, when the monitor is
    not drawn, on the metric's), and the words next to it."""
    ax, best = a.ax, s.best_epoch
    ax.axvline(best, color="C3", ls=":", lw=1.5)
    if monitor == TRAIN and metric != TRAIN:
        star_ax, star_y, star_loss = ax, dict(zip(a.tx, a.ty, strict=False)).get(best), True
    else:
        star_ax, star_y, star_loss = a.vax, a.by_epoch.get(best), _is_loss(metric)
    if star_y is not None:
        star_ax.plot(
            [best],
            [star_y],
            "*",
            color="C3",
            ms=18,
            mec="white",
            zorder=5,
            label=f"best epoch by {monitor} ({mode})",
        )
    # the words beside the line, where curves seldom are: at the top for a loss, at the
    # bottom for a metric that rises, midway between a falling loss and a rising metric;
    # on the side facing the middle, unless a restart's words or the frame are in the way
    y, va = (0.5, "center") if a.vax is not ax else (0.97, "top") if star_loss else (0.03, "bottom")
    xs = a.mx + a.tx
    right_first = bool(xs) and best > (min(xs) + max(xs)) / 2
    frame = ax.get_window_extent(renderer)

    def words(right: bool) -> Any:
        return ax.annotate(
            s.best_text(),
            xy=(best, y),
            xycoords=("data", "axes fraction"),
            xytext=(-7 if right else 7, 0),
            textcoords="offset points",
            ha="right" if right else "left",
            va=va,
            color="C3",
            fontsize=9.5,
            fontweight="bold",
            zorder=6,
            bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "C3", "alpha": 0.9},
        )

    def clear(text: Any) -> bool:
        box = text.get_window_extent(renderer)
        inside = frame.x0 <= box.x0 and box.x1 <= frame.x1
        return inside and not any(box.overlaps(t.get_window_extent(renderer)) for t in restart_texts)

    for right in (right_first, not right_first):
        if clear(text := words(right)):
            return
        text.remove()
    words(right_first)  # neither side is clear: the side facing the middle


# -- the report page -------------------------------------------------------


def best_epoch(rows: Sequence[dict[str, Any]], monitor: str, mode: str) -> int | None:
    """The epoch with the best finite value of the monitor (ties: the newer), or None."""
    sign = 1.0 if mode == "min" else -1.0
    ranked = [r for r in rows if isinstance(r.get(monitor), (int, float)) and math.isfinite(r[monitor])]
    return min(ranked, key=lambda r: (sign * r[monitor], -r["epoch"]))["epoch"] if ranked else None

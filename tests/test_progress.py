"""The driver's progress view: plain lines off a terminal, a live line on one (rendering logic
only, fed the coordinator's progress payloads)."""

from __future__ import annotations

import io

from orchestrator.progress import ProgressView, all_nan_warning


def payloads():
    """What coordinator.progress returns over a run with one restart."""
    base = {"restarts": 0, "attempts": 1, "resumed_from": None, "live": None, "new": [], "next": 0}
    row = lambda e, v: {"epoch": e, "global_step": 10 * e, "attempt": 1, "val_loss": v}  # noqa: E731
    yield {**base, "live": {"epoch": 1, "step": 5, "steps": 10, "global_step": 5, "ts": 100.0}}
    yield {
        **base,
        "new": [row(1, 0.5)],
        "next": 1,
        "live": {"epoch": 2, "step": 5, "steps": 10, "global_step": 15, "ts": 102.0},
    }
    yield {**base, "next": 1, "restarts": 1}
    yield {
        **base,
        "next": 2,
        "restarts": 1,
        "attempts": 2,
        "resumed_from": "epoch0001-step0000010-a1",
        "new": [row(2, float("nan"))],
        "live": {"epoch": 3, "step": 10, "steps": 10, "global_step": 30, "ts": 106.0},
    }


def run_view(live: bool, replicas: bool = False) -> str:
    out = io.StringIO()
    feed = payloads()
    view = ProgressView(
        lambda since: next(feed),
        epochs=3,
        monitor="val_loss",
        mode="min",
        out=out,
        live=live,
        replicas=replicas,
    )
    view._stop.set()  # drive it by hand, not from its thread
    if live:
        from rich.console import Console
        from rich.live import Live

        view._display = Live(console=Console(file=out, force_terminal=True, width=120), auto_refresh=False)
        view._display.start()
    for _ in range(4):
        view.update()
        if view._display is not None:
            view._display.refresh()
    if view._display is not None:
        view._display.stop()
    return out.getvalue()


def test_plain_lines_when_not_a_terminal():
    text = run_view(live=False)
    lines = [line for line in text.splitlines() if line]
    assert lines[0] == "[run] epoch 1/3  val_loss 0.5000  best val_loss 0.5000 (epoch 1)"
    assert "[run] worker group restarted (1 so far)" in lines
    assert "[run] attempt 2 resumed from epoch0001-step0000010-a1" in lines
    nan_line = next(line for line in lines if line.startswith("[run] epoch 2/3"))
    assert "val_loss nan" in nan_line and "best val_loss 0.5000 (epoch 1)" in nan_line  # NaN is never best
    assert "steps/s" not in text


def test_with_replicas_a_restart_is_a_worker_replaced_alone():
    lines = run_view(live=False, replicas=True).splitlines()
    assert "[run] a failed worker replaced alone (1 so far)" in lines
    assert not any("worker group restarted" in line for line in lines)


def test_with_replicas_the_drivers_whole_group_restart_is_a_group_restart():
    restart = {"kind": "restart", "at": 0, "restarts": 1, "cause": "rank 1 died", "alone": True}
    base = {"restarts": 3, "attempts": 2, "resumed_from": None, "live": None, "new": [], "next": 0}
    notes = [
        restart,
        {**restart, "restarts": 2, "cause": "gave up", "whole": True, "alone": False},
        {**restart, "restarts": 3, "cause": "all died", "alone": False},  # Ray Train restarted them all
    ]
    out = io.StringIO()
    feed = iter([{**base, "notes": notes}])
    view = ProgressView(lambda since: next(feed), 3, "val_loss", "min", out=out, live=False, replicas=True)
    view.update()
    assert out.getvalue().splitlines() == [
        "[run] a failed worker replaced alone (1 so far): rank 1 died",
        "[run] worker group restarted (2 so far): gave up",
        "[run] worker group restarted (3 so far): all died",
    ]


def test_with_replicas_a_writer_that_moved_is_said_between_the_rows():
    restart = {"kind": "restart", "at": 1, "restarts": 1, "cause": "rank 0 died"}
    moved = {"kind": "writer", "at": 1, "rank": 1, "attempt": 2}
    rows = [{"epoch": 1, "val_loss": 0.9, "attempt": 1}, {"epoch": 2, "val_loss": 0.8, "attempt": 2}]
    base = {"restarts": 1, "attempts": 2, "resumed_from": None, "live": None, "new": rows, "next": 2}
    out = io.StringIO()
    feed = iter([{**base, "notes": [restart, moved]}])
    view = ProgressView(lambda since: next(feed), 3, "val_loss", "min", out=out, live=False, replicas=True)
    view.update()
    lines = out.getvalue().splitlines()
    assert lines[1:3] == [
        "[run] a failed worker replaced alone (1 so far): rank 0 died",
        "[run] rank 1 took over writing the checkpoints (attempt 2): the writer left the quorum; "
        "training goes on",
    ], lines
    assert lines[0].startswith("[run] epoch 1/3") and lines[3].startswith("[run] epoch 2/3"), lines


def test_live_line_on_a_terminal_shows_step_rate_eta_and_best():
    text = run_view(live=True)
    assert "step 5/10" in text and "steps/s" in text and "ETA 0:00:0" in text
    assert "best val_loss 0.5000 (epoch 1)" in text
    assert "resumed from epoch0001-step0000010-a1" in text


def test_a_restart_is_shown_between_the_attempts_epochs_even_in_one_poll():
    row = lambda e, a: {"epoch": e, "global_step": e, "attempt": a, "val_loss": 1.0 / e}  # noqa: E731
    feed = iter(
        [
            {
                "restarts": 1,
                "attempts": 2,
                "resumed_from": "epoch0001-a1",
                "live": None,
                "next": 3,
                "new": [row(1, 1), row(2, 2), row(3, 2)],
            }
        ]
    )
    out = io.StringIO()
    ProgressView(
        lambda since: next(feed), epochs=3, monitor="val_loss", mode="min", out=out, live=False
    ).update()
    assert [line.split()[1] for line in out.getvalue().splitlines()] == [
        "epoch",
        "worker",
        "attempt",
        "epoch",
        "epoch",
    ]


def test_an_auto_cadence_choice_is_shown_once_each_time_it_changes():
    base = {"restarts": 0, "attempts": 1, "resumed_from": None, "live": None, "new": [], "next": 0}
    chose = {"kind": "cadence", "ts": 5.0, "every_n_steps": 40, "why": "a save stalls training 2.0 ms"}
    feed = iter(
        [
            {**base, "cadence": chose},
            {**base, "cadence": chose},
            {**base, "cadence": {**chose, "ts": 9.0, "every_n_steps": 80, "why": "bigger"}},
        ]
    )
    out = io.StringIO()
    view = ProgressView(
        lambda since: next(feed), epochs=3, monitor="val_loss", mode="min", out=out, live=False
    )
    for _ in range(3):
        view.update()
    assert out.getvalue().splitlines() == [
        "[run] checkpoint every 40 steps: a save stalls training 2.0 ms",
        "[run] checkpoint every 80 steps: bigger",
    ]


def plain(payloads, epochs=10, replicas=False):
    """The plain lines a view prints, fed these progress payloads one poll at a time."""
    out, feed = io.StringIO(), iter(payloads)
    view = ProgressView(
        lambda since: next(feed),
        epochs=epochs,
        monitor="val_loss",
        mode="min",
        out=out,
        live=False,
        replicas=replicas,
    )
    view._stop.set()
    for _ in payloads:
        view.update()
    return [line for line in out.getvalue().splitlines() if line]


def row(epoch, value, attempt=1):
    return {"epoch": epoch, "global_step": 10 * epoch, "attempt": attempt, "val_loss": value}


def test_a_restart_comes_after_the_rows_reported_before_it_even_in_one_poll():
    """Fast epochs: one poll brings epochs 2-4 (reported before the kill in epoch 5) and the
    restart; the restart line used to come first (3 of 6 demo runs)."""
    base = {"live": None, "resumed_from": None}
    attempt1 = {"kind": "attempt", "at": 0, "attempt": 1, "resumed_from": None}
    restart = {
        "kind": "restart",
        "at": 4,
        "restarts": 1,
        "cause": "rank 1 (pid 42) SIGKILLed by chaos.kills at epoch 5 step 0",
    }
    attempt2 = {"kind": "attempt", "at": 4, "attempt": 2, "resumed_from": "epoch0004-step0000040-a1"}
    lines = plain(
        [
            {**base, "new": [row(1, 0.9)], "next": 1, "restarts": 0, "attempts": 1, "notes": [attempt1]},
            {
                **base,
                "new": [row(2, 0.8), row(3, 0.7), row(4, 0.6)],
                "next": 4,
                "restarts": 1,
                "attempts": 1,
                "notes": [attempt1, restart],
            },
            {
                **base,
                "new": [row(5, 0.5, 2)],
                "next": 5,
                "restarts": 1,
                "attempts": 2,
                "notes": [attempt1, restart, attempt2],
            },
        ]
    )
    assert [line.split("  ")[0] for line in lines] == [
        "[run] epoch 1/10",
        "[run] epoch 2/10",
        "[run] epoch 3/10",
        "[run] epoch 4/10",
        "[run] worker group restarted (1 so far): rank 1 (pid 42) SIGKILLed by chaos.kills at epoch 5 step 0",
        "[run] attempt 2 resumed from epoch0004-step0000040-a1",
        "[run] epoch 5/10",
    ]


def test_a_resume_carries_the_best_so_far_and_replays_no_earlier_restart():
    """A resumed run (this driver's coordinator is new) whose manifest counts a restart and two
    attempts from before: no `worker group restarted` line of the past, no `attempt 2` line;
    the best so far is the best committed before the resume, not the first new epoch's."""
    notes = [{"kind": "attempt", "at": 0, "attempt": 3, "resumed_from": "epoch0006-step0000060-a2"}]
    base = {
        "live": None,
        "resumed_from": "epoch0006-step0000060-a2",
        "restarts": 1,
        "attempts": 3,
        "best_at_start": {"epoch": 5, "metrics": {"val_loss": 0.25}},
    }
    lines = plain(
        [
            {**base, "new": [], "next": 0, "notes": notes},
            {**base, "new": [row(7, 0.3, 3)], "next": 1, "notes": notes},
        ]
    )
    assert lines == [
        "[run] attempt 3 resumed from epoch0006-step0000060-a2",
        "[run] epoch 7/10  val_loss 0.3000  best val_loss 0.2500 (epoch 5)",
    ]


def test_more_workers_than_cores_on_an_embedded_ray_is_a_warning():
    from orchestrator.driver import oversubscribed

    assert oversubscribed(2, 2) is None and oversubscribed(1, 16) is None
    warning = oversubscribed(8, 2)
    assert warning is not None and warning.startswith(
        "[run] warning: the workers ask for 8 CPUs and this machine has 2"
    )
    assert "share 2 cores" in warning


def test_a_run_whose_monitor_was_never_a_number_ends_with_a_warning_naming_stop_on_nan():
    nan, inf = float("nan"), float("inf")
    row = lambda e, v: {"epoch": e, "global_step": 10 * e, "val_loss": v, "val_acc": 0.1}  # noqa: E731
    all_nan = [row(1, nan), row(2, nan), row(3, nan)]
    w = all_nan_warning("val_loss", all_nan, stop_on_nan=False)
    assert w is not None and w.startswith(
        "[run] warning: every val_loss this run reported (3 value(s)) was NaN:"
    )
    assert "checkpoint.stop_on_nan: true" in w and "--set checkpoint.stop_on_nan=true" in w, w
    mixed = all_nan_warning("val_loss", [row(1, nan), row(2, inf)], stop_on_nan=False)
    assert mixed is not None and "was NaN or inf:" in mixed, mixed
    # With stop_on_nan on already, the fix is the training itself, not the field.
    on = all_nan_warning("val_loss", all_nan[:1], stop_on_nan=True)
    assert on is not None and "stop_on_nan" not in on and "lower the learning rate" in on, on
    # One finite value, no value reported, or only other metrics NaN: nothing to say.
    assert all_nan_warning("val_loss", [row(1, nan), row(2, 0.5), row(3, nan)], stop_on_nan=False) is None
    assert all_nan_warning("val_loss", [], stop_on_nan=False) is None
    assert all_nan_warning("val_acc", all_nan, stop_on_nan=False) is None
    assert all_nan_warning("val_f1", all_nan, stop_on_nan=False) is None


def test_the_drivers_lines_never_run_into_the_lines_ray_forwards(monkeypatch):
    """With --verbose the driver's console carries two writers: Ray's forwarded worker lines
    (its log thread, through ray_compat's print_to_stdstream) and the progress view's thread.
    Each wrote a line and its newline as two writes, so one line could land inside the other
    (seen: `...the workers has crashed.[run] a failed worker replaced alone (1 so far)`, a
    restart the console then seemed not to say). A line is written whole, one at a time."""
    import sys
    import threading
    import time

    import ray._private.worker as ray_worker

    from orchestrator import ray_compat

    class Pipe(io.StringIO):
        def write(self, s):  # a console on a pipe or a file: its write lets other threads run
            time.sleep(0)
            return super().write(s)

    out = Pipe()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # put back after
    monkeypatch.setattr(ray_compat, "_console", {"verbose": True})
    ray_compat.route_worker_output(verbose=True)
    n = 500

    def poll(since):
        row = {"epoch": since + 1, "global_step": since + 1, "attempt": 1, "val_loss": 0.5}
        return {
            "restarts": 0,
            "attempts": 1,
            "resumed_from": None,
            "live": None,
            "new": [row],
            "next": since + 1,
        }

    view = ProgressView(poll, epochs=n, monitor="val_loss", mode="min", out=out, live=False)

    def ray_lines():
        for i in range(n):
            data = {"pid": 4242, "ip": "127.0.0.1", "is_err": False, "actor_name": "RayTrainWorker"}
            ray_worker.print_to_stdstream({**data, "lines": [f"worker line {'x' * (i % 7)} {i}"]}, False)

    forwarded = threading.Thread(target=ray_lines)
    forwarded.start()
    for _ in range(n):
        view.update()
    forwarded.join()
    lines = out.getvalue().splitlines()
    ours = [line for line in lines if "[run]" in line]
    assert len(ours) == n and all(line.startswith("[run] epoch") for line in ours), [
        line for line in ours if not line.startswith("[run]")
    ][:3]
    theirs = [line for line in lines if "worker line" in line]
    assert len(theirs) == n and not [line for line in lines if not line], "a line broken in two"

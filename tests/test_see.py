"""`plot` and `report` on runs written by the real ledger (no Ray): a local one and one on
moto's S3 server, each with a restart; the report is opened in a real headless Chromium."""

from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.cli import cli_env, run_cli, start_cli, wait_until
from orchestrator.api import open_run
from orchestrator.cli.see import curves_figure, restarts_of, summarize
from orchestrator.coordinator import RetentionConfig, RunLedger
from orchestrator.core.manifest import CHECKPOINTS, RECORD, CheckpointRecord, FileEntry
from orchestrator.core.storage import Storage, sha256_hex

# epoch, train_loss, val_loss, val_acc; attempt 1 ends after epoch 4, attempt 2 resumes from it
HISTORY = [
    (1, 2.10, 1.60, 0.40),
    (2, 1.20, 0.90, 0.70),
    (3, 0.60, 0.45, 0.85),
    (4, 0.35, 0.30, 0.90),
    (5, 0.25, 0.21, 0.93),
    (6, 0.18, 0.12, 0.96),
    (7, 0.12, 0.15, 0.95),
    (8, 0.09, 0.17, 0.97),
]
BEST = "best epoch 6: val_loss 0.12"
KEPT = [6, 7, 8]  # best-2 (6, 7) and the latest (8)
# Ray Train's reason, with markup that must reach the page as text, never as markup
REASON = (
    "WorkerGroupError: Training failed due to worker errors:\n[Rank 1 Error Snippet]:\n"
    "<script>console.error('injected script ran')</script><img src=x onerror=\"console.error('img')\">"
)
NAME = "see-demo <b>&</b>"


def upload(
    storage: Storage, epoch: int, metrics: dict[str, float], attempt: int, steps: int = 10
) -> CheckpointRecord:
    """What rank 0 does before a commit: the files, then checkpoint.json last. An epoch is 10
    steps; fewer: a mid-epoch checkpoint (its metrics carried from the last evaluation)."""
    step, end = (epoch - 1) * 10 + steps, steps == 10
    cid = f"epoch{epoch:04d}-step{step:07d}-a{attempt}"
    storage.write_bytes(f"{CHECKPOINTS}/{cid}/model.pt", b"weights")
    rec = CheckpointRecord(
        id=cid,
        epoch=epoch,
        step_in_epoch=steps,
        global_step=step,
        end_of_epoch=end,
        metrics=metrics,
        metrics_fresh=end,
        world_size=2,
        attempt=attempt,
        files=[FileEntry(path="model.pt", size=7, sha256=sha256_hex(b"weights"))],
    )
    storage.write_bytes(f"{CHECKPOINTS}/{cid}/{RECORD}", rec.model_dump_json().encode())
    return rec


def build_run(storage: Storage, live: bool = False) -> RunLedger:
    """Two attempts: a chaos kill and Ray Train's restart after epoch 4, then a resume from it.
    live: the run goes on, with a mid-epoch checkpoint (half of epoch 9) as its latest."""
    led = RunLedger(storage, NAME, RetentionConfig("val_loss", "min", top_k=2, keep_latest=1))
    led.start_attempt(2)
    for epoch, train, val, acc in HISTORY:
        attempt = 1 if epoch <= 4 else 2
        if epoch == 5:
            led.claim_chaos("kill-0", pid=4242)
            led.note_restart(REASON)
            led.start_attempt(2)
        metrics = {"train_loss": train, "val_loss": val, "val_acc": acc}
        led.commit(upload(storage, epoch, metrics, attempt))
        led.report_metrics({"epoch": epoch, "global_step": epoch * 10, "attempt": attempt, **metrics})
    if live:
        led.commit(upload(storage, 9, {"train_loss": 0.09, "val_loss": 0.17, "val_acc": 0.97}, 2, steps=5))
    else:
        led.finish("finished")
    return led


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    build_run(Storage(str(tmp_path / "see-demo")))
    return tmp_path / "see-demo"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    return struct.unpack(">II", data[16:24])


# -- the figure: a pure function of rows, events and checkpoints ------------------------


def lines_at(fig: Any, x: float) -> list[Any]:
    return [ln for ax in fig.axes for ln in ax.lines if list(ln.get_xdata()) == [x, x]]


def test_figure_marks_the_best_epoch_the_restart_and_the_kept_checkpoints(run_dir):
    run = open_run(str(run_dir))
    rows, events, checkpoints = run.metrics(as_frame=False), run.events(), run.checkpoints()
    assert [c.epoch for c in checkpoints] == KEPT
    fig = curves_figure(rows, events, checkpoints, run.monitor, run.mode, title="see-demo")
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert BEST in texts
    assert "restart 1: WorkerGroupError (chaos kill)" in texts  # the class, and the real cause
    assert lines_at(fig, 6) and lines_at(fig, 4)  # the best epoch; where attempt 2 resumed from
    (ax,) = fig.axes  # val_loss is a loss: one axis, both curves on it
    by_label = {ln.get_label(): ln for ln in ax.lines}
    assert list(by_label["training loss (train_loss)"].get_ydata()) == [h[1] for h in HISTORY]
    assert list(by_label["validation loss (val_loss)"].get_ydata()) == [h[2] for h in HISTORY]
    star = by_label["best epoch by val_loss (min)"]
    assert (star.get_marker(), list(star.get_xdata()), list(star.get_ydata())) == ("*", [6], [0.12])
    kept = by_label["kept checkpoint"]
    assert list(kept.get_xdata()) == KEPT and list(kept.get_ydata()) == [0.12, 0.15, 0.17]
    assert fig.get_suptitle() == "see-demo" and ax.get_xlabel() == "epoch"
    assert ax.get_yscale() == "log"  # 2.1 down to 0.09: decades of loss
    assert {t.get_text() for t in fig.legends[0].get_texts()} >= {
        "kept checkpoint",
        "best epoch by val_loss (min)",
    }


def test_figure_gives_a_metric_that_is_not_a_loss_its_own_axis(run_dir):
    run = open_run(str(run_dir))
    fig = curves_figure(
        run.metrics(as_frame=False), run.events(), run.checkpoints(), "val_loss", "min", "val_acc"
    )
    ax, acc = fig.axes
    assert (
        acc.get_ylabel() == "val_acc"
        and [ln.get_label() for ln in ax.lines][0] == "training loss (train_loss)"
    )
    star = next(ln for ln in acc.lines if ln.get_marker() == "*")  # best by val_loss, shown on val_acc
    assert list(star.get_xdata()) == [6] and list(star.get_ydata()) == [0.96]
    assert BEST in [t.get_text() for t in ax.texts]


def test_a_live_run_shows_its_mid_epoch_checkpoint_between_epochs(tmp_path):
    build_run(Storage(str(tmp_path / "live")), live=True)
    run = open_run(str(tmp_path / "live"))
    rows, events, checkpoints = run.metrics(as_frame=False), run.events(), run.checkpoints()
    s = summarize(rows, events, checkpoints, run.monitor, run.mode)
    # 4: resumed from (pinned while the run lives); 6, 7: best-2; half of epoch 9: the latest
    assert [(k["epoch"], k["x"]) for k in s.kept] == [(4, 4.0), (6, 6.0), (7, 7.0), (9, 8.5)]
    fig = curves_figure(rows, events, checkpoints, run.monitor, run.mode)
    by_label = {ln.get_label(): ln for ln in fig.axes[0].lines}
    assert list(by_label["kept checkpoint"].get_xdata()) == [4, 6, 7]
    assert list(by_label["kept checkpoint (mid-epoch)"].get_xdata()) == [8.5]
    page = tmp_path / "live.html"
    run_cli("report", str(tmp_path / "live"), "--out", str(page), check=True)
    assert "running" in page.read_text() and "* mid-epoch checkpoint" in page.read_text()


def test_a_restart_is_drawn_where_the_next_attempt_resumed():
    ev = [
        {"kind": "attempt_started", "restore_epoch": None},
        {"kind": "restart", "restarts": 1, "reason": "ActorDiedError: the actor died\ntraceback"},
        {"kind": "attempt_started", "restore_epoch": None},  # no checkpoint yet: started over
        {"kind": "commit", "epoch": 3},
        {"kind": "restart", "restarts": 2, "reason": "ray.exceptions.RaySystemError: node lost"},
        {"kind": "attempt_started", "restore_epoch": 3},
        {"kind": "commit", "epoch": 5},
        {"kind": "restart", "restarts": 3, "reason": "out of patience"},  # the run ended here
    ]
    got = [(r.number, r.epoch, r.label, r.reason) for r in restarts_of(ev)]
    assert got == [
        (1, 0, "ActorDiedError", "ActorDiedError: the actor died"),
        (2, 3, "RaySystemError", "ray.exceptions.RaySystemError: node lost"),
        (3, 5, "out of patience", "out of patience"),
    ]
    assert restarts_of([{"kind": "restart", "reason": "pkg.mod.NodeGone: node 3"}])[0].label == "NodeGone"
    s = summarize([{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.5}], ev, [], "val_acc", "max")
    assert (s.best_epoch, s.best_value, s.metric) == (2, 0.5, "val_acc")  # a tie goes to the newer


# -- the plot command --------------------------------------------------------------------


def test_plot_writes_a_png_and_says_where(run_dir, tmp_path):
    out = tmp_path / "new" / "dir" / "curves.png"  # missing folders are made
    p = run_cli("plot", str(run_dir), "--out", str(out), check=True)
    assert p.stdout.startswith(f"wrote {out}") and BEST in p.stdout
    w, h = png_size(out.read_bytes())
    assert w >= 900 and h >= 500 and out.stat().st_size > 20_000
    p = run_cli(
        "plot", str(run_dir), "--out", str(tmp_path / "acc.svg"), "--metric", "val_acc", "--json", check=True
    )
    got = json.loads(p.stdout)
    assert got["out"] == str(tmp_path / "acc.svg") and (tmp_path / "acc.svg").read_text().startswith("<?xml")
    assert (got["best_epoch"], got["best_value"], got["monitor"], got["metric"]) == (
        6,
        0.12,
        "val_loss",
        "val_acc",
    )
    assert [(r["epoch"], r["label"]) for r in got["restarts"]] == [(4, "WorkerGroupError (chaos kill)")]
    assert [k["epoch"] for k in got["kept"]] == KEPT


def test_plot_reads_a_run_on_s3(moto, bucket, s3_env, tmp_path):
    build_run(Storage(f"s3://{bucket}/runs/see-demo"))
    env = cli_env()
    env.pop("AWS_ENDPOINT_URL")  # the endpoint comes from --storage-option
    out = tmp_path / "s3.png"
    p = run_cli(
        "plot",
        f"s3://{bucket}/runs/see-demo",
        "--out",
        str(out),
        "--json",
        "--storage-option",
        f"endpoint_url={moto.endpoint}",
        env=env,
        check=True,
    )
    assert json.loads(p.stdout)["best_epoch"] == 6 and png_size(out.read_bytes())[0] >= 900
    p = run_cli(
        "report",
        f"s3://{bucket}/runs/see-demo",
        "--out",
        str(tmp_path / "s3.html"),
        "--storage-option",
        f"endpoint_url={moto.endpoint}",
        env=env,
        check=True,
    )
    assert BEST in (tmp_path / "s3.html").read_text()


@pytest.mark.parametrize(
    "args, code, message",
    [
        (
            ["plot", "{run}", "--out", "{tmp}/x.png", "--metric", "val_f1"],
            2,
            "--metric val_f1: not a metric of this run; its metrics are: train_loss, val_acc, val_loss",
        ),
        (["plot", "{empty}", "--out", "{tmp}/x.png"], 1, "no metrics yet"),
        (["report", "{empty}", "--out", "{tmp}/x.html"], 1, "no metrics yet"),
        (["plot", "{tmp}/nope", "--out", "{tmp}/x.png"], 2, "no manifest.json; is this a run directory"),
        (["plot", "{run}", "--out", "{tmp}/afile/x.png"], 2, "afile is not a directory"),
        (["report", "{run}", "--out", "{tmp}"], 2, "is a directory; name a file"),
        (["plot", "{run}", "--out", "{tmp}/x.jpeg"], 2, "name a file ending in one of .pdf, .png, .svg"),
        (["plot", "{run}"], 2, "Missing option '--out'"),
    ],
)
def test_bad_input_exits_with_a_clear_message(run_dir, tmp_path, args, code, message):
    empty = Storage(str(tmp_path / "empty"))
    RunLedger(empty, "empty", RetentionConfig("val_loss", "min", top_k=1, keep_latest=1)).start_attempt(1)
    (tmp_path / "afile").write_text("a file, not a folder")
    args = [a.format(tmp=tmp_path, run=run_dir, empty=tmp_path / "empty") for a in args]
    p = run_cli(*args)
    assert p.returncode == code, p.stdout + p.stderr
    assert message in p.stderr
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.html").exists()


# -- the report, in a real browser -------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium not found: install Debian's chromium (apt-get install chromium; .ci/run does) "
    "to open the report in a real headless browser",
)
# With --enable-logging=stderr, every console message of the page (a console.* call, an
# uncaught exception, a Content-Security-Policy violation) is a line
# `[pid:tid:date:INFO:CONSOLE:line] "message", source: URL (line)` (older builds: CONSOLE(line)).
CONSOLE = re.compile(r":CONSOLE[:(]")


def chromium(page: Path, tmp: Path, *args: str) -> tuple[str, list[str]]:
    """Open page in headless Chromium (a fresh profile, nothing phoning home); its stdout, and
    the page's console messages."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
        page.as_uri(),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, [line for line in p.stderr.splitlines() if CONSOLE.search(line)]


@pytest.fixture
def report(run_dir, tmp_path) -> Path:
    out = tmp_path / "report.html"
    p = run_cli("report", str(run_dir), "--out", str(out), check=True)
    assert p.stdout.startswith(f"wrote {out}") and BEST in p.stdout
    return out


def test_report_is_one_self_contained_escaped_page(report):
    page = report.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.I)  # nothing to fetch
    assert "<script" not in page and "<link" not in page and page.count("<img ") == 1
    # escaped (Jinja2 writes ' as &#39;, Python's html.escape as &#x27;: either is the same character)
    assert re.search(
        r"&lt;script&gt;console.error\((&#39;|&#x27;)injected script ran(&#39;|&#x27;)\)&lt;/script&gt;", page
    )
    assert "see-demo &lt;b&gt;&amp;&lt;/b&gt;" in page


@needs_chromium
def test_report_in_chromium_shows_the_best_epoch_and_the_tables_and_logs_nothing(report, run_dir, tmp_path):
    dom, console = chromium(report, tmp_path, "--dump-dom")
    assert console == []  # no script error, no blocked request, and the injected markup never ran
    assert f'<div class="fact best" id="best"><b>best</b>{BEST}</div>' in dom
    ids = [c.id for c in open_run(str(run_dir)).checkpoints()]
    rows = re.findall(r'<tr[^>]*><td class="mono">(epoch[^<]+)</td>', dom.split('id="checkpoints"')[1])
    assert rows[: len(ids)] == ids
    assert re.search(r'<tr class="is-best"><td class="mono">epoch0006-step0000060-a2</td>', dom)
    events = dom.split('id="events"')[1]
    for kind in ("attempt_started", "chaos_kill", "restart", "commit", "delete", "run_finished"):
        assert f">{kind}</td>" in events
    assert re.search(r'<td class="mono when">\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}</td>', events)
    assert "<h1>see-demo &lt;b&gt;&amp;&lt;/b&gt;</h1>" in dom  # shown as text, not bold
    assert dom.count("<img ") == 1 and 'src="data:image/png;base64,' in dom
    assert 'http-equiv="refresh"' not in dom  # a finished run's page stays as it is
    assert '<p class="muted" id="spec">no spec.yaml stored in the run</p>' in dom  # this run has none
    shot = tmp_path / "report.png"
    chromium(report, tmp_path, "--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}")
    assert png_size(shot.read_bytes()) == (1280, 2400)


@needs_chromium
def test_the_console_check_catches_a_script_error_and_an_outside_request(report, tmp_path):
    """The check above can fail: a page with a script error, and the report with a request
    to the outside added, each leave console lines."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><p>x</p><script>console.log('hello'); notDefined();</script>")
    _, console = chromium(bad, tmp_path, "--dump-dom")
    assert any("Uncaught ReferenceError: notDefined is not defined" in line for line in console), console
    leaky = tmp_path / "leaky.html"
    leaky.write_text(report.read_text().replace("<h1>", '<img src="http://127.0.0.1:9/x.png"><h1>', 1))
    _, console = chromium(leaky, tmp_path, "--dump-dom")
    assert any("http://127.0.0.1:9/x.png" in line and "Content Security Policy" in line for line in console)


# A stored spec whose values hold markup: the page shows it as text.
SPEC_YAML = """name: see-demo
task:
  name: digits
  options: {note: "<script>console.error('spec script ran')</script>", lr: 0.05}
checkpoint: {monitor: val_loss, mode: min, top_k: 2}
"""


@needs_chromium
def test_report_of_a_running_run_shows_its_spec_and_reloads_itself_until_the_run_ends(tmp_path):
    storage = Storage(str(tmp_path / "live"))
    led = build_run(storage, live=True)
    storage.write_bytes("spec.yaml", SPEC_YAML.encode())
    out, snapshot = tmp_path / "live.html", tmp_path / "snapshot.html"
    proc = start_cli(
        "report", str(tmp_path / "live"), "--out", str(out), "--every", "1", log=tmp_path / "r.log"
    )
    try:
        wait_until(out.exists, timeout=120, what="the first page", interval=0.2)
        snapshot.write_bytes(out.read_bytes())  # one page: the command rewrites out every second
        dom, console = chromium(snapshot, tmp_path, "--dump-dom")
        assert console == []  # the spec's markup never ran
        assert '<meta http-equiv="refresh" content="1">' in dom
        assert 'id="live">running: this page reloads itself every 1 s' in dom
        assert '<span class="status-running">running</span>' in dom
        spec = dom.split('id="spec"')[1]
        assert "task:" in spec and "&lt;script&gt;console.error('spec script ran')&lt;/script&gt;" in spec, (
            spec
        )
        assert "<script" not in dom
        led.finish("finished")  # the run ends: the page is written once more, and the command exits
        assert proc.wait(timeout=120) == 0, (tmp_path / "r.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "r.log").read_text().startswith(f"wrote {out}")
    dom, console = chromium(out, tmp_path, "--dump-dom")
    assert console == []
    assert 'http-equiv="refresh"' not in dom and 'id="live"' not in dom  # finished: nothing to reload for
    assert '<span class="status-finished">finished</span>' in dom
    assert "&lt;script&gt;console.error('spec script ran')&lt;/script&gt;" in dom.split('id="spec"')[1]

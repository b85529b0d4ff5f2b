"""Where a run's metric rows go besides metrics.jsonl: TensorBoard event files under
RUN_URI/tb (so `tensorboard --logdir RUN_URI/tb` works, local and s3://), and MLflow when
`tracking.mlflow_uri` is set and mlflow is installed.

What they get: the spec, flattened (`flat_params`), as MLflow params and TensorBoard hparams;
every epoch's row at step=epoch; rank 0's train loss per reported step (`step/train_loss` at
step=global_step: the worker's tick, about once a second); and in MLflow at the end the best
checkpoint's URI (tag `orchestrator.best_checkpoint`) and artifacts.

The coordinator owns it (it is the one place every epoch's row arrives). A tracker that
fails never fails the run: it is switched off with one event saying why and what to do
(`tracker_off`: tracker, error, fix, epoch), which the driver says once while the run goes
on and again in its end-of-run summary (`off_line`). Before that, the driver checks the MLflow URI
(`mlflow_problem`, from preflight): a new run with a URI MLflow cannot use is refused
before Ray starts, naming the URI, the error and the fix; a resumed one is warned and goes on
without MLflow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import tempfile
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlparse

from orchestrator.core.manifest import EVENTS, METRICS, SPEC
from orchestrator.core.storage import Storage

TB_DIR = "tb"
STEP_LOSS = "step/train_loss"  # rank 0's loss per reported step, at step=global_step
STEP_LR = "step/lr"  # the optimizer's learning rate at that step
UPLOAD_EVERY_S = 10.0  # per-step events are uploaded at most this often (every epoch's at once)
_NOT_LOGGED = ("epoch", "global_step", "attempt")


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested spec as dotted keys (`task.options.lr`); a list, None or an empty mapping is
    one JSON value, since trackers take scalars only."""
    out: dict[str, str | int | float | bool] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_params(v, key + "."))
        elif isinstance(v, (str, int, float, bool)):
            out[key] = v
        else:
            out[key] = json.dumps(v, sort_keys=True, default=str)
    return out


def tracker_fix(name: str, error: BaseException, settings: dict[str, Any], run_uri: str) -> str:
    """What to do about a tracker that was switched off, in one sentence for the console."""
    kept = (
        f"the run trains on, and {run_uri}/metrics.jsonl has every epoch (`orchestrator metrics {run_uri}`)"
    )
    if name == "mlflow":
        if isinstance(error, ImportError):
            return (
                "`pip install mlflow-skinny` where the coordinator runs, or "
                f"--set tracking.mlflow_uri=null; {kept}"
            )
        return (
            f"check the MLflow tracking server at {settings.get('mlflow_uri')} (is it up, and reachable "
            f"from the driver's node?); {kept}; --set tracking.mlflow_uri=null runs without MLflow"
        )
    if isinstance(error, ImportError):
        return f"`pip install tensorboardX`, or --set tracking.tensorboard=false; {kept}"
    return (
        f"{run_uri}/{TB_DIR} could not be written (is storage full, or not writable there?); the event "
        f"files written so far stay; {kept}; --set tracking.tensorboard=false runs without TensorBoard"
    )


def off_line(event: dict[str, Any]) -> tuple[str, str, str]:
    """(when, error, then) of a `tracker_off` event: `after epoch 3`, `ERROR`, `. FIX` (an
    event of an older version has no fix: then "")."""
    n = event.get("epoch") or 0
    when = f"after epoch {n}" if n else "before the first epoch"
    return when, str(event.get("error")), f". {event['fix']}" if event.get("fix") else ""


class TensorBoard:
    """Event files written with tensorboardX's synchronous EventsWriter (its SummaryWriter
    queues events to a thread that a flush does not wait for) and uploaded whole after each
    epoch's row, and at most every UPLOAD_EVERY_S for per-step rows (they are small). A
    restarted coordinator starts a new file; TensorBoard merges them. Each file begins with
    the spec as hparams (the HPARAMS tab), with the monitored metric and train_loss as its
    metrics."""

    def __init__(
        self, storage: Storage, params: dict[str, Any] | None = None, monitor: str | None = None
    ) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        self.storage = storage
        self._dir = tempfile.mkdtemp(prefix="orchestrator-tb-")
        # A unique suffix: two coordinators of one run started in the same second (a restart)
        # would otherwise write the same file name, and the second upload replace the first.
        self.writer = EventsWriter(os.path.join(self._dir, "events"), f".{uuid.uuid4().hex[:8]}")
        self.name = os.path.basename(self.writer._file_name)
        self._uploaded = 0.0
        if params:
            self._hparams(params, [m for m in dict.fromkeys([monitor, "train_loss"]) if m])

    def _hparams(self, params: dict[str, Any], metrics: list[str]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import hparams

        experiment, start, _end = hparams(params, dict.fromkeys(metrics, 0.0))
        for summary in (experiment, start):
            self.writer.write_event(Event(wall_time=time.time(), step=0, summary=summary))

    def finish(self, status: str) -> None:
        import shutil

        self._upload()  # the per-step events since the last upload
        self.writer.close()
        shutil.rmtree(self._dir, ignore_errors=True)  # the event file is in storage

    def log(self, row: dict[str, Any]) -> None:
        self._scalars(row, int(row.get("epoch", 0)))
        self._upload()

    def log_step(self, row: dict[str, Any]) -> None:
        self._scalars(step_values(row), int(row["global_step"]))
        if time.monotonic() - self._uploaded >= UPLOAD_EVERY_S:
            self._upload()

    def _scalars(self, row: dict[str, Any], step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for k, v in row.items():
            if k not in _NOT_LOGGED and isinstance(v, (int, float)):
                self.writer.write_event(Event(wall_time=time.time(), step=step, summary=scalar(k, float(v))))

    def _upload(self) -> None:
        self.writer.flush()
        with open(os.path.join(self._dir, self.name), "rb") as f:
            self.storage.write_bytes(f"{TB_DIR}/{self.name}", f.read())
        self._uploaded = time.monotonic()


# Environment the driver hands on to the coordinator's MLflow client (it may run in another
# process or on a cluster that did not inherit the driver's environment). No credentials.
MLFLOW_ENV = (
    "MLFLOW_ALLOW_FILE_STORE",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_TRACKING_INSECURE_TLS",
)
_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # mlflow's SQLAlchemy store schemes


def mlflow_problem(uri: str, experiment: str) -> str | None:
    """Why MLflow at `uri` cannot be used from this process, as one line naming the URI, the
    error and what to do; None when it can. Looks the experiment up (creating nothing on a
    server), with MLflow's HTTP retries off: its default retries a dead server for minutes."""
    try:
        import mlflow
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        return (
            f"tracking.mlflow_uri {uri}: mlflow is not installed here ({e}); `pip install "
            "mlflow-skinny` (the project's `mlflow` extra), "
            "or --set tracking.mlflow_uri=null"
        )
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme in _DATABASES and importlib.util.find_spec("sqlalchemy") is None:
        return (
            f"tracking.mlflow_uri {uri}: a {scheme} store needs sqlalchemy, which is not installed "
            f"here (mlflow-skinny leaves it out); `pip install mlflow` (the full package), or log to "
            f"a tracking server (--set tracking.mlflow_uri=http://HOST:5000), or "
            f"--set tracking.mlflow_uri=null"
        )
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
        return None
    except Exception as e:  # noqa: BLE001  # whatever MLflow raises, said in one line
        return _mlflow_error(uri, mlflow.__version__, e)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _mlflow_error(uri: str, version: str, e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    off = "or --set tracking.mlflow_uri=null to train without MLflow"
    if "maintenance mode" in text:
        return (
            f"tracking.mlflow_uri {uri}: mlflow {version} refuses a file store (its file backend "
            f"is in maintenance mode); use sqlite:///PATH/mlflow.db (`pip install mlflow`, for "
            f"sqlalchemy), a tracking server (http://HOST:5000, `mlflow server`), or set "
            f"MLFLOW_ALLOW_FILE_STORE=true where you run orchestrator; {off}"
        )
    if "unsupported URI" in text:
        return (
            f"tracking.mlflow_uri {uri}: mlflow {version} has no store for this URI scheme; use "
            f"http(s)://HOST:PORT (a tracking server), sqlite:///PATH (`pip install mlflow`), "
            f"file:///PATH (with MLFLOW_ALLOW_FILE_STORE=true), {off}"
        )
    where = " (is the tracking server running, and is this its address?)" if uri.startswith("http") else ""
    errno = re.search(r"\[Errno -?\d+\] [^\"')]+", text)  # urllib3's long wrapping, down to its cause
    said = f"cannot connect: {errno.group(0).strip()}" if errno else f"{type(e).__name__}: {text[:400]}"
    return f"tracking.mlflow_uri {uri}: MLflow fails: {said}{where}; {off}"


class MLflow:
    """One MLflow run per orchestrator run, named after it (the spec's name), found again by
    its run_uri tag after a restart or a resume; a run that starts with no history in
    storage (a new run, or one `orchestrator run` replaced) gets a new one. At the end, its
    artifacts: the spec, the best checkpoint's record and the curves figure."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        storage: Storage,
        params: dict[str, Any],
        run_name: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        for k, v in (env or {}).items():
            os.environ.setdefault(k, v)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # seconds on a dead server, not minutes
        self.client, self.storage = MlflowClient(tracking_uri=uri), storage
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        run_uri = storage.uri
        fresh = not (storage.exists(EVENTS) or storage.exists(METRICS))
        found = (
            []
            if fresh
            else self.client.search_runs(
                [exp_id],
                filter_string=f"tags.`orchestrator.run_uri` = '{run_uri}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
        )
        if found:
            self.run_id = found[0].info.run_id
            return
        name = run_name or run_uri.rstrip("/").rsplit("/", 1)[-1]
        run = self.client.create_run(exp_id, run_name=name, tags={"orchestrator.run_uri": run_uri})
        self.run_id = run.info.run_id
        self._params(params)

    def _params(self, params: dict[str, Any]) -> None:
        """The flattened spec, in batches of MLflow's limit of 100 (a key MLflow refuses, such as
        a task option named with a colon, is logged with `_` for what it refuses)."""
        from mlflow.entities import Param

        items = [Param(re.sub(r"[^\w.\- /]", "_", str(k))[:250], str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, row: dict[str, Any]) -> None:
        step = int(row.get("epoch", 0))
        self._metrics({k: v for k, v in row.items() if k not in _NOT_LOGGED}, step)

    def log_step(self, row: dict[str, Any]) -> None:
        self._metrics(step_values(row), int(row["global_step"]))

    def _metrics(self, values: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if isinstance(v, (int, float))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, status: str) -> None:
        """Artifacts, then the end: FINISHED, KILLED (Ctrl-C/SIGTERM on the driver: resumable)
        or FAILED. The run is ended even when an artifact fails (the error is then raised)."""
        from orchestrator.api import Run

        run = None
        try:
            run = Run(self.storage.uri, self.storage.options)
            self._artifacts(run)
        finally:
            stopped = (run.manifest.stopped or {}) if run is not None else {}
            interrupted = stopped.get("kind") == "interrupt"
            self.client.set_terminated(
                self.run_id, "FINISHED" if status == "finished" else "KILLED" if interrupted else "FAILED"
            )

    def _artifacts(self, run: Any) -> None:
        client, rid = self.client, self.run_id
        if self.storage.exists(SPEC):
            client.log_text(rid, self.storage.read_bytes(SPEC).decode("utf-8", "replace"), SPEC)
        ranked = run.ranked()
        if ranked:
            best = ranked[0]
            record = {
                "id": best.id,
                "uri": best.uri,
                "epoch": best.epoch,
                "global_step": best.global_step,
                "monitor": run.monitor,
                "mode": run.mode,
                "value": best.metrics.get(run.monitor),
                "metrics": best.metrics,
                "files": [f.model_dump() for f in best.record.files],
            }
            client.log_dict(rid, record, "best_checkpoint.json")
            client.set_tag(rid, "orchestrator.best_checkpoint", best.uri)
            client.log_metric(rid, f"best_{run.monitor}", float(best.metrics[run.monitor]), step=best.epoch)
        self._curves(run)

    def _curves(self, run: Any) -> None:
        """curves.png, as `orchestrator plot` draws it (skipped without matplotlib or metrics)."""
        if importlib.util.find_spec("matplotlib") is None:
            return
        from orchestrator.report.curves import curves_figure, known_metrics

        rows = run.metrics(as_frame=False)
        if not rows or run.monitor not in known_metrics(rows):
            return
        title = f"{run.manifest.run}: training and validation per epoch"
        fig = curves_figure(rows, run.events(), run.checkpoints(), run.monitor, run.mode, None, title)
        self.client.log_figure(self.run_id, fig, "curves.png")


class Trackers:
    """The trackers of one coordinator, fed from a background thread: rank 0 waits for the
    coordinator's report_metrics, and a slow TensorBoard upload or MLflow server must not
    make it (and every rank behind it at the next collective) wait too. Each row goes in as
    ("epoch", row) or ("step", row)."""

    def __init__(self, storage: Storage, settings: dict[str, Any] | None, epoch: int = 0) -> None:
        # (tracker, error, fix, the last epoch it logged): the ledger logs them as events
        self.errors: list[tuple[str, BaseException, str, int]] = []
        self._errors_lock = threading.Lock()  # the drain thread adds, the coordinator's takes
        self.active: list[Any] = []
        self.storage, self.settings = storage, settings or {}
        self._epoch = epoch  # the last epoch whose row the trackers have had (a restart: the run's)
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        settings = self.settings
        params = settings.get("params") or {}
        if settings.get("tensorboard", True):
            self._start(lambda: TensorBoard(storage, params, settings.get("monitor")), "tensorboard")
        if settings.get("mlflow_uri"):
            self._start(
                lambda: MLflow(
                    settings["mlflow_uri"],
                    settings.get("experiment", "orchestrator"),
                    storage,
                    params,
                    settings.get("run_name"),
                    settings.get("env"),
                ),
                "mlflow",
            )
        self._thread = threading.Thread(target=self._drain, name="trackers", daemon=True)
        self._thread.start()

    def _start(self, make: Any, name: str) -> None:
        try:
            self.active.append(make())
        except Exception as e:  # a missing package or an unreachable server: say so, train on
            self._off(name, e)

    def _off(self, name: str, e: BaseException) -> None:
        fix = tracker_fix(name, e, self.settings, self.storage.uri)
        with self._errors_lock:
            self.errors.append((name, e, fix, self._epoch))

    def log(self, row: dict[str, Any]) -> None:
        """An epoch's row (logged at step=epoch)."""
        if self.active:
            self._queue.put(("epoch", row))

    def log_step(self, row: dict[str, Any]) -> None:
        """Rank 0's train loss at one step: {"global_step", "train_loss", ...}."""
        if self.active:
            self._queue.put(("step", row))

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            kind, row = item
            for t in list(self.active):
                try:
                    if kind == "epoch":
                        t.log(row)
                    else:
                        t.log_step(row)
                except Exception as e:
                    self.active.remove(t)
                    self._off(type(t).__name__.lower(), e)
            if kind == "epoch":
                self._epoch = int(row.get("epoch", 0))
            self._queue.task_done()
        self._queue.task_done()

    def take_errors(self) -> list[tuple[str, BaseException, str, int]]:
        """Trackers switched off since the last call (the caller logs them, on its own thread)."""
        with self._errors_lock:
            out, self.errors = self.errors, []
        return out

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait (up to timeout_s) until every row handed over so far is logged."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)

    def finish(self, status: str) -> None:
        self.flush()
        for t in self.active:
            if hasattr(t, "finish"):
                try:
                    t.finish(status)
                except Exception as e:
                    self._off(type(t).__name__.lower(), e)


def step_values(row: dict[str, Any]) -> dict[str, float]:
    """A tick's row as per-step scalars: the train loss, and the learning rate when sent."""
    return {STEP_LOSS: row["train_loss"], **({STEP_LR: row["lr"]} if "lr" in row else {})}

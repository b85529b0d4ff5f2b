"""Where a run's metric rows go besides metrics.jsonl: TensorBoard event files under
RUN_URI/tb (so `tensorboard --logdir RUN_URI/tb` works, local and s3://), and MLflow when
`tracking.mlflow_uri` is set and mlflow is installed.

The coordinator owns it (it is the one place every epoch's row arrives). A tracker that
fails never fails the run: it is switched off with one event saying why (`tracker_off`),
which the driver prints when the run ends. Before that, the driver checks the MLflow URI
(`mlflow_problem`, from preflight): a new run with a URI MLflow cannot use is refused
before Ray starts, naming the URI, the error and the fix; a resumed one is warned and goes on
without MLflow.
"""

from __future__ import annotations

import importlib.util
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


class TensorBoard:
    """Event files written with tensorboardX's synchronous EventsWriter (its SummaryWriter
    queues events to a thread that a flush does not wait for) and uploaded whole after each
    row (they are small). A restarted coordinator starts a new file; TensorBoard merges them."""

    def __init__(self, storage: Storage) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        self.storage = storage
        self._dir = tempfile.mkdtemp(prefix="orchestrator-tb-")
        # A unique suffix: two coordinators of one run started in the same second (a restart)
        # would otherwise write the same file name, and the second upload replace the first.
        self.writer = EventsWriter(os.path.join(self._dir, "events"), f".{uuid.uuid4().hex[:8]}")
        self.name = os.path.basename(self.writer._file_name)

    def finish(self, status: str) -> None:
        import shutil

        self.writer.close()
        shutil.rmtree(self._dir, ignore_errors=True)  # the event file is in storage

    def log(self, row: dict[str, Any]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        step = int(row.get("epoch", 0))
        for k, v in row.items():
            if k not in ("epoch", "global_step", "attempt") and isinstance(v, (int, float)):
                self.writer.write_event(Event(wall_time=time.time(), step=step, summary=scalar(k, float(v))))
        self.writer.flush()
        with open(os.path.join(self._dir, self.name), "rb") as f:
            self.storage.write_bytes(f"{TB_DIR}/{self.name}", f.read())


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
        for k, v in params.items():
            self.client.log_param(self.run_id, k, str(v)[:500])

    def log(self, row: dict[str, Any]) -> None:
        step = int(row.get("epoch", 0))
        for k, v in row.items():
            if k not in ("epoch", "global_step", "attempt") and isinstance(v, (int, float)):
                self.client.log_metric(self.run_id, k, float(v), step=step)

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
    make it (and every rank behind it at the next collective) wait too."""

    def __init__(self, storage: Storage, settings: dict[str, Any] | None) -> None:
        self.errors: list[tuple[str, BaseException]] = []  # (tracker, error): the ledger logs them
        self.active: list[Any] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        settings = settings or {}
        if settings.get("tensorboard", True):
            self._start(lambda: TensorBoard(storage), "tensorboard")
        if settings.get("mlflow_uri"):
            self._start(
                lambda: MLflow(
                    settings["mlflow_uri"],
                    settings.get("experiment", "orchestrator"),
                    storage,
                    settings.get("params") or {},
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
            self.errors.append((name, e))

    def log(self, row: dict[str, Any]) -> None:
        if self.active:
            self._queue.put(row)

    def _drain(self) -> None:
        while (row := self._queue.get()) is not None:
            for t in list(self.active):
                try:
                    t.log(row)
                except Exception as e:
                    self.active.remove(t)
                    self.errors.append((type(t).__name__.lower(), e))
            self._queue.task_done()
        self._queue.task_done()

    def take_errors(self) -> list[tuple[str, BaseException]]:
        """Trackers switched off since the last call (the caller logs them, on its own thread)."""
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
                    self.errors.append((type(t).__name__.lower(), e))

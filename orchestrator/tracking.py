"""Where a run's metric rows go besides metrics.jsonl: TensorBoard event files under
RUN_URI/tb (so `tensorboard --logdir RUN_URI/tb` works, local and s3://), and MLflow when
`tracking.mlflow_uri` is set and mlflow is installed.

The coordinator owns it (it is the one place every epoch's row arrives). A tracker that
fails never fails the run: it is switched off with one event saying why.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
import uuid
from typing import Any

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


class MLflow:
    """One MLflow run per orchestrator run (found again by its run_uri tag after a restart)."""

    def __init__(self, uri: str, experiment: str, run_uri: str, params: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        found = self.client.search_runs([exp_id], filter_string=f"tags.`orchestrator.run_uri` = '{run_uri}'")
        if found:
            self.run_id = found[0].info.run_id
        else:
            run = self.client.create_run(exp_id, tags={"orchestrator.run_uri": run_uri})
            self.run_id = run.info.run_id
            for k, v in params.items():
                self.client.log_param(self.run_id, k, str(v)[:500])

    def log(self, row: dict[str, Any]) -> None:
        step = int(row.get("epoch", 0))
        for k, v in row.items():
            if k not in ("epoch", "global_step", "attempt") and isinstance(v, (int, float)):
                self.client.log_metric(self.run_id, k, float(v), step=step)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if status == "finished" else "FAILED")


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
            params = settings.get("params") or {}
            self._start(
                lambda: MLflow(
                    settings["mlflow_uri"], settings.get("experiment", "orchestrator"), storage.uri, params
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

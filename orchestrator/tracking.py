"""Where a run's metric rows go besides metrics.jsonl: TensorBoard event files under
RUN_URI/tb (so `tensorboard --logdir RUN_URI/tb` works, local and s3://), and MLflow when
`tracking.mlflow_uri` is set and mlflow is installed.

The coordinator owns it (it is the one place every epoch's row arrives). A tracker that
fails never fails the run: it is switched off with one event saying why.
"""

from __future__ import annotations

import os
import tempfile
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
    def __init__(self, storage: Storage, settings: dict[str, Any] | None, on_error: Any) -> None:
        self.on_error = on_error
        self.active: list[Any] = []
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

    def _start(self, make: Any, name: str) -> None:
        try:
            self.active.append(make())
        except Exception as e:  # a missing package or an unreachable server: say so, train on
            self.on_error(name, e)

    def log(self, row: dict[str, Any]) -> None:
        for t in list(self.active):
            try:
                t.log(row)
            except Exception as e:
                self.active.remove(t)
                self.on_error(type(t).__name__.lower(), e)

    def finish(self, status: str) -> None:
        for t in self.active:
            if hasattr(t, "finish"):
                try:
                    t.finish(status)
                except Exception as e:
                    self.on_error(type(t).__name__.lower(), e)

"""TensorBoard event files under RUN_URI/tb (local and S3) and MLflow logging, written by the
real ledger, read back with TensorBoard's and MLflow's own readers."""

from __future__ import annotations

import pytest

from orchestrator.coordinator import RetentionConfig, RunLedger
from orchestrator.core.manifest import read_jsonl
from orchestrator.core.storage import Storage

CFG = RetentionConfig("val_loss", "min", top_k=2, keep_latest=1)
ROWS = [
    {"epoch": e, "global_step": 10 * e, "attempt": 1, "val_loss": 1.0 / e, "train_loss": 2.0 / e}
    for e in (1, 2, 3)
]


def scalars(logdir: str, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir)
    acc.Reload()
    return sorted((ev.step, round(ev.value, 6)) for ev in acc.Scalars(tag))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_tensorboard_event_files_land_in_the_run(where, tmp_path, request):
    if where == "local":
        storage = Storage(str(tmp_path / "run"))
    else:
        request.getfixturevalue("s3_env")
        storage = Storage(f"s3://{request.getfixturevalue('bucket')}/runs/run")
    led = RunLedger(storage, "run", CFG, tracking={"tensorboard": True})
    for row in ROWS[:2]:
        led.report_metrics(row)
    led.trackers.flush()
    again = RunLedger(storage, "run", CFG, tracking={"tensorboard": True})  # a restarted coordinator
    again.report_metrics(ROWS[2])
    again.trackers.flush()
    names = storage.list_dirs("tb")
    assert len(names) == 2 and all(n.startswith("events.out.tfevents") for n in names)
    local = tmp_path / "tb"
    local.mkdir()
    for n in names:  # what `tensorboard --logdir RUN_URI/tb` reads
        (local / n).write_bytes(storage.read_bytes(f"tb/{n}"))
    assert scalars(str(local), "val_loss") == [(1, 1.0), (2, 0.5), (3, round(1 / 3, 6))]


def test_mlflow_gets_every_epoch_and_one_run_across_restarts(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is an optional extra (the test extras carry it)")
    from mlflow.tracking import MlflowClient

    assert mlflow
    # A file store is enough for a test (MLflow 3 asks servers to use a database).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    uri = f"file://{tmp_path / 'mlruns'}"
    storage = Storage(str(tmp_path / "run"))
    tracking = {"tensorboard": False, "mlflow_uri": uri, "experiment": "digits", "params": {"seed": 0}}
    led = RunLedger(storage, "run", CFG, tracking=tracking)
    led.report_metrics(ROWS[0])
    led.trackers.flush()
    again = RunLedger(storage, "run", CFG, tracking=tracking)
    for row in ROWS[1:]:
        again.report_metrics(row)
    again.finish("finished")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("digits")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].data.params == {"seed": "0"}
    history = client.get_metric_history(runs[0].info.run_id, "val_loss")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(1, 1.0), (2, 0.5), (3, round(1 / 3, 6))]
    assert client.get_run(runs[0].info.run_id).info.status == "FINISHED"


def test_a_broken_tracker_is_switched_off_not_fatal(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    led = RunLedger(storage, "run", CFG, tracking={"tensorboard": False, "mlflow_uri": "nosuchscheme://x"})
    led.report_metrics(ROWS[0])
    led.trackers.flush()
    assert read_jsonl(storage, "metrics.jsonl") == [ROWS[0]]
    off = [e for e in read_jsonl(storage, "events.jsonl") if e["kind"] == "tracker_off"]
    assert off and off[0]["tracker"] == "mlflow"

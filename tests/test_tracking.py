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


# -- MLflow: said at once, named after the run, artifacts at the end ---------------------------------


def _file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is an optional extra (the test extras carry it)")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for a database otherwise
    return f"file://{tmp_path / 'mlruns'}"


def _mlflow_runs(uri, experiment="digits"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_the_mlflow_run_is_named_after_the_run_and_gets_its_artifacts(tmp_path, monkeypatch):
    import json

    from test_ledger import upload

    uri = _file_store(tmp_path, monkeypatch)
    storage = Storage(str(tmp_path / "digits"))
    storage.write_bytes("spec.yaml", b"name: digits\ncheckpoint: {monitor: val_loss}\n")
    tracking = {
        "tensorboard": False,
        "mlflow_uri": uri,
        "experiment": "digits",
        "params": {"seed": 0},
        "run_name": "digits",
    }
    led = RunLedger(storage, "digits", CFG, tracking=tracking)
    for row in ROWS:
        led.commit(upload(storage, row["epoch"], row["val_loss"]))
        led.report_metrics(row)
    led.finish("finished")
    client, runs = _mlflow_runs(uri)
    assert len(runs) == 1 and runs[0].info.run_name == "digits"
    rid = runs[0].info.run_id
    assert {a.path for a in client.list_artifacts(rid)} >= {"spec.yaml", "best_checkpoint.json", "curves.png"}
    best = json.loads(open(client.download_artifacts(rid, "best_checkpoint.json", str(tmp_path))).read())
    assert (best["epoch"], best["monitor"], best["value"]) == (3, "val_loss", pytest.approx(1 / 3))
    assert best["uri"] == f"{storage.uri}/checkpoints/{best['id']}"
    run = client.get_run(rid)
    assert run.data.tags["orchestrator.best_checkpoint"] == best["uri"]
    assert run.data.metrics["best_val_loss"] == pytest.approx(1 / 3) and run.info.status == "FINISHED"
    spec = open(client.download_artifacts(rid, "spec.yaml", str(tmp_path))).read()
    assert spec.startswith("name: digits")


def test_a_replaced_run_gets_a_new_mlflow_run_and_an_interrupted_one_ends_killed(tmp_path, monkeypatch):
    from orchestrator.lifecycle import clear_run

    uri = _file_store(tmp_path, monkeypatch)
    storage = Storage(str(tmp_path / "digits"))
    tracking = {
        "tensorboard": False,
        "mlflow_uri": uri,
        "experiment": "digits",
        "params": {},
        "run_name": "digits",
    }
    led = RunLedger(storage, "digits", CFG, tracking=tracking)
    led.report_metrics(ROWS[0])
    led.finish("failed")  # failed before any commit: `orchestrator run` replaces it
    clear_run(storage)
    led = RunLedger(storage, "digits", CFG, tracking=tracking)
    led.report_metrics(ROWS[0])
    led.stop("interrupted; checkpoint at epoch 1 step 10 committed", "interrupt")
    led.finish("failed")  # what the driver records after a clean Ctrl-C/SIGTERM stop
    client, runs = _mlflow_runs(uri)
    assert [(r.info.run_name, r.info.status) for r in runs] == [("digits", "FAILED"), ("digits", "KILLED")]


@pytest.mark.parametrize(
    ("uri", "env", "says"),
    [
        ("file://{tmp}/mlruns", {}, ["refuses a file store", "MLFLOW_ALLOW_FILE_STORE=true", "sqlite:///"]),
        ("{tmp}/mlruns", {}, ["refuses a file store", "tracking server (http://HOST:5000"]),
        ("sqlite:///{tmp}/mlflow.db", {}, ["a sqlite store needs sqlalchemy", "pip install mlflow"]),
        ("nosuchscheme://x", {}, ["has no store for this URI scheme", "http(s)://HOST:PORT"]),
        ("http://127.0.0.1:9", {}, ["Connection refused", "is the tracking server running"]),
        ("file://{tmp}/mlruns", {"MLFLOW_ALLOW_FILE_STORE": "true"}, None),
    ],
)
def test_mlflow_preflight_names_the_uri_the_error_and_the_fix_in_seconds(
    tmp_path, monkeypatch, uri, env, says
):
    pytest.importorskip("mlflow", reason="mlflow is an optional extra (the test extras carry it)")
    import importlib.util
    import time

    from orchestrator.tracking import mlflow_problem

    if "sqlite" in uri and importlib.util.find_spec("sqlalchemy") is not None:
        pytest.skip("sqlalchemy is installed here: a sqlite store works")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    uri = uri.format(tmp=tmp_path)
    started = time.monotonic()
    problem = mlflow_problem(uri, "orchestrator")
    assert time.monotonic() - started < 30  # MLflow's own retries would take minutes on a dead server
    if says is None:
        assert problem is None
        return
    assert problem is not None and problem.startswith(f"tracking.mlflow_uri {uri}: ")
    assert all(s in problem for s in says) and "--set tracking.mlflow_uri=null" in problem, problem
    assert "\n" not in problem


def test_run_refuses_an_mlflow_uri_it_cannot_use_before_ray_starts(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is an optional extra (the test extras carry it)")
    from harness.cli import cli_env, run_cli

    env = cli_env()
    env.pop("MLFLOW_ALLOW_FILE_STORE", None)
    uri = f"file://{tmp_path / 'mlruns'}"
    # 64 workers never fit this machine: that refusal would come only once Ray had started
    p = run_cli(
        "run",
        "configs/digits.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "name=t",
        "--set",
        f"tracking.mlflow_uri={uri}",
        "--set",
        "scaling.num_workers=64",
        env=env,
        timeout=120,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    first = p.stderr.strip().splitlines()[0]
    assert (
        first.startswith(f"error: tracking.mlflow_uri {uri}: mlflow ") and "MLFLOW_ALLOW_FILE_STORE" in first
    )
    assert "needs 64" not in p.stderr and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "t" / "spec.yaml").exists() and not (tmp_path / "t" / "lease.json").exists()


def test_the_driver_hands_the_run_name_and_mlflow_env_on_and_says_a_tracker_that_went_off(
    tmp_path, monkeypatch, capsys
):
    from orchestrator.core.manifest import write_jsonl
    from orchestrator.driver import say_trackers_off, tracking_settings
    from orchestrator.spec import load_spec
    from orchestrator.tracking import MLFLOW_ENV

    for k in MLFLOW_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    spec = load_spec("configs/digits.yaml", [f"storage.root={tmp_path}", "name=mine"])
    settings = tracking_settings(spec)
    assert settings["run_name"] == "mine" and settings["env"] == {"MLFLOW_ALLOW_FILE_STORE": "true"}
    storage = Storage(str(tmp_path / "mine"))
    write_jsonl(
        storage,
        "events.jsonl",
        [
            {"ts": 1.0, "kind": "tracker_off", "tracker": "tensorboard", "error": "an earlier driver's"},
            {"ts": 100.0, "kind": "tracker_off", "tracker": "mlflow", "error": "MlflowException: gone"},
        ],
    )
    say_trackers_off(storage, 50.0, {"mlflow_uri": "http://mlflow:5000"})
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "[run] warning: tracker mlflow at http://mlflow:5000 was switched off: MlflowException: "
        "gone; the run's own metrics.jsonl has every epoch"
    ]

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


def test_the_driver_hands_the_run_name_and_mlflow_env_on_and_sums_up_the_trackers_that_went_off(
    tmp_path, monkeypatch, capsys
):
    from orchestrator.cli.train import _print_summary
    from orchestrator.core.manifest import write_jsonl
    from orchestrator.driver import Summary, trackers_off, tracking_settings
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
    off = trackers_off(storage, 50.0)
    assert [e["tracker"] for e in off] == ["mlflow"]
    _print_summary(Summary(run_uri=storage.uri, status="finished", trackers_off=off).as_dict(), False)
    err = capsys.readouterr().err.strip().splitlines()
    # an event written before the fix was recorded: said without one
    assert err == ["[run] tracker mlflow: off before the first epoch (MlflowException: gone)"]


# -- per step, the spec as params and hparams, and a tracker that goes off mid-run -------------------


def _tick(led, epoch, global_step, loss, steps=2, lr=None):
    step = (global_step - 1) % steps + 1
    led.tick(
        {
            "epoch": epoch,
            "step": step,
            "steps": steps,
            "global_step": global_step,
            "ts": 0.0,
            "train_loss": loss,
            **({"lr": lr} if lr is not None else {}),
        }
    )


def _digits_settings(tmp_path, **more):
    from orchestrator.driver import tracking_settings
    from orchestrator.spec import load_spec

    spec = load_spec(
        "configs/digits.yaml",
        [f"storage.root={tmp_path}", "name=mine", "storage.options={key: hunter2}"],
    )
    return {**tracking_settings(spec), "tensorboard": False, **more}


def test_the_flattened_spec_is_the_params_with_secrets_redacted(tmp_path):
    import json

    params = _digits_settings(tmp_path)["params"]
    assert params["name"] == "mine" and params["epochs"] == 10 and params["seed"] == 0
    assert params["task.name"] == "digits" and params["task.options.lr"] == 0.05
    assert params["checkpoint.monitor"] == "val_loss" and params["scaling.num_workers"] == 2
    assert params["storage.options.key"] == "***" and "hunter2" not in str(params)
    (kill,) = json.loads(params["chaos.kills"])  # a list: one JSON param
    assert (kill["rank"], kill["epoch"]) == (1, 5)
    assert all(isinstance(v, (str, int, float, bool)) for v in params.values())


def test_tensorboard_gets_the_train_loss_per_step_and_the_spec_as_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    storage = Storage(str(tmp_path / "run"))
    settings = _digits_settings(tmp_path, tensorboard=True)
    led = RunLedger(storage, "run", CFG, tracking=settings)
    for gs, loss in ((1, 0.9), (2, 0.8)):
        _tick(led, 1, gs, loss, lr=0.05)
    led.report_metrics(ROWS[0])
    _tick(led, 2, 3, 0.7, lr=0.025)
    led.finish("finished")  # uploads what the last row left behind
    local = tmp_path / "tb"
    local.mkdir()
    for n in storage.list_dirs("tb"):
        (local / n).write_bytes(storage.read_bytes(f"tb/{n}"))
    assert scalars(str(local), "step/train_loss") == [(1, 0.9), (2, 0.8), (3, 0.7)]
    assert scalars(str(local), "step/lr") == [(1, 0.05), (2, 0.05), (3, 0.025)]  # the learning rate
    assert scalars(str(local), "val_loss") == [(1, 1.0)]  # per epoch, as before
    acc = EventAccumulator(str(local))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["task.options.lr"].number_value == pytest.approx(0.05)
    assert (
        hp["checkpoint.monitor"].string_value == "val_loss"
        and hp["storage.options.key"].string_value == "***"
    )
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in exp.metric_infos] == ["val_loss", "train_loss"]


def test_mlflow_gets_the_spec_the_loss_per_step_epochs_at_their_step_and_the_best_uri(tmp_path, monkeypatch):
    from test_ledger import upload

    uri = _file_store(tmp_path, monkeypatch)
    storage = Storage(str(tmp_path / "mine"))
    settings = _digits_settings(tmp_path, mlflow_uri=uri, experiment="digits")
    led = RunLedger(storage, "mine", CFG, tracking=settings)
    gs = 0
    for row in ROWS:
        for _ in range(2):
            gs += 1
            _tick(led, row["epoch"], gs, 1.0 / gs, lr=0.1 / row["epoch"])
        led.commit(upload(storage, row["epoch"], row["val_loss"]))
        led.report_metrics(row)
    led.finish("finished")
    client, runs = _mlflow_runs(uri)
    assert len(runs) == 1 and runs[0].info.run_name == "mine"
    rid, params = runs[0].info.run_id, runs[0].data.params
    assert params["task.options.lr"] == "0.05" and params["checkpoint.monitor"] == "val_loss"
    assert params["storage.options.key"] == "***" and len(params) == len(settings["params"]) > 30  # all of it
    steps = client.get_metric_history(rid, "step/train_loss")
    assert sorted((m.step, round(m.value, 6)) for m in steps) == [(g, round(1.0 / g, 6)) for g in range(1, 7)]
    lrs = client.get_metric_history(rid, "step/lr")
    assert sorted((m.step, round(m.value, 6)) for m in lrs) == [
        (g, round(0.1 / ((g + 1) // 2), 6)) for g in range(1, 7)
    ]
    epochs = client.get_metric_history(rid, "train_loss")
    assert sorted((m.step, m.value) for m in epochs) == [(1, 2.0), (2, 1.0), (3, pytest.approx(2 / 3))]
    run = client.get_run(rid)
    assert run.data.tags["orchestrator.best_checkpoint"] == f"{storage.uri}/checkpoints/{led.best().id}"
    assert led.best().epoch == 3 and run.info.status == "FINISHED"


def _off_events(storage):
    return [e for e in read_jsonl(storage, "events.jsonl") if e["kind"] == "tracker_off"]


def test_mlflow_going_away_mid_run_is_said_once_with_the_fix_and_in_the_summary(
    tmp_path, monkeypatch, capsys
):
    import io
    import shutil

    from orchestrator.cli.train import _print_summary
    from orchestrator.driver import Summary, trackers_off
    from orchestrator.progress import ProgressView

    uri = _file_store(tmp_path, monkeypatch)
    storage = Storage(str(tmp_path / "mine"))
    led = RunLedger(
        storage, "mine", CFG, tracking=_digits_settings(tmp_path, mlflow_uri=uri, experiment="digits")
    )
    view = ProgressView(led.progress, 3, "val_loss", "min", quiet=True, out=io.StringIO(), live=False)
    led.report_metrics(ROWS[0])
    led.trackers.flush()
    shutil.rmtree(tmp_path / "mlruns")  # the tracking store is gone: every later call fails
    _tick(led, 2, 11, 0.5)
    led.trackers.flush()
    led.report_metrics(ROWS[1])  # the failure is taken up here at the latest
    view.update()
    led.report_metrics(ROWS[2])
    view.update()  # said once, not once per poll
    (off,) = _off_events(storage)
    assert off["tracker"] == "mlflow" and off["epoch"] == 1 and off["error"]
    assert uri in off["fix"] and "orchestrator metrics" in off["fix"]
    err = [line for line in capsys.readouterr().err.splitlines() if "tracker" in line]
    assert err == [f"[run] warning: tracker mlflow switched off after epoch 1: {off['error']}. {off['fix']}"]
    led.finish("finished")
    summary = Summary(run_uri=storage.uri, status="finished", trackers_off=trackers_off(storage, 0.0))
    _print_summary(summary.as_dict(), False)
    out = capsys.readouterr()
    assert f"[run] tracker mlflow: off after epoch 1 ({off['error']}). {off['fix']}" in out.err.splitlines()
    assert summary.as_dict()["trackers_off"][0]["tracker"] == "mlflow"


def test_a_tensorboard_writer_that_fails_is_switched_off_with_the_fix(tmp_path):
    import shutil

    storage = Storage(str(tmp_path / "run"))
    led = RunLedger(storage, "run", CFG, tracking={"tensorboard": True})
    led.report_metrics(ROWS[0])
    led.trackers.flush()
    shutil.rmtree(tmp_path / "run" / "tb")
    (tmp_path / "run" / "tb").write_text("not a directory")  # uploads of the event file now fail
    led.report_metrics(ROWS[1])
    led.trackers.flush()
    led.report_metrics(ROWS[2])
    (off,) = _off_events(storage)
    assert off["tracker"] == "tensorboard" and off["epoch"] == 1  # the last epoch it has
    assert f"{storage.uri}/tb" in off["fix"] and "tracking.tensorboard=false" in off["fix"]
    assert led.progress()["trackers_off"] == [off]
    assert read_jsonl(storage, "metrics.jsonl") == ROWS  # the run's own journal has every epoch


def test_the_report_page_says_which_tracker_went_off(tmp_path):
    from test_ledger import upload

    from orchestrator.api import Run
    from orchestrator.report.page import report_html

    storage = Storage(str(tmp_path / "run"))
    led = RunLedger(storage, "run", CFG, tracking={"tensorboard": False, "mlflow_uri": "nosuchscheme://x"})
    led.commit(upload(storage, 1, 1.0))
    led.report_metrics(ROWS[0])
    led.finish("finished")
    run = Run(storage.uri)
    page = report_html(run, run.metrics(as_frame=False), run.events(), run.checkpoints(), "val_loss", b"")
    assert "trackers off" in page and "mlflow (before the first epoch: " in page


def test_rank_0s_tick_carries_the_steps_train_loss():
    import torch

    from workers.calls import StepTicker

    sent: list[dict] = []
    ticker = StepTicker(sent.append, interval_s=0.0)
    ticker(1, 1, 4, 1, torch.tensor(0.25), 0.05)
    ticker(1, 2, 4, 2)  # a custom loop's session.step() without a loss
    assert sent[0]["train_loss"] == 0.25 and "train_loss" not in sent[1]
    assert sent[0]["lr"] == 0.05 and "lr" not in sent[1]
    # The loss as the loop has it, still in the autograd graph: read without torch's warning
    # (it reached every run's console as `[rank 0] ... UserWarning: Converting a tensor with
    # requires_grad=True to a scalar`).
    import warnings

    w = torch.tensor(2.0, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ticker(1, 3, 4, 3, w * 0.5)
    assert sent[2]["train_loss"] == 1.0

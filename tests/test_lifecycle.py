"""A run's life as the read side tells it (interrupted, stale), `orchestrator delete`, and
`run` replacing a run that failed before committing anything. Real storage in a temp dir,
runs written by the real ledger and lease, the real CLI; no Ray."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from test_ledger import upload

from harness.cli import ROOT, run_cli
from orchestrator.coordinator import RetentionConfig, RunLedger
from orchestrator.core.lease import LEASE, Lease
from orchestrator.core.procs import pid_namespace
from orchestrator.core.storage import Storage

CFG = RetentionConfig("val_loss", "min", top_k=2, keep_latest=1)


def leased_run(tmp_path, name="r", epochs=(1, 2)):
    """A run as a driver writes it: the manifest claimed under a lease, checkpoints committed.
    The lease's heartbeat is stopped (the driver 'stalls'); the lease object is returned."""
    storage = Storage(str(tmp_path / name))
    lease = Lease(storage, ttl_s=30)
    lease.acquire()
    lease.stop_heartbeat()
    led = RunLedger(storage, name, CFG, owner=lease.token)
    led.start_attempt(2)
    for epoch in epochs:
        led.commit(upload(storage, epoch, 1.0 / epoch))
        led.report_metrics({"epoch": epoch, "val_loss": 1.0 / epoch, "attempt": 1})
    storage.write_bytes("spec.yaml", f"name: {name}\n".encode())
    return storage, led, lease


def hand_written_lease(storage, age_s=0.0, **fields):
    body = {
        "host": "elsewhere",
        "pid": 4242,
        "pid_ns": None,
        "pid_start": None,
        "token": "t",
        "since": time.time() - age_s,
        "heartbeat": time.time() - age_s,
        "ttl_s": 30,
        **fields,
    }
    storage.write_bytes(LEASE, json.dumps(body).encode())
    then = time.time() - age_s
    os.utime(storage.path(LEASE), (then, then))


def runs_json(root):
    return {r["name"]: r for r in json.loads(run_cli("runs", str(root), "--json", check=True).stdout)}


def test_an_interrupted_run_shows_interrupted_and_the_resume_command(tmp_path):
    storage, led, lease = leased_run(tmp_path)
    led.stop("interrupted; checkpoint at epoch 2 step 20 committed", "interrupt")
    led.finish("failed")  # what the driver does after a clean Ctrl-C/SIGTERM stop
    lease.release()
    row = runs_json(tmp_path)["r"]
    assert (row["status"], row["state"]) == ("failed", "interrupted")  # stored as it was
    assert (
        row["next"] == f"orchestrator resume {storage.uri}"
        and "interrupted; checkpoint" in row["state_detail"]
    )
    table = run_cli("runs", str(tmp_path), check=True).stdout.splitlines()[1]
    assert table.split()[:2] == ["r", "interrupted"] and f"orchestrator resume {storage.uri}" in table
    text = run_cli("checkpoints", storage.uri, check=True).stdout.splitlines()
    assert text[0].startswith(f"{storage.uri}  (interrupted,") and "orchestrator resume" in text[1]
    out = json.loads(run_cli("checkpoints", storage.uri, "--json", check=True).stdout)
    assert (out["status"], out["state"]) == ("failed", "interrupted")
    from orchestrator import open_run

    run = open_run(storage.uri)
    assert run.status == "failed" and run.state().state == "interrupted"


def test_a_failed_run_is_failed_not_interrupted(tmp_path):
    storage, led, lease = leased_run(tmp_path)
    led.stop("val_loss is nan at epoch 2", "nan")
    led.finish("failed")
    lease.release()
    row = runs_json(tmp_path)["r"]
    assert row["state"] == "failed" and "when the cause is fixed, orchestrator resume" in row["next"]


def test_a_running_run_whose_lease_is_stale_shows_stale_and_nothing_is_written(tmp_path):
    storage, _, _ = leased_run(tmp_path)
    hand_written_lease(storage, age_s=120)  # a driver on another host, silent for 2 minutes
    before = {p: (tmp_path / "r" / p).read_bytes() for p in ("manifest.json", LEASE)}
    listing = sorted(os.listdir(tmp_path / "r"))
    row = runs_json(tmp_path)["r"]
    assert (row["status"], row["state"]) == ("running", "stale")
    assert "driver gone: pid 4242 on elsewhere, lease stale for 12" in row["state_detail"]
    assert "ttl 30s" in row["state_detail"] and row["next"] == f"orchestrator resume {storage.uri}"
    table = run_cli("runs", str(tmp_path), check=True).stdout.splitlines()[1]
    assert table.split()[:2] == ["r", "stale"] and "lease stale for" in table
    from orchestrator import open_run

    assert open_run(storage.uri).state().state == "stale"
    # read-only: the manifest and the lease are as they were, and no clock probe is left over
    assert {p: (tmp_path / "r" / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path / "r")) == listing


def test_stale_by_a_gone_pid_on_this_host_or_a_missing_lease_and_running_while_alive(tmp_path):
    storage, _, lease = leased_run(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    hand_written_lease(
        storage, host=socket.gethostname(), pid=dead.pid, pid_ns=pid_namespace(), pid_start=1.0
    )
    row = runs_json(tmp_path)["r"]
    assert row["state"] == "stale" and "(this host), and that process is gone" in row["state_detail"]
    storage.delete(LEASE)  # a driver stopped at once (a second Ctrl-C) releases it without the end
    row = runs_json(tmp_path)["r"]
    assert row["state"] == "stale" and "no lease" in row["state_detail"]
    live = Lease(storage, ttl_s=30)
    live.acquire()  # a live driver (this process) holds it now
    try:
        row = runs_json(tmp_path)["r"]
        assert (row["state"], row["state_detail"], row["next"]) == ("running", None, None)
    finally:
        live.release()


def failed_before_any_commit(tmp_path, name="bad"):
    """A run stopped by the workers before its first step (a wrong monitor), as it is stored."""
    storage = Storage(str(tmp_path / name))
    lease = Lease(storage, ttl_s=30)
    lease.acquire()
    led = RunLedger(storage, name, CFG, owner=lease.token)
    led.start_attempt(2)
    led.stop("checkpoint.monitor 'val_los' is not a metric of the task; it reports: val_loss", "input")
    led.finish("failed")
    lease.release()
    storage.write_bytes("spec.yaml", f"name: {name}\n".encode())
    return storage


def test_delete_a_run_that_failed_before_committing_anything(tmp_path):
    storage = failed_before_any_commit(tmp_path)
    row = runs_json(tmp_path)["bad"]
    assert row["state"] == "failed" and row["checkpoints"] == 0
    assert f"orchestrator delete {storage.uri}" in row["next"] and "replaces it" in row["next"]
    assert "monitor 'val_los'" in row["state_detail"]
    out = json.loads(run_cli("delete", storage.uri, "--json", check=True).stdout)
    assert out["deleted"] and out["checkpoints"] == 0 and out["state"] == "failed"
    assert "manifest.json" in out["removed"] and "events.jsonl" in out["removed"]
    assert not (tmp_path / "bad").exists()
    assert run_cli("runs", str(tmp_path), "--json", check=True).stdout.strip() == "[]"


def test_delete_asks_for_yes_when_checkpoints_would_go(tmp_path):
    storage, led, lease = leased_run(tmp_path)
    led.finish("finished")
    lease.release()
    p = run_cli("delete", storage.uri)  # stdin is not a terminal here: refused, not asked
    assert p.returncode == 2, p.stdout + p.stderr
    assert "holds a finished run with 2 committed checkpoint(s)" in p.stderr and "--yes" in p.stderr
    assert (tmp_path / "r" / "manifest.json").exists() and not (tmp_path / "r" / LEASE).exists()
    p = run_cli("delete", storage.uri, "--yes", check=True)
    assert p.stdout.strip() == f"deleted {storage.uri} (finished run, 2 committed checkpoint(s))"
    assert not (tmp_path / "r").exists()


def test_delete_refuses_a_run_a_live_driver_owns_and_takes_a_dead_ones_lease(tmp_path):
    storage = failed_before_any_commit(tmp_path)
    live = Lease(storage, ttl_s=30)
    live.acquire()  # a driver (this process) is resuming it
    try:
        p = run_cli("delete", storage.uri, "--yes")
        assert p.returncode == 3, p.stdout + p.stderr
        assert (
            "is in use by driver pid" in p.stderr and "delete removes a run only while no driver" in p.stderr
        )
        assert (tmp_path / "bad" / "manifest.json").exists()
    finally:
        live.release()
    hand_written_lease(storage, age_s=120)  # its driver died: the stale lease is taken over
    run_cli("delete", storage.uri, check=True)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("target", ["nothing-here", "a-root"])
def test_delete_refuses_what_is_not_a_run(tmp_path, target):
    storage = failed_before_any_commit(tmp_path / "a-root")  # a root holding one run
    p = run_cli("delete", str(tmp_path / target))
    assert p.returncode == 2 and "no manifest.json or spec.yaml here, so not a run" in p.stderr, p.stderr
    assert (tmp_path / "a-root" / "bad" / "manifest.json").exists() and storage.exists("manifest.json")


def _spec(tmp_path, name):
    from orchestrator.spec import load_spec

    return load_spec("configs/digits.yaml", [f"storage.root={tmp_path}", f"name={name}", "chaos.kills=[]"])


def test_run_replaces_a_run_that_failed_before_committing_anything(tmp_path, capsys):
    from orchestrator.driver import claim_run

    storage = failed_before_any_commit(tmp_path)
    assert storage.exists("manifest.backup.json") and storage.exists("events.jsonl")
    lease, why = claim_run(_spec(tmp_path, "bad"), storage, resume=False)
    try:
        assert why and "a failed run with no committed checkpoint" in why and "val_los" in why
        assert f"{storage.uri} held a failed run with no committed checkpoint" in capsys.readouterr().err
        # nothing of the old run is left for the new one's coordinator to read, the lease held
        assert sorted(os.listdir(tmp_path / "bad")) == sorted([LEASE, f"{LEASE}.lock"])
    finally:
        lease.release()


def stale_before_any_commit(tmp_path, name="st"):
    """A run whose driver died before its first commit: stored running, its lease gone stale."""
    storage = Storage(str(tmp_path / name))
    lease = Lease(storage, ttl_s=30)
    lease.acquire()
    lease.stop_heartbeat()
    RunLedger(storage, name, CFG, owner=lease.token).start_attempt(2)
    storage.write_bytes("spec.yaml", f"name: {name}\n".encode())
    hand_written_lease(storage, age_s=120)  # its driver, on another host, silent for 2 minutes
    return storage


def test_run_force_replaces_a_stale_run_that_committed_nothing_and_only_that(tmp_path, capsys):
    """`run` refuses a stale run with nothing committed, naming --force; `run --force` replaces
    it; --force never replaces a run with a committed checkpoint."""
    from orchestrator.driver import claim_run
    from orchestrator.spec import SpecError

    storage = stale_before_any_commit(tmp_path)
    assert runs_json(tmp_path)["st"]["state"] == "stale"
    with pytest.raises(SpecError) as e:
        claim_run(_spec(tmp_path, "st"), storage, resume=False)
    assert "already holds a running run (0 committed checkpoint(s))" in str(e.value)
    assert "--force replaces it, as it committed nothing" in str(e.value)
    assert storage.exists("manifest.json")  # refused: untouched
    lease, why = claim_run(_spec(tmp_path, "st"), storage, resume=False, force=True)
    try:
        assert why and why.startswith("a running run (--force) with no committed checkpoint")
        assert f"{storage.uri} held a running run (--force)" in capsys.readouterr().err
        assert sorted(os.listdir(tmp_path / "st")) == sorted([LEASE, f"{LEASE}.lock"])
    finally:
        lease.release()
    storage, led, lease = leased_run(tmp_path, "kept")
    hand_written_lease(storage, age_s=120)
    with pytest.raises(SpecError) as e:
        claim_run(_spec(tmp_path, "kept"), storage, resume=False, force=True)
    assert "(2 committed checkpoint(s))" in str(e.value) and "--force" not in str(e.value)
    assert len(json.loads((tmp_path / "kept" / "manifest.json").read_text())["checkpoints"]) == 2


def test_run_force_is_on_the_command_line():
    out = run_cli("run", "--help", check=True).stdout
    assert "--force" in out and "Replace a run at RUN_URI" in out


def test_run_still_refuses_a_run_with_checkpoints_naming_resume_and_delete(tmp_path):
    from orchestrator.driver import claim_run
    from orchestrator.spec import SpecError

    storage, led, lease = leased_run(tmp_path, "r")
    led.finish("failed")
    lease.release()
    with pytest.raises(SpecError) as e:
        claim_run(_spec(tmp_path, "r"), storage, resume=False)
    assert "already holds a failed run (2 committed checkpoint(s))" in str(e.value)
    said = str(e.value)
    assert f"orchestrator resume {storage.uri}" in said and f"orchestrator delete {storage.uri}" in said
    assert storage.exists("manifest.json") and not storage.exists(LEASE)  # untouched, lease released


@pytest.mark.e2e
def test_a_wrong_monitor_then_the_corrected_spec_replaces_the_run_and_mlflow_gets_it(tmp_path, monkeypatch):
    """The newcomer's path, for real: a run with a misspelt monitor is refused before Ray starts,
    leaving no run (it used to fail on the workers 24 s in, leaving a failed one); a failed run
    with no commit (as those were left) is listed with what to do; `run` of the corrected spec
    replaces it and trains, into an MLflow run named after it, with its artifacts."""
    from orchestrator.core.manifest import Manifest, write_manifest
    from orchestrator.driver import store_spec
    from orchestrator.spec import load_spec

    pytest.importorskip("mlflow", reason="mlflow is an optional extra (the test extras carry it)")
    from harness.cli import cli_env, jsonl

    uri = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store, for the test (and its reader)
    env = cli_env()
    args = [
        "run",
        "configs/digits.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "name=newbie",
        "--set",
        "chaos.kills=[]",
        "--set",
        "epochs=2",
        "--set",
        f"tracking.mlflow_uri={uri}",
        "--set",
        "tracking.mlflow_experiment=newbie",
    ]
    p = run_cli(*args, "--set", "checkpoint.monitor=val_los", env=env, timeout=300)
    assert p.returncode == 2 and "val_los" in p.stderr, p.stdout + p.stderr[-3000:]
    assert "checkpoint.monitor 'val_los' is not a metric of task 'digits'" in p.stderr
    assert "[run] newbie:" not in p.stdout and "newbie" not in runs_json(
        tmp_path
    )  # before Ray, nothing stored
    overrides = [a for a in args[2:] if a != "--set"] + ["checkpoint.monitor=val_los"]
    spec = load_spec(ROOT / "configs" / "digits.yaml", overrides)
    storage = spec.open_run_storage()
    store_spec(storage, spec)
    stopped = {"reason": "checkpoint.monitor 'val_los' is not a metric of task 'digits'", "kind": "input"}
    write_manifest(storage, Manifest(run="newbie", status="failed", stopped=stopped))
    row = runs_json(tmp_path)["newbie"]
    assert (row["state"], row["checkpoints"]) == ("failed", 0) and "replaces it" in row["next"]
    p = run_cli(*args, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert "held a failed run with no committed checkpoint" in p.stderr and "replacing it" in p.stderr
    run_dir = tmp_path / "newbie"
    started = [e for e in jsonl(run_dir / "events.jsonl") if e["kind"] == "driver_started"]
    assert len(started) == 1 and "val_los" in started[0]["replaced"]  # the old run's events are gone
    assert runs_json(tmp_path)["newbie"]["state"] == "finished"
    client, runs = _mlflow(uri, "newbie")  # the refused run made none
    assert [(r.info.run_name, r.info.status) for r in runs] == [("newbie", "FINISHED")]
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"spec.yaml", "best_checkpoint.json", "curves.png"} <= arts


def _mlflow(uri, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_stale_and_delete_on_s3_leave_a_sibling_run_alone(s3_env, bucket):
    root = f"s3://{bucket}/runs"
    storage = Storage(f"{root}/r")
    lease = Lease(storage, ttl_s=30)
    lease.acquire()
    lease.stop_heartbeat()
    led = RunLedger(storage, "r", CFG, owner=lease.token)
    led.commit(upload(storage, 1, 0.5))
    sibling = Storage(f"{root}/r2")  # a run whose name starts with the other's
    RunLedger(sibling, "r2", CFG).commit(upload(sibling, 1, 0.5))
    body = {"host": "elsewhere", "pid": 1, "token": "t", "since": 0, "heartbeat": 0, "ttl_s": 1}
    storage.write_bytes(LEASE, json.dumps(body).encode())
    time.sleep(3)  # stale by the store's clock (S3: the response's Date against LastModified)
    rows = {r["name"]: r for r in json.loads(run_cli("runs", root, "--json", check=True).stdout)}
    assert rows["r"]["state"] == "stale" and "lease stale for" in rows["r"]["state_detail"]
    assert rows["r2"]["state"] == "running"  # no owner in its manifest: shown as stored
    p = run_cli("delete", f"{root}/r", "--json")
    assert p.returncode == 2 and "1 committed checkpoint(s)" in p.stderr, p.stderr
    out = json.loads(run_cli("delete", f"{root}/r", "--yes", "--json", check=True).stdout)
    assert out["deleted"] and out["state"] == "stale" and out["checkpoints"] == 1
    assert Storage(root).list_dirs("") == ["r2"] and sibling.exists("manifest.json")
    assert sibling.exists("checkpoints/epoch0001-step0000010/model.pt")

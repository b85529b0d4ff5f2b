"""Runs on a multi-node Ray cluster and the Jobs API path, with real processes.

One cluster (a head plus worker nodes on this machine, free ports, token auth; see
harness.cluster) serves the module; it is shut down at the end and no process it started may
survive. On it: a run submitted over the Jobs API, a driver killed under --max-retries, a
driver killed and resumed by hand, and a node (raylet) killed under a training worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness.cli import ROOT, expected_kept, jsonl, manifest, run_cli, start_cli, wait_until
from harness.cluster import (
    LocalCluster,
    alive_actors,
    committed,
    events,
    free_ports,
    local_cluster,
    node_states,
    stop,
)
from orchestrator.cli import jobs

RUN_SETS = ["--set", "chaos.kills=[]", "--set", "scaling.num_workers=2"]


def submit(c: LocalCluster, root: Path, name: str, *extra: str) -> dict[str, Any]:
    """`orchestrator submit configs/digits.yaml` to the test cluster, storage under root."""
    p = run_cli(
        "submit",
        "configs/digits.yaml",
        "--address",
        c.dashboard,
        "--json",
        "--set",
        f"storage.root={root}",
        "--set",
        f"name={name}",
        *RUN_SETS,
        *extra,
        env=c.env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout))


def _job_status(c: LocalCluster, job_id: str) -> dict[str, Any]:
    p = run_cli("status", job_id, "--address", c.dashboard, "--json", env=c.env, timeout=60)
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout))


def _wait_job(c: LocalCluster, job_id: str, timeout: float = 240) -> dict[str, Any]:
    end = time.time() + timeout
    while time.time() < end:
        st = _job_status(c, job_id)
        if st["status"] in jobs.TERMINAL:
            return st
        time.sleep(3)
    raise AssertionError(f"job {job_id} not finished after {timeout}s")


def _stop_job(c: LocalCluster, job_id: str) -> None:
    """Stop the job if it still runs (the test started it, the test ends it)."""
    if _job_status(c, job_id)["status"] not in jobs.TERMINAL:
        run_cli("stop", job_id, "--address", c.dashboard, env=c.env, timeout=90)


@pytest.fixture(scope="module")
def ray_cluster():
    """A head plus one worker node, shared by this module's cluster tests."""
    with local_cluster(workers=1) as info:
        yield info


# -- no cluster needed -----------------------------------------------------------------------


def test_bad_spec_fails_before_contacting_the_cluster(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nepochs: 0\nscaling: {num_workers: 2, bogus: 1}\n")
    nobody = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens: contacting it exits 5
    t0 = time.time()
    p = run_cli("submit", str(bad), "--address", nobody, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "epochs" in p.stderr and "scaling.bogus: unknown field" in p.stderr
    assert "Jobs API" not in p.stderr and time.time() - t0 < 30
    p = run_cli(
        "submit",
        "configs/digits.yaml",
        "--set",
        "chaos.kills=[{rank: 5, epoch: 1}]",
        "--address",
        nobody,
        timeout=60,
    )
    assert p.returncode == 2 and "chaos.kills.0.rank" in p.stderr
    # A good spec does try the cluster, and says it cannot reach it.
    p = run_cli("submit", "configs/digits.yaml", "--address", nobody, timeout=60)
    assert p.returncode == jobs.EXIT_API and "cannot reach the Ray Jobs API" in p.stderr


def test_shipped_spec_drops_secrets_and_relativizes_file_tasks(tmp_path, monkeypatch):
    from orchestrator.spec import load_spec

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "task.py").write_text("def build(ctx):\n    pass\n")
    cfg = tmp_path / "spec.yaml"
    cfg.write_text(
        "name: t\ntask: {name: pkg/task.py:build}\n"
        "storage: {root: s3://b/runs, options: {endpoint_url: 'http://s3:9000', secret: shh,"
        " client_kwargs: {aws_secret_access_key: shh2, region_name: x}}}\n"
    )
    monkeypatch.chdir(tmp_path)
    data, wd, warnings = jobs._shipped_spec(load_spec(cfg), None)
    assert wd == str(tmp_path) and data["task"]["name"] == "pkg/task.py:build"
    assert data["storage"]["options"] == {
        "endpoint_url": "http://s3:9000",
        "client_kwargs": {"region_name": "x"},
    }
    assert "shh" not in json.dumps(data) and "secret" in warnings[0]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(ValueError, match="not inside the working dir"):
        jobs._shipped_spec(load_spec(cfg), str(outside))


def test_default_address(monkeypatch):
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert jobs.default_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not the Jobs API
    assert jobs.default_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert jobs.default_address(None) == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://api:443")
    assert jobs.default_address(None) == "https://api:443"
    assert jobs.default_address("h:1") == "http://h:1"


# -- on the cluster --------------------------------------------------------------------------


@pytest.mark.e2e
def test_submit_to_a_head_whose_job_agent_cannot_serve(tmp_path):
    """The head's dashboard agent finds its port taken: it stays up without its HTTP server and
    Ray answers every submit "No available agent". submit waits a while, then names the agent,
    its log and the likely cause (exit 5), instead of Ray's bare 500."""
    import socket

    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        with local_cluster(workers=0, head_agent_port=held.getsockname()[1]) as c:
            p = run_cli(
                "submit",
                "configs/digits.yaml",
                "--address",
                c.dashboard,
                "--set",
                f"storage.root={tmp_path}",
                env=c.env,
                timeout=180,
            )
    assert p.returncode == jobs.EXIT_API, p.stdout + p.stderr
    assert "job agent is not up yet" in p.stderr, p.stderr
    assert "dashboard agent" in p.stderr and "dashboard_agent.log" in p.stderr and "port conflict" in p.stderr


@pytest.mark.e2e
def test_submit_runs_on_the_cluster(ray_cluster, tmp_path):
    c = ray_cluster
    name = f"jobs-{os.getpid()}-{int(time.time())}"
    sub = submit(c, tmp_path, name, "--set", "epochs=3")
    job_id, run_uri = sub["job_id"], sub["run_uri"]
    assert run_uri == str(tmp_path / name)
    try:
        st = _wait_job(c, job_id)
        logs = run_cli("logs", job_id, "--address", c.dashboard, env=c.env, timeout=60).stdout
        assert st["status"] == "SUCCEEDED", logs[-4000:]
        assert "[run] finished: 3 epochs" in logs
        assert st["run_uri"] == run_uri and st["progress"]["status"] == "finished"
        ck = run_cli("checkpoints", run_uri, "--json", env=c.env, timeout=60)
        assert ck.returncode == 0, ck.stderr
        rows = json.loads(ck.stdout)["checkpoints"]
        assert [r["epoch"] for r in rows] == [1, 2, 3] and all(r["kept_because"] for r in rows)
        listed = json.loads(run_cli("list", "--json", "--address", c.dashboard, env=c.env, timeout=60).stdout)
        assert job_id in [r["job_id"] for r in listed]
    finally:
        _stop_job(c, job_id)


@pytest.mark.e2e
def test_plain_ray_job_submit_with_a_relative_root_is_refused_clearly(ray_cluster, tmp_path):
    # What a Ray user tries first. With storage.root "runs" the checkpoints would land in
    # Ray's temporary copy of the working dir, which Ray deletes after the job.
    c = ray_cluster
    wd = tmp_path / "wd"
    (wd / "configs").mkdir(parents=True)
    (wd / "configs" / "digits.yaml").write_text((ROOT / "configs" / "digits.yaml").read_text())
    ray = str(Path(sys.executable).parent / "ray")
    p = subprocess.run(
        [
            ray,
            "job",
            "submit",
            "--address",
            c.dashboard,
            "--working-dir",
            str(wd),
            "--",
            sys.executable,
            "-m",
            "orchestrator",
            "run",
            "configs/digits.yaml",
        ],
        env=c.env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert "storage.root" in out and "'runs' is relative" in out and "deletes after the job" in out, out[
        -3000:
    ]
    assert not list(wd.rglob("manifest.json"))


@pytest.mark.e2e
def test_submit_ships_a_file_task_in_the_working_dir(ray_cluster, tmp_path):
    c = ray_cluster
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "mytask.py").write_text(
        "from workers.tasks.digits import build as _build\n\n\n"
        "def build(*args, **kwargs):\n"
        "    print('[mytask] built from the uploaded copy', flush=True)\n"
        "    return _build(*args, **kwargs)\n"
    )
    name = f"filetask-{os.getpid()}-{int(time.time())}"
    job_id = submit(
        c,
        tmp_path,
        name,
        "--verbose",
        "--working-dir",
        str(wd),
        "--set",
        f"task.name={wd / 'mytask.py'}:build",
        "--set",
        "epochs=1",
    )["job_id"]
    try:
        st = _wait_job(c, job_id)
        logs = run_cli("logs", job_id, "--address", c.dashboard, env=c.env, timeout=60).stdout
        assert st["status"] == "SUCCEEDED", logs[-4000:]
        assert "[mytask] built from the uploaded copy" in logs and "[run] finished: 1 epochs" in logs
        stored = (tmp_path / name / "spec.yaml").read_text()
        assert "working_dir_files" in stored and str(wd) not in stored  # ran the shipped copy
    finally:
        _stop_job(c, job_id)


@pytest.mark.e2e
def test_max_retries_resumes_after_the_driver_is_killed(ray_cluster, tmp_path):
    c = ray_cluster
    name = f"retry-{os.getpid()}-{int(time.time())}"
    run_dir = tmp_path / name
    job_id = submit(c, tmp_path, name, "--max-retries", "1", "--set", "epochs=8")["job_id"]
    try:
        wait_until(lambda: len(committed(run_dir)) >= 2, 180, "2 committed checkpoints")

        def driver() -> Any:
            # The job's driver: `python -m orchestrator run <spec>` whose parent is the
            # supervisor of this run.
            for proc in psutil.process_iter(["cmdline"]):
                try:
                    cmd = proc.info["cmdline"] or []
                    parent = proc.parent() if cmd[1:4] == ["-m", "orchestrator", "run"] else None
                    if parent is not None and str(run_dir) in parent.cmdline():
                        return proc
                except psutil.Error:
                    continue
            return None

        d = driver()
        assert d is not None, "the job's driver process was not found"
        d.send_signal(signal.SIGKILL)
        st = _wait_job(c, job_id, timeout=300)
        logs = run_cli("logs", job_id, "--address", c.dashboard, env=c.env, timeout=60).stdout
        assert st["status"] == "SUCCEEDED", logs[-4000:]
        assert "[supervise] driver killed by SIGKILL; resuming" in logs
        assert "[run] finished: 8 epochs" in logs
        second = [e for e in events(run_dir, "attempt_started") if e["attempt"] == 2]
        assert second and second[0]["restore"] and second[0]["restore_epoch"] >= 2
        assert events(run_dir, "lease_taken_over"), "the dead driver's lease was not taken over"
    finally:
        _stop_job(c, job_id)


@pytest.mark.e2e
def test_resume_after_the_driver_is_killed(ray_cluster, tmp_path):
    c = ray_cluster
    name = "driverkill"
    run_dir = tmp_path / name
    drv = start_cli(
        "run",
        "configs/digits.yaml",
        "--address",
        c.address,
        "--quiet",
        "--set",
        "epochs=10",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        f"name={name}",
        *RUN_SETS,
        log=tmp_path / "driver.log",
        env=c.env,
    )
    try:
        wait_until(
            lambda: len(committed(run_dir)) >= 2 or drv.poll() is not None, 180, "2 committed checkpoints"
        )
        assert drv.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
        seen = max(r["epoch"] for r in committed(run_dir))
        os.kill(drv.pid, signal.SIGKILL)
        drv.wait(timeout=30)
        # Its actors (coordinator, Ray Train controller and workers) die with it.
        wait_until(
            lambda: not alive_actors(c, "RayTrainWorker", "TrainController", "Coordinator"),
            90,
            "the dead driver's actors gone",
            interval=2,
        )
        latest = max(r["epoch"] for r in committed(run_dir))
        assert latest >= seen and manifest(run_dir)["status"] == "running"
        assert latest < 10, "the run finished before its driver was killed"
        p = run_cli("resume", str(run_dir), "--address", c.address, "--json", env=c.env, timeout=400)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
        assert json.loads(p.stdout)["status"] == "finished"
    finally:
        stop(drv)
    starts = events(run_dir, "driver_started")
    assert [s["resume"] for s in starts] == [False, True]
    attempt = [e for e in events(run_dir, "attempt_started") if e["ts"] > starts[1]["ts"]][0]
    assert attempt["restore"] is not None and attempt["restore_epoch"] == latest
    # Resumed, not restarted: epochs up to `latest` were trained once, by attempt 1.
    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == list(range(1, 11))
    assert all(m["attempt"] == 1 for m in metrics if m["epoch"] <= latest)
    assert all(m["attempt"] == attempt["attempt"] for m in metrics if m["epoch"] > latest)
    # The final manifest holds exactly best-3 by val_loss plus the latest, and nothing else is
    # left on disk.
    want = expected_kept(metrics, "val_loss", "min", top_k=3)
    m = manifest(run_dir)
    assert m["status"] == "finished"
    assert {r["epoch"] for r in m["checkpoints"]} == want
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {r["id"] for r in m["checkpoints"]}


@pytest.mark.e2e
def test_run_survives_losing_a_node(ray_cluster, tmp_path):
    c = ray_cluster
    # A second worker node: with the head's CPU there are 3, and a lost node leaves 2.
    c.add_node()
    name = "nodekill"
    run_dir = tmp_path / name
    drv = start_cli(
        "run",
        "configs/digits.yaml",
        "--address",
        c.address,
        "--quiet",
        "--set",
        "epochs=12",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        f"name={name}",
        "--set",
        "failure.max_failures=3",
        *RUN_SETS,
        log=tmp_path / "driver.log",
        env=c.env,
    )
    try:
        wait_until(
            lambda: len(committed(run_dir)) >= 2 or drv.poll() is not None, 180, "2 committed checkpoints"
        )
        assert drv.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
        hosts = [a["node_id"] for a in alive_actors(c, "RayTrainWorker") if c.name_of(a["node_id"]) != "head"]
        assert hosts, "no training worker on a worker node"
        victim, victim_id = c.name_of(hosts[0]), hosts[0]
        before = max(r["epoch"] for r in committed(run_dir))
        c.kill_node(victim)  # SIGKILL its raylet; returns once none of its processes is left
        c.add_node()  # the replacement
        rc = drv.wait(timeout=400)
        log = (tmp_path / "driver.log").read_text()
        assert rc == 0, log[-5000:]
    finally:
        stop(drv)
    assert before < 12, "the run finished before the node was killed"
    restarts = events(run_dir, "restart")
    assert restarts, "no restart recorded"
    second = [e for e in events(run_dir, "attempt_started") if e["attempt"] == 2][0]
    assert second["restore"] is not None and second["restore_epoch"] >= max(2, before)
    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == list(range(1, 13))
    # Training went on past the restored epoch with attempt 2; nothing before it was redone.
    assert all(m["attempt"] == 1 for m in metrics if m["epoch"] <= second["restore_epoch"])
    assert all(m["attempt"] >= 2 for m in metrics if m["epoch"] > second["restore_epoch"])
    assert not c.processes(victim) and node_states(c)[victim_id] == "DEAD"

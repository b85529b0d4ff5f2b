"""A local multi-node Ray cluster for tests (`orchestrator cluster up`), and what tests
ask of it: live actors and where they run, a run's commits and events, stopping what a
test started, by pid."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import cli_env, jsonl, manifest, run_cli

from orchestrator import cluster as cl


def committed(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return list(manifest(run_dir)["checkpoints"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in jsonl(run_dir / "events.jsonl") if e["kind"] == kind]


def recorded(state_file: Path) -> list[tuple[int, float]]:
    """(pid, start time) of every process of every node recorded in the state file now."""
    state = cl.read_state(state_file) or {"nodes": []}
    out: set[tuple[int, float]] = set()
    for n in state["nodes"]:
        for key in ("pid", "raylet_pid", "gcs_pid"):
            if n.get(key) and cl.pid_alive(n[key], n.get(key.replace("pid", "create_time"))):
                out.add((n[key], n[key.replace("pid", "create_time")]))
        out |= {(p.pid, p.create_time()) for p in cl.node_processes(n)}
    return sorted(out)


_LIST_ACTORS = """
import json, sys
from ray.util.state import list_actors
actors = list_actors(address=sys.argv[1], filters=[("state", "=", "ALIVE")], limit=10000,
                     raise_on_missing_output=False)
print(json.dumps([{"class_name": a.class_name, "node_id": a.node_id} for a in actors]))
"""


def alive_actors(c: dict[str, Any], *classes: str) -> list[dict[str, Any]]:
    """Live actors of these classes and the Ray node each is on (Ray's state API, asked from
    a subprocess with the cluster's token-auth environment)."""
    p = subprocess.run(
        [sys.executable, "-c", _LIST_ACTORS, c["dashboard"]],
        env=c["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return [a for a in json.loads(p.stdout.strip().splitlines()[-1]) if a["class_name"] in classes]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End a CLI process this test started (its own process group), by its pid."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


@contextlib.contextmanager
def local_cluster(
    tmp: Path, workers: int, head_num_cpus: int | None = None, **extra_env: str
) -> Iterator[dict[str, Any]]:
    """`orchestrator cluster up` on free ports; `cluster down` at the end, asserting that no
    process it (or add-node) started survives."""
    state_file = tmp / "cluster.json"
    # RAY_AUTH_MODE=token for plain `python -c 'import ray ...'` helpers (the CLI finds the
    # token itself).
    env = cli_env(ORCHESTRATOR_CLUSTER_STATE=str(state_file), RAY_AUTH_MODE="token", **extra_env)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    port, dash = cl.free_ports(2)
    args = ["--workers", str(workers), "--port", str(port), "--dashboard-port", str(dash)]
    if head_num_cpus is not None:
        args += ["--head-num-cpus", str(head_num_cpus)]
    p = run_cli("cluster", "up", *args, "--json", env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    state = json.loads(p.stdout)
    info = {
        "env": env,
        "state_file": state_file,
        "address": state["address"],
        "dashboard": state["dashboard_url"],
        "port": port,
        "dashboard_port": dash,
        "tmp": tmp,
    }
    try:
        yield info
    finally:
        started = recorded(state_file)
        d = run_cli("cluster", "down", "--json", env=env, timeout=180)
        survivors = [pid for pid, t in started if cl.pid_alive(pid, t)]
        assert d.returncode == 0, d.stdout + d.stderr
        assert started and not survivors, f"still running after `cluster down`: {survivors}"
        assert not state_file.exists()

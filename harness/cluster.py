"""A multi-node Ray cluster on this machine for tests (Ray's `ray.cluster_utils.Cluster`: a head
with the Jobs API, worker nodes, free ports, token auth), and what tests ask of it: live actors
and their nodes, a run's commits and events, stopping what a test started, by pid.

A node's processes are those Ray's Node started (it stops them by pid), their descendants, and
whatever carries ORCH_TEST_NODE=<cluster>:<node> in its environment (a raylet passes it on to
workers, job supervisors and drivers: orphans of a dead raylet are found too). Teardown checks
that none survives. Never `ray stop`: other clusters may be running on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import psutil

from harness.cli import cli_env, jsonl, manifest, wait_until
from orchestrator.core.procs import pid_alive

MARK = "ORCH_TEST_NODE"


def free_ports(n: int) -> list[int]:
    """n distinct ports nobody listens on now (held open together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("0.0.0.0", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ensure_token() -> None:
    """~/.ray/auth_token, as `ray start --head` (token auth) and its clients read it."""
    path = Path.home() / ".ray" / "auth_token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(secrets.token_hex(32))


def _alive(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return pid_alive(p.pid, p.create_time())
    return False


def _reload_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE into its config once (this process asks the GCS when nodes are up)."""
    from ray._raylet import Config  # type: ignore[attr-defined]  # see orchestrator/ray_compat.py

    Config.initialize("")


class LocalCluster:
    """address: the GCS (`run --address`); dashboard: the Jobs API URL; env: the environment for
    CLI subprocesses and helpers; nodes: name ("head", "worker-1", ...) -> ray Node (.node_id)."""

    def __init__(self, extra_env: dict[str, str]) -> None:  # starts nothing
        from ray.cluster_utils import Cluster

        ensure_token()
        self.temp_dir = tempfile.mkdtemp(prefix="oc-", dir="/tmp")  # short: unix sockets under it
        self.id = os.path.basename(self.temp_dir)  # unique on this machine
        self.env = cli_env(RAY_AUTH_MODE="token", **extra_env)
        self.env.pop("RAY_API_SERVER_ADDRESS", None)
        self._node_env = {
            **self.env,
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_TMPDIR": self.temp_dir,  # Ray's ray_current_cluster file goes here, not /tmp/ray
            # A killed node is seen dead in about 2.5 s, not 15, as on the clusters deploy/ starts.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        self._sigterm = signal.getsignal(signal.SIGTERM)  # each Node installs its own handler
        self.cluster = Cluster()
        self.nodes: dict[str, Any] = {}
        self.address = self.dashboard = ""

    def add_node(self, num_cpus: int = 1, agent_port: int = 0) -> str:
        """The head first (with the dashboard), then worker nodes; returns the node's name.

        Each node's dashboard agent (the head's runs submitted jobs) binds agent_port, by default
        0: a port the kernel picks as it binds. A port picked here and bound later can be taken
        in between by another cluster's process; the agent then stays up without its HTTP server
        and the Jobs API answers "No available agent" for good (seen in CI). Ray's default,
        52365, would be shared by every node on this machine."""
        name, args = f"worker-{len(self.nodes)}", {"dashboard_agent_listen_port": agent_port}
        if not self.nodes:
            gcs, dash = free_ports(2)
            name, args = (
                "head",
                dict(
                    gcs_server_port=gcs,
                    include_dashboard=True,
                    dashboard_host="127.0.0.1",
                    dashboard_port=dash,
                    dashboard_agent_listen_port=agent_port,
                    temp_dir=f"{self.temp_dir}/ray",
                ),
            )
        # Ray starts a node's processes with this process's environment.
        with mock.patch.dict(os.environ, {**self._node_env, MARK: f"{self.id}:{name}"}, clear=True):
            _reload_ray_config()
            self.nodes[name] = self.cluster.add_node(node_name=name, num_cpus=num_cpus, **args)
        self.address, self.dashboard = str(self.cluster.address), f"http://{self.cluster.webui_url}"
        return name

    def name_of(self, node_id: str) -> str:
        return next(name for name, n in self.nodes.items() if n.node_id == node_id)

    def processes(self, name: str | None = None) -> list[psutil.Process]:
        """Live processes of one node (or of every node): what Ray's Node started and their
        descendants, and whatever carries the node's mark (orphans of a dead raylet)."""
        names = [name] if name else list(self.nodes)
        found: dict[int, psutil.Process] = {}
        for info in (i for n in names for infos in self.nodes[n].all_processes.values() for i in infos):
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(info.process.pid)
                found.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                cluster, _, node = p.environ().get(MARK, "").partition(":")
                if cluster == self.id and node in names:
                    found[p.pid] = p
        return [p for p in found.values() if _alive(p)]

    def kill_node(self, name: str) -> None:
        """A node lost: SIGKILL its raylet, then its other processes; returns once none is left."""
        procs = self.processes(name)
        self.cluster.remove_node(self.nodes[name], allow_graceful=False)
        self._wait_gone(procs, name, f"{name}'s processes gone")

    def _wait_gone(self, procs: list[psutil.Process], name: str | None, what: str) -> None:
        """Wait for procs (and anything else marked as the node's) to end; kill and fail on survivors."""

        def left() -> list[psutil.Process]:
            return list({p.pid: p for p in [*procs, *self.processes(name)] if _alive(p)}.values())

        with contextlib.suppress(AssertionError):
            wait_until(lambda: not left(), 30, what)
        for p in (survivors := left()):  # not left to the next test, but a failure all the same
            with contextlib.suppress(psutil.Error):
                p.kill()
        assert not survivors, f"{what}: still running {[(p.pid, p.name()) for p in survivors]}"

    def shutdown(self) -> None:
        """Stop every node (Ray's Node kills what it started, by pid); assert nothing is left."""
        procs = self.processes()
        try:
            self.cluster.shutdown()
            self._wait_gone(procs, None, "cluster shut down")
            assert procs or not self.nodes, "no process of the cluster was found"
        finally:
            signal.signal(signal.SIGTERM, self._sigterm)
            _reload_ray_config()  # this process's environment is its own again
            shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def local_cluster(
    workers: int, head_num_cpus: int = 1, head_agent_port: int = 0, **extra_env: str
) -> Iterator[LocalCluster]:
    """A head of head_num_cpus CPUs and `workers` worker nodes of 1 CPU; extra_env goes to the
    nodes and to `env`. Shut down at the end, asserting that none of its processes survives."""
    c = LocalCluster(extra_env)
    try:
        c.add_node(head_num_cpus, agent_port=head_agent_port)
        for _ in range(workers):
            c.add_node()
        yield c
    finally:
        c.shutdown()


def committed(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return list(manifest(run_dir)["checkpoints"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in jsonl(run_dir / "events.jsonl") if e["kind"] == kind]


_STATE = """
import json, sys
from ray.util.state import list_actors, list_nodes
kw = dict(address=sys.argv[1], limit=10000, raise_on_missing_output=False)
if sys.argv[2] == "actors":
    rows = [{"class_name": a.class_name, "node_id": a.node_id}
            for a in list_actors(filters=[("state", "=", "ALIVE")], **kw)]
else:
    rows = [{"node_id": n.node_id, "state": n.state} for n in list_nodes(**kw)]
print(json.dumps(rows))
"""


def _ray_state(c: LocalCluster, what: str) -> list[dict[str, Any]]:
    """Ray's state API, asked from a subprocess with the cluster's token-auth environment."""
    p = subprocess.run(
        [sys.executable, "-c", _STATE, c.dashboard, what],
        env=c.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return list(json.loads(p.stdout.strip().splitlines()[-1]))


def alive_actors(c: LocalCluster, *classes: str) -> list[dict[str, Any]]:
    """Live actors of these classes and the Ray node each is on."""
    return [a for a in _ray_state(c, "actors") if a["class_name"] in classes]


def node_states(c: LocalCluster) -> dict[str, str]:
    """Ray's view of each node: node id -> ALIVE / DEAD."""
    return {n["node_id"]: n["state"] for n in _ray_state(c, "nodes")}


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End a CLI process this test started (its own process group), by its pid."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)

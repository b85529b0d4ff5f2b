"""A local multi-node Ray cluster on this machine: a head plus worker raylets.

    orchestrator cluster up --workers 2          head + 2 worker raylets (1 CPU each)
    orchestrator cluster status                  which nodes are alive (processes and Ray's view)
    orchestrator cluster add-node                one more worker raylet
    orchestrator cluster kill-node worker-1      SIGKILL a node's raylet (node-failure drills)
    orchestrator cluster down                    stop exactly what `up` / `add-node` started

Each node is one `ray start --block` process started in its own session, so every
Ray process of that node (gcs, raylet, dashboard, agents, workers) is in that
session. What was started is recorded in a state file (ORCHESTRATOR_CLUSTER_STATE,
default ~/.orchestrator/cluster.json): per node the session leader's pid, the
raylet's (and on the head the GCS's) pid with their start times, the Ray node id
and the ports. `down` signals only those processes, their descendants and the
members of their sessions (SIGTERM, then SIGKILL after a grace period); it never
runs `ray stop`, which would stop every Ray process on the machine.

The cluster keeps its own Ray temp dir (so `ray.init("auto")` of anybody else on
this machine is not pointed at it) and, as Ray 2.60's `ray start --head` does,
token authentication: nodes and clients get RAY_AUTH_MODE=token and the token in
~/.ray/auth_token (created when missing).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import typer

from orchestrator.exits import EXIT_FAILED, EXIT_INPUT, die

STATE_ENV = "ORCHESTRATOR_CLUSTER_STATE"
DEFAULT_STATE = "~/.orchestrator/cluster.json"
TOKEN_PATH = "~/.ray/auth_token"

app = typer.Typer(
    help="Start and stop a local Ray cluster (a head plus worker raylets on this machine).",
    no_args_is_help=True,
)


class ClusterError(RuntimeError):
    """The cluster cannot be started, found or stopped; the message says why."""


# Popen objects of nodes started from this process, so their exit is reaped (a dead
# child that is never waited for stays a zombie, and a zombie still answers kill(pid, 0)).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


# -- state file ---------------------------------------------------------------
def state_path(path: str | os.PathLike[str] | None = None) -> Path:
    return Path(os.path.expanduser(str(path or os.environ.get(STATE_ENV) or DEFAULT_STATE)))


@contextlib.contextmanager
def _locked(path: Path) -> Any:
    """Serialize read-modify-write of the state file (up, add-node, down)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_state(path: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    p = state_path(path)
    try:
        return dict(json.loads(p.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise ClusterError(
            f"{p}: unreadable cluster state ({e}); remove it once its processes are gone"
        ) from e


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, path)


# -- processes ----------------------------------------------------------------
def _reap() -> None:
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[pid]


def _psutil() -> Any:
    """psutil, which Ray ships in ray/thirdparty_files (put on sys.path by `import ray`)."""
    try:
        import psutil
    except ImportError:
        import importlib.util

        spec = importlib.util.find_spec("ray")
        if spec is None or not spec.submodule_search_locations:
            raise ClusterError("ray is not installed in this Python (psutil comes with it)") from None
        sys.path.append(os.path.join(list(spec.submodule_search_locations)[0], "thirdparty_files"))
        import psutil
    return psutil


def _proc(pid: int | None, create_time: float | None = None) -> Any:
    """The live psutil.Process for pid, or None when it is gone, a zombie, or a newer
    process that reused the pid (its start time differs from the recorded one)."""
    psutil = _psutil()

    if not pid:
        return None
    _reap()
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        if create_time is not None and abs(p.create_time() - create_time) > 1.0:
            return None
        return p
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def pid_alive(pid: int | None, create_time: float | None = None) -> bool:
    return _proc(pid, create_time) is not None


def node_processes(node: dict[str, Any]) -> list[Any]:
    """Every live process that belongs to a node we started: the recorded processes,
    their descendants, and whatever else is in the node's session (workers whose raylet
    was killed are reparented away, but stay in the session)."""
    psutil = _psutil()

    found: dict[int, Any] = {}
    for key in ("pid", "raylet_pid", "gcs_pid"):
        p = _proc(node.get(key), node.get(key.replace("pid", "create_time")))
        if p is None:
            continue
        found[p.pid] = p
        with contextlib.suppress(psutil.Error):
            for c in p.children(recursive=True):
                found[c.pid] = c
    sid, born = node.get("pid"), float(node.get("create_time") or 0) - 1.0
    if sid:
        for p in psutil.process_iter(["create_time"]):
            if p.pid in found or p.pid == os.getpid():
                continue
            try:
                # Members of the node's session, started after the node (not a later,
                # unrelated session that happens to reuse the id).
                if os.getsid(p.pid) == sid and (p.info["create_time"] or 0) >= born:
                    found[p.pid] = p
            except (ProcessLookupError, PermissionError):
                continue
    return [p for p in found.values() if _proc(p.pid) is not None]


def _signal_all(procs: list[Any], sig: int) -> None:
    psutil = _psutil()

    for p in procs:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            p.send_signal(sig)


def _wait_gone(nodes: list[dict[str, Any]], timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for n in nodes for p in node_processes(n)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


def stop_nodes(nodes: list[dict[str, Any]], grace_s: float = 20.0) -> list[int]:
    """SIGTERM the nodes (each `ray start --block` shuts its own processes down), then
    anything of theirs still there, then SIGKILL after grace_s. Returns pids that survived."""
    leaders = [p for n in nodes if (p := _proc(n.get("pid"), n.get("create_time"))) is not None]
    _signal_all(leaders, signal.SIGTERM)
    left = _wait_gone(nodes, grace_s / 2)
    if left:
        _signal_all(left, signal.SIGTERM)
        left = _wait_gone(nodes, grace_s / 2)
    if left:
        _signal_all(left, signal.SIGKILL)
        left = _wait_gone(nodes, 10.0)
    return sorted(p.pid for p in left)


# -- ports and the ray executable -----------------------------------------------
def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_ports(n: int, avoid: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """n distinct ports that nobody listens on now (held open together so they differ)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("0.0.0.0", 0))
            socks.append(s)
            port = s.getsockname()[1]
            if port not in avoid:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def ray_executable() -> str:
    """The `ray` next to this Python (a virtualenv's bin), else the one on PATH."""
    local = Path(sys.executable).parent / "ray"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("ray")
    if not found:
        raise ClusterError(
            "ray not found: no `ray` next to this Python or on PATH; install ray[default] "
            "in this environment (pip install 'ray[default,train]==2.60.*')"
        )
    return found


def token_auth_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Ray processes and clients of a token-auth cluster: RAY_AUTH_MODE
    honoured when set, else 'token', with ~/.ray/auth_token created when missing."""
    env = dict(os.environ if env is None else env)
    if env.get("RAY_AUTH_MODE", "token").lower() != "token":
        return env
    env["RAY_AUTH_MODE"] = "token"
    token = Path(os.path.expanduser(TOKEN_PATH))
    if not (env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") or token.exists()):
        import secrets

        token.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return env


def _node_env() -> dict[str, str]:
    env = token_auth_env()
    # So a job's entrypoint (`orchestrator ...`) and `python` resolve to this environment.
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # On SIGTERM a node first drains for Serve (30 s by default); nothing here needs that.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    return env


def _default_temp_dir(path: Path) -> str:
    # Short: Ray puts unix sockets under it (108-byte limit), and per state file.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), f"orch-{digest}")


# -- starting nodes ---------------------------------------------------------------
def _tail(path: str, n: int = 25) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _start_node(
    *,
    name: str,
    head: bool,
    temp_dir: str,
    num_cpus: int,
    object_store_memory: int,
    address: str | None = None,
    port: int | None = None,
    dashboard_port: int | None = None,
    timeout_s: float = 120.0,
    extra_args: list[str] | None = None,
) -> dict[str, Any]:
    """Start one `ray start --block` node in its own session; return its record once its
    raylet (and on the head its GCS) runs."""
    avoid = {p for p in (port, dashboard_port) if p}
    names = [
        "node_manager",
        "object_manager",
        "agent_http",
        "agent_grpc",
        "runtime_env_agent",
        "metrics_export",
    ] + (["client_server"] if head else [])
    ports = dict(zip(names, free_ports(len(names), avoid), strict=True))
    cmd = [
        ray_executable(),
        "start",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address",
        "127.0.0.1",
        "--node-name",
        name,
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        "0",
        "--object-store-memory",
        str(object_store_memory),
        "--temp-dir",
        temp_dir,
        "--node-manager-port",
        str(ports["node_manager"]),
        "--object-manager-port",
        str(ports["object_manager"]),
        "--dashboard-agent-listen-port",
        str(ports["agent_http"]),
        "--dashboard-agent-grpc-port",
        str(ports["agent_grpc"]),
        "--runtime-env-agent-port",
        str(ports["runtime_env_agent"]),
        "--metrics-export-port",
        str(ports["metrics_export"]),
        "--min-worker-port",
        "0",
        "--max-worker-port",
        "0",
    ]
    if head:
        assert port and dashboard_port
        ports.update(gcs=port, dashboard=dashboard_port)
        cmd += [
            "--head",
            "--port",
            str(port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard_port),
            "--ray-client-server-port",
            str(ports["client_server"]),
        ]
    else:
        assert address
        cmd += ["--address", address, "--include-log-monitor", "False"]
    cmd += extra_args or []
    os.makedirs(temp_dir, exist_ok=True)
    log = os.path.join(temp_dir, f"orchestrator-{name}.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_node_env(),
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    node: dict[str, Any] = {
        "name": name,
        "role": "head" if head else "worker",
        "num_cpus": num_cpus,
        "pid": proc.pid,
        "create_time": _proc(proc.pid).create_time() if _proc(proc.pid) else None,
        "raylet_pid": None,
        "raylet_create_time": None,
        "gcs_pid": None,
        "gcs_create_time": None,
        "node_id": None,
        "ports": ports,
        "log": log,
        "started_at": time.time(),
    }
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise ClusterError(f"{name}: `ray start` exited with {proc.returncode}:\n{_tail(log)}")
            _find_node_processes(node)
            if (
                node["raylet_pid"]
                and node["node_id"]
                and (node["gcs_pid"] or not head)
                and ("Ray runtime started" in Path(log).read_text(errors="replace"))
            ):
                return node
            if time.monotonic() > deadline:
                raise ClusterError(f"{name}: not up after {timeout_s:.0f}s; its log ends:\n{_tail(log)}")
            time.sleep(0.25)
    except BaseException:
        stop_nodes([node], grace_s=5)
        raise


def _find_node_processes(node: dict[str, Any]) -> None:
    psutil = _psutil()

    leader = _proc(node["pid"], node.get("create_time"))
    if leader is None:
        return
    with contextlib.suppress(psutil.Error):
        for c in leader.children(recursive=False):
            try:
                exe = os.path.basename(c.exe() or "") or c.name()
                if exe == "raylet" and not node["raylet_pid"]:
                    node["raylet_pid"], node["raylet_create_time"] = c.pid, c.create_time()
                    for arg in c.cmdline():
                        if arg.startswith("--node_id="):
                            node["node_id"] = arg.split("=", 1)[1]
                elif exe == "gcs_server" and not node["gcs_pid"]:
                    node["gcs_pid"], node["gcs_create_time"] = c.pid, c.create_time()
            except psutil.Error:
                continue


def _wait_address(temp_dir: str, timeout_s: float = 30.0) -> str:
    f = Path(temp_dir) / "ray_current_cluster"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if addr := f.read_text().strip():
                return addr
        time.sleep(0.2)
    raise ClusterError(f"head started but wrote no address to {f}")


def _wait_dashboard(url: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:  # it answers (e.g. 401): up
            if e.code in (401, 403):
                return
            last = e
        except (OSError, urllib.error.URLError) as e:
            last = e
        time.sleep(0.5)
    raise ClusterError(f"dashboard {url} not answering after {timeout_s:.0f}s: {last}")


def use_token_auth() -> None:
    """Make this process a token-auth Ray client when a token is at hand and RAY_AUTH_MODE
    is unset. Ray reads RAY_AUTH_MODE once, when its config is first loaded (at import),
    so the config is reloaded when ray is already imported."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    if not (
        os.path.exists(os.path.expanduser(TOKEN_PATH))
        or os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
    ):
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray._raylet" in sys.modules:
        with contextlib.suppress(Exception):
            from ray._raylet import Config  # type: ignore[attr-defined]

            Config.initialize("")


def _alive_node_ids(address: str, timeout_s: float = 5.0) -> set[str] | None:
    """Node ids the GCS reports ALIVE, or None when it cannot be asked."""
    use_token_auth()
    try:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]

        infos = GcsClient(address=address).get_all_node_info(timeout=timeout_s)
        return {nid.hex() for nid, info in infos.items() if info.state == 0}  # 0: ALIVE
    except Exception:
        return None


def _wait_registered(address: str, node_ids: list[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = _alive_node_ids(address)
        if alive is not None and set(node_ids) <= alive:
            return
        time.sleep(0.5)
    raise ClusterError(f"nodes {node_ids} did not register with the GCS at {address} in {timeout_s:.0f}s")


def _live(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in state.get("nodes", []) if node_processes(n)]


def up(
    workers: int = 1,
    port: int = 6379,
    dashboard_port: int = 8265,
    num_cpus: int = 1,
    head_num_cpus: int | None = None,
    object_store_memory: int = 256 * 1024**2,
    temp_dir: str | None = None,
    state_file: str | os.PathLike[str] | None = None,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Start a head and `workers` worker raylets; record them; return the state."""
    if workers < 0 or num_cpus < 0 or (head_num_cpus is not None and head_num_cpus < 0):
        raise ClusterError("--workers and --num-cpus must be >= 0")
    path = state_path(state_file)
    with _locked(path):
        old = read_state(path)
        if old is not None:
            live = _live(old)
            if live:
                raise ClusterError(
                    f"a cluster is already up (address {old.get('address')}, dashboard "
                    f"{old.get('dashboard_url')}; {len(live)} node(s) running, recorded in {path}); "
                    "stop it first with `orchestrator cluster down`"
                )
            path.unlink(missing_ok=True)  # stale: everything it recorded is gone
        for p, what in ((port, "--port"), (dashboard_port, "--dashboard-port")):
            if not _port_free(p):
                raise ClusterError(
                    f"port {p} ({what}) is busy: another Ray cluster or another program "
                    f"listens on it; choose a free one with {what}"
                )
        if port == dashboard_port:
            raise ClusterError("--port and --dashboard-port must differ")
        ray_executable()
        tdir = os.path.abspath(temp_dir or _default_temp_dir(path))
        # The default dir is this cluster's own; a given one is removed only if made here.
        owned = temp_dir is None or not os.path.exists(tdir)
        state: dict[str, Any] = {
            "address": None,
            "dashboard_url": f"http://127.0.0.1:{dashboard_port}",
            "temp_dir": tdir,
            "temp_dir_owned": owned,
            "state_file": str(path),
            "auth_mode": token_auth_env().get("RAY_AUTH_MODE", "disabled"),
            "object_store_memory": object_store_memory,
            "started_at": time.time(),
            "nodes": [],
        }
        try:
            head = _start_node(
                name="head",
                head=True,
                temp_dir=tdir,
                num_cpus=num_cpus if head_num_cpus is None else head_num_cpus,
                object_store_memory=object_store_memory,
                port=port,
                dashboard_port=dashboard_port,
                timeout_s=timeout_s,
            )
            state["nodes"].append(head)
            _write_state(path, state)
            state["address"] = _wait_address(tdir)
            _write_state(path, state)
            for i in range(1, workers + 1):
                node = _start_node(
                    name=f"worker-{i}",
                    head=False,
                    temp_dir=tdir,
                    num_cpus=num_cpus,
                    object_store_memory=object_store_memory,
                    address=state["address"],
                    timeout_s=timeout_s,
                )
                state["nodes"].append(node)
                _write_state(path, state)
            _wait_registered(state["address"], [n["node_id"] for n in state["nodes"]])
            _wait_dashboard(state["dashboard_url"])
        except BaseException:
            survivors = stop_nodes(state["nodes"], grace_s=10)
            if not survivors:
                path.unlink(missing_ok=True)
            raise
    return state


def _require_state(state_file: str | os.PathLike[str] | None) -> tuple[Path, dict[str, Any]]:
    path = state_path(state_file)
    state = read_state(path)
    if state is None:
        raise ClusterError(f"no cluster recorded in {path}; start one with `orchestrator cluster up`")
    return path, state


def add_node(
    num_cpus: int = 1,
    state_file: str | os.PathLike[str] | None = None,
    timeout_s: float = 120.0,
    name: str | None = None,
) -> dict[str, Any]:
    """Start one more worker raylet in the recorded cluster; return its record."""
    path = state_path(state_file)
    with _locked(path):
        path, state = _require_state(path)
        head = next((n for n in state["nodes"] if n["role"] == "head"), None)
        if head is None or not pid_alive(head.get("gcs_pid"), head.get("gcs_create_time")):
            raise ClusterError(f"the cluster in {path} has no live head; `cluster down`, then `cluster up`")
        taken = {n["name"] for n in state["nodes"]}
        if name is None:
            i = len(state["nodes"])
            while f"worker-{i}" in taken:
                i += 1
            name = f"worker-{i}"
        elif name in taken:
            raise ClusterError(f"a node named {name!r} is already recorded")
        node = _start_node(
            name=name,
            head=False,
            temp_dir=state["temp_dir"],
            num_cpus=num_cpus,
            object_store_memory=int(state.get("object_store_memory", 256 * 1024**2)),
            address=state["address"],
            timeout_s=timeout_s,
        )
        state["nodes"].append(node)
        _write_state(path, state)
    try:
        _wait_registered(state["address"], [node["node_id"]])
    except ClusterError:
        stop_nodes([node], grace_s=5)
        raise
    return node


def find_node(state: dict[str, Any], key: str | int) -> dict[str, Any]:
    """A node record by name (head, worker-1), index in the state, or Ray node id (prefix)."""
    nodes = state.get("nodes", [])
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
        i = int(key)
        if 0 <= i < len(nodes):
            return dict(nodes[i])
    for n in nodes:
        by_id = isinstance(key, str) and len(key) >= 6 and (n.get("node_id") or "").startswith(key)
        if key == n["name"] or by_id:
            return dict(n)
    raise ClusterError(f"no node {key!r}; recorded: {', '.join(n['name'] for n in nodes)}")


def kill_node(
    key: str | int, state_file: str | os.PathLike[str] | None = None, sig: int = signal.SIGKILL
) -> int:
    """Kill a node's raylet (SIGKILL by default), as a machine failure would; return its pid.
    The node's `ray start --block` then stops the rest of that node's processes."""
    _, state = _require_state(state_file)
    node = find_node(state, key)
    p = _proc(node.get("raylet_pid"), node.get("raylet_create_time"))
    if p is None:
        raise ClusterError(f"{node['name']}: its raylet (pid {node.get('raylet_pid')}) is not running")
    p.send_signal(sig)
    return int(p.pid)


def down(
    state_file: str | os.PathLike[str] | None = None, grace_s: float = 20.0, keep_logs: bool = False
) -> dict[str, Any]:
    """Stop every node recorded in the state file (workers first) and remove the file.
    Returns {"stopped": [names], "survivors": [pids]}; survivors keep the file in place."""
    path = state_path(state_file)
    with _locked(path):
        path, state = _require_state(path)
        nodes = state.get("nodes", [])
        workers = [n for n in nodes if n["role"] != "head"]
        heads = [n for n in nodes if n["role"] == "head"]
        survivors = stop_nodes(workers, grace_s) if workers else []
        survivors += stop_nodes(heads, grace_s) if heads else []
        if survivors:
            return {"stopped": [], "survivors": survivors, "state_file": str(path)}
        path.unlink(missing_ok=True)
        if state.get("temp_dir_owned") and not keep_logs:
            shutil.rmtree(state["temp_dir"], ignore_errors=True)
    return {"stopped": [n["name"] for n in nodes], "survivors": [], "state_file": str(path)}


def status(state_file: str | os.PathLike[str] | None = None, ask_ray: bool = True) -> dict[str, Any]:
    """The recorded cluster, each node's process liveness and (when reachable) Ray's view."""
    path, state = _require_state(state_file)
    head: dict[str, Any] = next((n for n in state.get("nodes", []) if n["role"] == "head"), {})
    gcs_up = pid_alive(head.get("gcs_pid"), head.get("gcs_create_time"))
    alive_ids = _alive_node_ids(state["address"]) if ask_ray and gcs_up and state.get("address") else None
    nodes = []
    for n in state.get("nodes", []):
        row = {
            k: n.get(k)
            for k in ("name", "role", "num_cpus", "pid", "raylet_pid", "gcs_pid", "node_id", "log")
        }
        row["raylet_alive"] = pid_alive(n.get("raylet_pid"), n.get("raylet_create_time"))
        row["processes"] = len(node_processes(n))
        row["ray_state"] = (
            None if alive_ids is None else ("ALIVE" if n.get("node_id") in alive_ids else "DEAD")
        )
        nodes.append(row)
    return {
        "address": state.get("address"),
        "dashboard_url": state.get("dashboard_url"),
        "state_file": str(path),
        "temp_dir": state.get("temp_dir"),
        "auth_mode": state.get("auth_mode"),
        "gcs_reachable": alive_ids is not None,
        "nodes": nodes,
    }


def dashboard_url(state_file: str | os.PathLike[str] | None = None) -> str | None:
    """The dashboard of the recorded cluster when its head runs, else None."""
    try:
        state = read_state(state_file)
    except ClusterError:
        return None
    if not state:
        return None
    head = next((n for n in state.get("nodes", []) if n["role"] == "head"), None)
    if head and pid_alive(head.get("gcs_pid"), head.get("gcs_create_time")):
        return state.get("dashboard_url")
    return None


# -- CLI ---------------------------------------------------------------------------
def _fail(e: Exception, code: int = EXIT_FAILED) -> None:
    die(str(e), code)


STATE_HELP = f"State file (default ${STATE_ENV}, else {DEFAULT_STATE})."


@app.command("up")
def up_cmd(
    workers: int = typer.Option(1, help="Worker raylets besides the head."),
    port: int = typer.Option(6379, help="GCS port of the head."),
    dashboard_port: int = typer.Option(8265, help="Dashboard / Jobs API port."),
    num_cpus: int = typer.Option(1, help="CPUs each worker node offers to Ray."),
    head_num_cpus: int = typer.Option(
        None, help="CPUs of the head (default: --num-cpus); 0 keeps training off the head."
    ),
    object_store_memory: int = typer.Option(256 * 1024**2, help="Object store bytes per node."),
    temp_dir: str = typer.Option(None, help="Ray temp/log dir of the cluster (default /tmp/orch-<hash>)."),
    state_file: str = typer.Option(None, help=STATE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the recorded state as JSON."),
) -> None:
    """Start a head plus N worker raylets on this machine, with token auth.

    Nodes are started for 127.0.0.1; Ray advertises them under this machine's IP, which is the
    address printed. The dashboard (Jobs API) listens on 127.0.0.1 only.
    """
    try:
        state = up(
            workers, port, dashboard_port, num_cpus, head_num_cpus, object_store_memory, temp_dir, state_file
        )
    except ClusterError as e:
        _fail(e)
        return
    if as_json:
        typer.echo(json.dumps(state, indent=2, sort_keys=True))
        return
    addr, dash = state["address"], state["dashboard_url"]
    typer.echo(
        f"[cluster] up: {len(state['nodes'])} node(s) "
        f"({', '.join(n['name'] + ':' + str(n['num_cpus']) + 'cpu' for n in state['nodes'])})"
    )
    typer.echo(f"[cluster] address:   {addr}")
    typer.echo(f"[cluster] dashboard: {dash}  (Jobs API)")
    typer.echo(f"[cluster] state:     {state['state_file']}   logs: {state['temp_dir']}")
    auth = ""
    if state["auth_mode"] == "token":
        auth = "export RAY_AUTH_MODE=token  # clients send the token in ~/.ray/auth_token\n  "
    typer.echo(
        "Use it:\n"
        f"  {auth}orchestrator run configs/digits.yaml --address {addr}\n"
        f"  orchestrator submit configs/digits.yaml --address {dash}\n"
        f"  RAY_ADDRESS={addr} python your_script.py\n"
        "Stop it: orchestrator cluster down"
    )


@app.command("down")
def down_cmd(
    state_file: str = typer.Option(None, help=STATE_HELP),
    grace: float = typer.Option(20.0, help="Seconds between SIGTERM and SIGKILL."),
    keep_logs: bool = typer.Option(False, help="Keep the cluster's temp/log dir."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Stop only what `cluster up`/`add-node` started (by recorded pids), remove the state file."""
    path = state_path(state_file)
    try:
        if read_state(path) is None:
            typer.echo(
                json.dumps({"stopped": [], "survivors": [], "state_file": str(path)})
                if as_json
                else f"[cluster] nothing to stop: no cluster recorded in {path}"
            )
            return
        out = down(path, grace, keep_logs)
    except ClusterError as e:
        _fail(e)
        return
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    elif out["survivors"]:
        typer.echo(f"[cluster] processes still running after SIGKILL: {out['survivors']}", err=True)
    else:
        typer.echo(f"[cluster] down: stopped {', '.join(out['stopped'])}")
    if out["survivors"]:
        raise typer.Exit(EXIT_FAILED)


@app.command("status")
def status_cmd(
    state_file: str = typer.Option(None, help=STATE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Nodes of the recorded cluster: processes alive, and alive in Ray's view (GCS)."""
    try:
        st = status(state_file)
    except ClusterError as e:
        _fail(e)
        return
    if as_json:
        typer.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    typer.echo(
        f"address {st['address']}  dashboard {st['dashboard_url']}  "
        f"(GCS {'reachable' if st['gcs_reachable'] else 'unreachable'})"
    )
    typer.echo(
        f"{'node':<10} {'role':<7} {'cpus':>4} {'pid':>8} {'raylet':>8} {'procs':>5} {'ray':<6} node_id"
    )
    for n in st["nodes"]:
        typer.echo(
            f"{n['name']:<10} {n['role']:<7} {n['num_cpus']:>4} {n['pid']:>8} "
            f"{str(n['raylet_pid']) + ('' if n['raylet_alive'] else '†'):>8} {n['processes']:>5} "
            f"{n['ray_state'] or '?':<6} {n['node_id']}"
        )
    if any(not n["raylet_alive"] for n in st["nodes"]):
        typer.echo("† raylet not running")


@app.command("add-node")
def add_node_cmd(
    num_cpus: int = typer.Option(1, help="CPUs the new node offers."),
    name: str = typer.Option(None, help="Node name (default worker-<n>)."),
    state_file: str = typer.Option(None, help=STATE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the node record as JSON."),
) -> None:
    """Start one more worker raylet in the recorded cluster."""
    try:
        node = add_node(num_cpus, state_file, name=name)
    except ClusterError as e:
        _fail(e)
        return
    typer.echo(
        json.dumps(node, indent=2)
        if as_json
        else f"[cluster] added {node['name']} (raylet pid {node['raylet_pid']}, node {node['node_id']})"
    )


@app.command("kill-node")
def kill_node_cmd(
    node: str = typer.Argument(..., help="Node name (worker-1), index, or Ray node id (prefix)."),
    sig: str = typer.Option("KILL", "--signal", help="Signal for the raylet: KILL or TERM."),
    state_file: str = typer.Option(None, help=STATE_HELP),
) -> None:
    """SIGKILL a node's raylet, as a machine failure would (for failure drills)."""
    try:
        signum = signal.Signals["SIG" + sig.upper().removeprefix("SIG")]
    except KeyError:
        _fail(ValueError(f"unknown signal {sig!r}"), EXIT_INPUT)
        return
    try:
        pid = kill_node(node, state_file, signum)
    except ClusterError as e:
        _fail(e)
        return
    typer.echo(f"[cluster] sent {signum.name} to the raylet of {node} (pid {pid})")

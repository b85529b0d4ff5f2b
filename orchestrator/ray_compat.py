"""Every use of a private Ray API, in one place, each with the reason no public one serves.

tests/test_ray_compat.py imports each of them, so a Ray upgrade that moves one fails
there, by name, instead of deep inside a run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import uuid
from typing import Any

from orchestrator.core import console

log = logging.getLogger(__name__)

TOKEN_PATH = "~/.ray/auth_token"


def use_token_auth() -> None:
    """Make this process a token-auth Ray client when a token is at hand and RAY_AUTH_MODE
    is unset (Ray 2.60's `ray start --head` turns token auth on and writes the token).

    Private: Ray reads RAY_AUTH_MODE once, when its config is first loaded at import; no
    public call reloads it, so when ray is already imported `ray._raylet.Config` is
    re-initialized."""
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


def current_cluster() -> tuple[str, str | None]:
    """(the path of Ray's `ray_current_cluster` marker, the GCS address it records or None).

    `ray start --head` (and ray.cluster_utils) write the head's GCS address there and only
    `ray stop` removes it, so a head killed otherwise leaves a stale one. The file lives in
    Ray's temp dir: RAY_TMPDIR, else TMPDIR, else /tmp, then `ray/` (not tempfile's choice).

    Private: a plain `ray.init()` connects to whatever the marker names (and then refuses
    num_cpus); no public call says where the marker is or what it holds."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            address = f.read().strip()
    except OSError:  # none (or unreadable): no cluster was started here
        return path, None
    return path, address or None


def gcs_token_check(address: str, timeout_s: float = 5.0) -> str | None:
    """Ask the GCS at host:port, once, whether it accepts this process's credentials: "no
    token" or "token refused" when it answers UNAUTHENTICATED, else None (it accepts them, or
    the question could not be put; ray.init then reports what it finds).

    Private: `ray.init` meets an UNAUTHENTICATED GCS by retrying for about 20 s and then says
    only that it failed to connect; no public call asks first. This sends Ray's own auth
    metadata (what its gRPC clients send) with one GetClusterId call."""
    import grpc
    from ray._private.authentication.grpc_authentication_client_interceptor import (
        _get_authentication_metadata_tuple,
    )
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    try:
        metadata = _get_authentication_metadata_tuple()
    except Exception:  # RAY_AUTH_MODE=token and no token anywhere: ask without one
        metadata = ()
    try:
        with grpc.insecure_channel(address) as channel:
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            request = gcs_service_pb2.GetClusterIdRequest()  # type: ignore[attr-defined]  # generated
            stub.GetClusterId(request, metadata=metadata, timeout=timeout_s)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            return "token refused" if metadata else "no token"
    return None


def cluster_can_grow() -> bool | None:
    """Whether an autoscaler may add nodes to the cluster this process is connected to: False for
    a cluster of fixed size (nodes started by hand with `ray start`, ray.cluster_utils), True
    when an autoscaler with node types of its own runs, None when it cannot be told.

    Private: no public Ray call says whether a cluster can grow. Ray's monitor on the head (the
    v1 autoscaler) publishes its status under the GCS key `__autoscaling_status`; without an
    autoscaling config it runs a read-only provider whose node types are the live nodes
    themselves, named `node_<node id>`. A v2 autoscaler (KubeRay) reports its state to the GCS
    instead (a non-zero autoscaler version in `get_cluster_status`)."""
    import json

    import ray

    status = None
    with contextlib.suppress(Exception):
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get("__autoscaling_status")
        status = json.loads(raw) if raw else None
    grows = can_grow_from_status(status)
    if grows is None:
        with contextlib.suppress(Exception):
            from ray.autoscaler.v2.sdk import get_cluster_status

            version = get_cluster_status(ray.get_runtime_context().gcs_address).stats.autoscaler_version
            if version not in (None, "", "0"):
                return True
    return grows


def can_grow_from_status(status: Any) -> bool | None:
    """The v1 monitor's published status -> can the cluster grow (see cluster_can_grow)."""
    mapping = ((status or {}).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    if not mapping:
        return None
    return any(node_type != f"node_{node_id}" for node_id, node_type in mapping.items())


def every_worker_failed(err: Any, world: int | None) -> bool:
    """A failure in which every worker of a group of `world` failed (Ray Train then starts the
    whole group again, even with replica groups; None: not a replicas run, never asked)."""
    failures = getattr(err, "worker_failures", None)
    return world is not None and isinstance(failures, dict) and set(range(world)) <= set(failures)


def actor_alive(handle: Any, timeout_s: float = 1.0) -> bool:
    """Whether the actor behind `handle` is alive: it answers a no-op call within timeout_s
    (one that does not, busy or on a node not yet declared dead, is counted alive; short,
    because the coordinator that asks answers one call at a time). False once Ray knows it
    is dead (at once for a killed process; for a lost node, once the node is declared dead).

    Private: `__ray_ready__` is the no-op every actor has (Ray waits on it for an actor's
    creation); Ray offers no public liveness query without the dashboard's state API, which
    an embedded Ray here runs without."""
    import ray

    try:
        ray.get(handle.__ray_ready__.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        return True
    except ray.exceptions.RayError:
        return False
    return True


def restart_recorder(coordinator: Any, replicas_world: int | None = None) -> Any:
    """A Ray Train controller callback that tells the coordinator each time Ray Train
    decides to restart the worker group, with the failure it restarts from. In a replicas run
    (`replicas_world` workers), a restart from a failure of every worker is a whole restart:
    Ray Train starts the group afresh rather than replacing replicas, so rank 0 writes again;
    one from a failure of some is a replacement of those alone (counted apart:
    orchestrator/budget.py).

    Private: the public `ray.train.UserCallback.after_exception` fires on every worker
    failure, including the last one after which Ray Train gives up; only the controller's
    state machine says RESTARTING, and it is reachable only through
    `ray.train.v2._internal`."""
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2._internal.execution.controller.state import TrainControllerStateType

    from orchestrator.budget import replaced_alone

    class RestartRecorder(ControllerCallback):  # type: ignore[misc]
        def __init__(self, coordinator: Any) -> None:
            self.coordinator = coordinator

        def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
            if current_state._state_type == TrainControllerStateType.RESTARTING:
                err = getattr(current_state, "training_failed_error", None)
                alone = replicas_world is not None and replaced_alone(len(failed_ranks(err)), replicas_world)
                # One request id per decision: Ray's retry of this call counts it once.
                whole = every_worker_failed(err, replicas_world)
                self.coordinator.note_restart.remote(
                    f"{type(err).__name__}: {err}", uuid.uuid4().hex, whole=whole, alone=alone
                )

    return RestartRecorder(coordinator)


def failed_ranks(err: Any) -> list[int]:
    """The world ranks whose failure a WorkerGroupError reports (none for another error)."""
    failures = getattr(err, "worker_failures", None)
    return sorted(failures) if isinstance(failures, dict) else []


def count_replacements_apart(trainer: Any, budget: Any, workers: int) -> None:
    """failure.mode replicas: Ray Train's failure policy for this fit() replaced by one that
    spends `budget` (orchestrator/budget.py's RestartBudget, what earlier fits spent already
    counted): a replica replaced alone from failure.max_replacements, a restart of the whole
    group from failure.max_failures. Ray Train 2.60 counts both against max_failures.

    Private: the policy is built inside fit() (`create_failure_policy`) and handed to the
    controller by `DataParallelTrainer._initialize_and_run_controller`; no public option
    replaces it. Other failures (the controller's own, preemptions) keep Ray's counting."""
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
    from ray.train.v2._internal.execution.failure_handling.default import _is_preemption_failure
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from orchestrator.budget import replaced_alone

    class ReplicaBudgets(DefaultFailurePolicy):  # type: ignore[misc]
        def make_decision(self, training_failed_error: Any) -> Any:
            err = training_failed_error
            if not isinstance(err, WorkerGroupError) or _is_preemption_failure(err):
                return super().make_decision(err)
            alone = replaced_alone(len(failed_ranks(err)), workers)
            if spent := budget.spend(alone):
                log.warning(f"[run] {spent}: the run stops")
                return FailureDecision.RAISE
            return FailureDecision.RETRY

    if not hasattr(trainer, "_initialize_and_run_controller"):
        raise RuntimeError(
            "no _initialize_and_run_controller in this Ray Train; update orchestrator/ray_compat.py"
        )
    run = trainer._initialize_and_run_controller

    def with_budgets(**kwargs: Any) -> Any:
        kwargs["failure_policy"] = ReplicaBudgets(kwargs["failure_policy"].failure_config)
        return run(**kwargs)

    trainer._initialize_and_run_controller = with_budgets


def preemption_listener() -> Any:
    """A Ray Train worker callback that makes each worker process treat SIGTERM as a
    preemption notice (workers/stopping.py) instead of exiting at once.

    Private: Python installs signal handlers only on a process's main thread, and Ray Train
    runs the training function on another thread; `WorkerCallback.after_init_train_context`
    runs on the worker actor's main thread, and it is reachable only through
    `ray.train.v2._internal`."""
    from ray.train.v2._internal.execution.callback import WorkerCallback

    class PreemptionListener(WorkerCallback):  # type: ignore[misc]
        def after_init_train_context(self) -> None:
            from orchestrator.core import console
            from workers.stopping import install_preemption_handler

            console.configure()  # before the train loop's own call: this line is one of them
            if not install_preemption_handler():
                log.info("[preempt] not on the main thread: SIGTERM ends this worker at once")

    return PreemptionListener()


def controller_poll_env(interval_s: float) -> dict[str, str]:
    """The environment that sets how often Ray Train's controller polls its workers: the
    poll is where a dead worker is first seen, so it bounds failure detection (Ray's default
    is every 2 s). The controller reads it from the driver's environment when `fit()` starts
    it. Private: the variable is named only in `ray.train.v2._internal.constants`."""
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE, HEALTH_CHECK_INTERVAL_S_ENV_VAR

    if HEALTH_CHECK_INTERVAL_S_ENV_VAR not in ENV_VARS_TO_PROPAGATE:
        raise RuntimeError(
            f"{HEALTH_CHECK_INTERVAL_S_ENV_VAR} no longer reaches Ray Train's controller; "
            "update orchestrator/ray_compat.py"
        )
    return {HEALTH_CHECK_INTERVAL_S_ENV_VAR: repr(float(interval_s))}


def keep_driver_sigint(trainer: Any) -> None:
    """Stop Ray Train's `fit()` from replacing the driver's Ctrl-C handler.

    Ray Train 2.60's fit() installs a SIGINT handler that aborts the worker group at once,
    so the checkpoint in flight is lost and nothing says how to go on; the driver's own
    handler (orchestrator.driver.Interrupts) asks the workers to save and stop first.
    Private: no public option turns Ray's handler off; `_register_sigint_handler` is the
    trainer method that installs it."""
    if not hasattr(trainer, "_register_sigint_handler"):
        raise RuntimeError("no _register_sigint_handler in this Ray Train; update orchestrator/ray_compat.py")
    trainer._register_sigint_handler = lambda controller: None


LIGHTHOUSE_BIND_S = 30.0  # a restarted lighthouse retries its port this long (its old socket closing)


def torchft_config(heartbeat_timeout_ms: int) -> Any:
    """Ray Train's backend for torchft replica groups: one process group per worker, and
    torchft's lighthouse (min_replicas 1: the survivors go on alone). Alpha in Ray 2.60 and
    exported from no public module, so imported here (tests/test_ray_compat.py names it).

    Private as well: Ray 2.60 starts the lighthouse as an actor of the default 1 CPU pinned to
    the driver's node (soft=False) on a port the OS picks, and never restarts it. A head of 0
    CPUs (deploy/'s clusters, where a submitted driver runs) never schedules it, and a
    lighthouse killed mid-run failed every replica's quorum and then every start of a new
    group (its address read from a dead actor) for good: the run hung. Here, through
    `_TorchftBackend._maybe_create_lighthouse_actor` (which `on_start` calls for every group
    and replacement it starts), it is an actor of 0 CPUs that Ray restarts (max_restarts=-1)
    on a port fixed when it is first placed, so the replicas' managers, which reconnect to the
    address they were given, find the restarted one there. It is pinned (soft=False: a soft
    affinity was seen placed on another node, away from the port probed for it) to a node off
    the driver's that hosts no worker when one is alive (`lighthouse_node`); if that node is
    lost the pinned actor cannot come back, and the next group or replacement gets a new one,
    placed afresh, at a new address."""
    import ray
    from ray.exceptions import RayActorError
    from ray.train.v2.torch.torchft_config import TorchftConfig, _TorchftBackend
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    class Backend(_TorchftBackend):  # type: ignore[misc]
        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            self.worker_nodes = {w.metadata.node_id for w in worker_group.get_workers()}
            _TorchftBackend.on_start(self, worker_group, backend_config)  # not super(): pickled by value

        def _maybe_create_lighthouse_actor(self, backend_config: Any) -> str:
            if self.lighthouse_actor is not None:
                try:  # waits out a restart (max_task_retries=-1)
                    return str(ray.get(self.lighthouse_actor.address.remote()))
                except RayActorError:  # gone for good (its node lost): a new one, placed afresh
                    self.lighthouse_actor = None
            here = ray.get_runtime_context().get_node_id()
            node = lighthouse_node(ray.nodes(), here, getattr(self, "worker_nodes", set()))
            pinned = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
            probe = ray.remote(free_port).options(num_cpus=0, scheduling_strategy=pinned)
            kwargs = {**backend_config.lighthouse_kwargs, "bind": f"[::]:{ray.get(probe.remote())}"}
            self.lighthouse_actor = (
                lighthouse_actor()
                .options(num_cpus=0, max_restarts=-1, max_task_retries=-1, scheduling_strategy=pinned)
                .remote(kwargs)
            )
            return str(ray.get(self.lighthouse_actor.address.remote()))

    class Config(TorchftConfig):  # type: ignore[misc]
        @property
        def backend_cls(self) -> type:
            return Backend

    lighthouse = {"min_replicas": 1, "heartbeat_timeout_ms": heartbeat_timeout_ms}
    return Config(lighthouse_kwargs=lighthouse, backend="gloo")


def lighthouse_node(nodes: list[dict[str, Any]], here: str, workers: set[str]) -> str:
    """Where the lighthouse goes (`nodes` as `ray.nodes()` lists them, `here` the driver's
    node, `workers` the nodes the training workers are on): an alive node other than the
    driver's that hosts no worker, so losing a worker's node never takes the lighthouse with
    it; else the driver's own (a lighthouse on a worker's node would be lost with that node,
    and every survivor with it). The first by node id, so every call agrees."""
    free = sorted(
        str(n["NodeID"]) for n in nodes if n.get("Alive") and n.get("NodeID") not in {here, *workers}
    )
    return free[0] if free else here


def free_port() -> int:
    """A port nobody on this node listens on now (the lighthouse binds it, and binds it again
    when it restarts)."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def lighthouse_actor() -> Any:
    """The lighthouse as a Ray actor class (torchft's LighthouseServer, a PyO3 type, cannot be
    one itself). Restarted, it binds its port again, retrying while the old socket closes."""
    import ray

    class TorchftLighthouse:
        def __init__(self, kwargs: dict[str, Any]) -> None:
            import time

            from torchft.coordination import LighthouseServer

            end = time.monotonic() + LIGHTHOUSE_BIND_S
            while True:
                try:
                    self.server = LighthouseServer(**kwargs)
                    return
                except Exception as e:  # torchft raises its bind error as a RuntimeError
                    if time.monotonic() > end:
                        raise RuntimeError(f"the torchft lighthouse cannot bind {kwargs['bind']}: {e}") from e
                    time.sleep(0.5)

        def address(self) -> str:
            return str(self.server.address())

    TorchftLighthouse.__qualname__ = "TorchftLighthouse"  # its name in Ray's state API and process title
    return ray.remote(TorchftLighthouse)


def controller_gave_up(exc: BaseException) -> bool:
    """Ray Train's controller itself failed (its ControllerError, anywhere in the chain), as
    opposed to the workers' failures (WorkerGroupError) it gave up retrying."""
    from ray.train.v2.api.exceptions import ControllerError

    return any(isinstance(e, ControllerError) for e in exception_chain(exc))


def exception_chain(exc: BaseException | None) -> list[BaseException]:
    """Every exception an error from Ray carries, outermost first: Python's own chain
    (__cause__, __context__), the original exception of a RayTaskError (`.cause`: a task or an
    actor's creation task raised it), each worker's failure of Ray Train's WorkerGroupError
    (`.worker_failures`) and the controller's of its ControllerError (`.controller_failure`).
    The driver decides a run's outcome by the types found here, never by the error's text.
    Not private API, but Ray's own shape of nesting, so it lives beside the private uses and
    tests/test_ray_compat.py builds each shape with Ray's classes."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        inner = getattr(e, "worker_failures", None)
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        todo.append(getattr(e, "controller_failure", None))
        todo += list(inner.values()) if isinstance(inner, dict) else []
    return [e for e in seen if isinstance(e, BaseException)]


# A raylet's report of a dead worker process: Ray's paragraph about the OOM killer and
# `ray stop --force`, printed on every restart; the driver's restart line names the cause.
RAYLET_NOISE = re.compile(r"A worker died or was killed while executing a task by an unexpected system error")
TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"
_console = {"verbose": False}


def console_lines(data: dict[str, Any], verbose: bool) -> list[str] | None:
    """What the driver's console shows of one batch of lines Ray forwards from its processes:
    None to print the batch as Ray would; else the lines to print as they are (maybe none).

    Without --verbose: of a worker's lines, only those rank 0 labeled as its own
    (workers/output.py), so a print() in the user's code reaches the console and Ray's own
    worker logs do not; of the raylet's, all but its dead-worker paragraph. With it: all."""
    from workers.output import LABEL

    if verbose:
        return None
    lines = [str(line) for line in data.get("lines", [])]
    if data.get("pid") == "raylet":
        kept = [line for line in lines if not RAYLET_NOISE.search(line)]
        return None if len(kept) == len(lines) else kept
    if data.get("pid") == "autoscaler":
        return None  # e.g. "no node can hold the requested resources": the user needs it
    return [line for line in lines if (m := LABEL.match(line)) and m.group(1) == "0"]


def route_worker_output(verbose: bool) -> None:
    """Make the driver print what Ray forwards from its processes through `console_lines`, and
    fold Ray's token-auth notice (an embedded Ray's, on every run) unless verbose. Call before
    ray.init (with log_to_driver=True); calling again only changes `verbose`.

    Private: Ray's driver prints forwarded worker lines and the raylet's error messages
    through `ray._private.worker.print_to_stdstream` (ray.init binds the log handler to it);
    no public option filters them: log_to_driver is all or nothing, and the raylet's errors are
    printed even without it. The notice is logged by
    `ray._private.authentication.authentication_token_setup`'s logger."""
    import ray._private.worker as ray_worker

    _console["verbose"] = verbose
    if getattr(ray_worker.print_to_stdstream, "_orchestrator", False):
        return
    ray_prints = ray_worker.print_to_stdstream

    def print_to_stdstream(data: dict[str, Any], ignore_prefix: bool) -> None:
        lines = console_lines(data, _console["verbose"])
        with console.LOCK:  # Ray's prints write a line and its newline apart: none of ours between
            if lines is None:
                ray_prints(data, ignore_prefix)
                return
            if data.get("pid") == "raylet":
                if lines:
                    ray_prints({**data, "lines": lines}, ignore_prefix)
                return
            sink = sys.stderr if data.get("is_err") else sys.stdout
            for line in lines:
                console.write_line(line, sink)

    print_to_stdstream._orchestrator = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream

    class FoldNotice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return bool(_console["verbose"]) or TOKEN_NOTICE not in record.getMessage()

    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(FoldNotice())

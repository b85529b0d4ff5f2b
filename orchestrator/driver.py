"""The driver: one process per run that connects to Ray, owns the run's lease,
starts its coordinator, hands the worker loop to Ray Train and reports the outcome.

Ray Train owns worker lifecycle and restarts (FailureConfig); the coordinator owns
the manifest. The driver only wires them together and watches.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import yaml

from orchestrator import lifecycle, preflight
from orchestrator.budget import RestartBudget, replaced_alone
from orchestrator.coordinator import RetentionConfig, coordinator_actor_class
from orchestrator.core.errors import OrchestratorError
from orchestrator.core.lease import Lease, LeaseLost
from orchestrator.core.manifest import (
    BACKUP,
    EVENTS,
    LOGS,
    MANIFEST,
    METRICS,
    SPEC,
    read_jsonl,
    read_manifest,
)
from orchestrator.core.storage import Storage, redact, redact_options, secrets_in
from orchestrator.outcome import Outcome, decide_outcome, describe, lease_lost, relaunch_group, root_cause
from orchestrator.progress import ProgressView, all_nan_warning
from orchestrator.ray_compat import (
    controller_gave_up,
    controller_poll_env,
    count_replacements_apart,
    current_cluster,
    exception_chain,
    failed_ranks,
    keep_driver_sigint,
    preemption_listener,
    restart_recorder,
    route_worker_output,
    torchft_config,
    use_token_auth,
)
from orchestrator.spec import JobSpec, SpecError, parse_spec
from orchestrator.tracking import MLFLOW_ENV, flat_params
from workers.config import Kill, WorkerConfig

log = logging.getLogger(__name__)

NAMESPACE = "orchestrator"
COORD_TIMEOUT_S = 300.0  # every wait on the coordinator ends, with the storage retry budget inside it


class RunFailed(OrchestratorError, RuntimeError):
    """The run ended without finishing; the message says why."""

    def __init__(self, message: str, summary: Summary | None = None) -> None:
        super().__init__(message)
        self.summary = summary


class RunInterrupted(RunFailed):
    """Ctrl-C or SIGTERM on the driver; `exit_code` is 128 + the signal's number."""

    def __init__(self, message: str, signum: int, summary: Summary | None = None) -> None:
        super().__init__(message, summary)
        self.exit_code = 128 + signum


class Interrupts:
    """Ctrl-C and SIGTERM on the driver while it trains.

    The first asks the workers (through the coordinator) to save where they are, wait for
    the commit and stop; the run then ends resumable. A second one, or `grace_s`
    (failure.stop_grace_s) without the workers stopping, stops the driver at once
    (KeyboardInterrupt): the checkpoint in flight, if any, is never committed and is
    collected as an orphan by the next start.
    Either way the lease is released, and `orchestrator resume` continues the run."""

    def __init__(self, coord: Any, grace_s: float) -> None:
        self.coord, self.grace_s = coord, grace_s
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._timer: threading.Timer | None = None

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._timer is not None:
            self._timer.cancel()

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise KeyboardInterrupt(f"{name} again")
        self.signum = signum
        self.coord.request_stop.remote(f"{name} on the driver")
        log.warning(
            f"[run] {name}: the workers save a checkpoint and stop (up to {self.grace_s:.0f}s); "
            f"{name if signum == signal.SIGINT else 'a signal'} again stops at once"
        )
        self._timer = threading.Timer(self.grace_s, _thread.interrupt_main)
        self._timer.daemon = True
        self._timer.start()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "interrupt"


@dataclass
class Summary:
    run_uri: str
    status: str
    epochs: int = 0
    restarts: int = 0
    attempts: int = 0
    best: dict[str, Any] | None = None
    kept: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    trackers_off: list[dict[str, Any]] = field(default_factory=list)  # `tracker_off` events of this driver

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def connect(address: str | None, num_cpus_hint: int = 0, verbose: bool = False) -> bool:
    """Connect to the cluster at address, or one found on this machine, else start a local
    one. Returns True when this process started Ray (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    # Worker output is forwarded, and filtered on the way: rank 0's own lines, not Ray's (all on --verbose).
    route_worker_output(verbose)
    quiet: dict[str, Any] = {"log_to_driver": True, "configure_logging": True, "logging_level": "WARNING"}
    address = address or os.environ.get("RAY_ADDRESS") or _running_cluster()
    if address and address != "local":
        preflight.check_address(address)  # something answers there, and takes our token
        use_token_auth()  # a `ray start --head` cluster usually wants ~/.ray/auth_token
        try:
            ray.init(address=address, namespace=NAMESPACE, **quiet)
        except ConnectionError as e:  # not storage's (the CLI's OSError): Ray's
            raise preflight.RayUnreachable(f"the Ray cluster at {address}: {e}") from None
        return False
    from orchestrator import reaper

    if warning := oversubscribed(num_cpus_hint, os.cpu_count() or 1):
        log.warning(warning)
    reaper.start(os.getpid())  # stops this Ray if the driver dies without stopping it
    ray.init(
        # "local": a new Ray, always. Without it ray.init joins whatever Ray's own discovery
        # finds (the marker, even a stale one; RAY_ADDRESS) and then refuses num_cpus.
        address="local",
        namespace=NAMESPACE,
        num_cpus=max(os.cpu_count() or 1, num_cpus_hint),
        include_dashboard=False,
        **quiet,
    )
    return True


def oversubscribed(cpus: int, cores: int) -> str | None:
    """The warning for an embedded Ray whose workers ask for more CPUs than the machine has
    cores: Ray is given as many as they ask, so they start, and share the cores."""
    if cpus <= cores:
        return None
    return (
        f"[run] warning: the workers ask for {cpus} CPUs and this machine has {cores} cores: the "
        f"embedded Ray is given {cpus} so that they all start, but they share {cores} cores and run "
        "slower; fewer scaling.num_workers, or --address to join a bigger cluster"
    )


def ray_described(started_ray: bool) -> str:
    """Which Ray this driver runs on, for the header: the embedded one it started (and its
    CPUs), or the cluster it joined (its GCS address)."""
    import ray

    try:
        if started_ray:
            return f"on an embedded Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
        return f"on the Ray cluster at {ray.get_runtime_context().gcs_address}"
    except Exception:  # noqa: BLE001  # only words for the header
        return "on Ray"


def _running_cluster() -> str | None:
    """The address of a cluster started on this machine by `ray start`, if it answers.

    Ray's own `ray.init(address="auto")` reads the same marker file but, when it names a
    cluster that has since stopped, retries the dead GCS for minutes (seen: over 120 s);
    one short connect first keeps `orchestrator run` with no cluster instant. A marker whose
    cluster does not answer (a head stopped without `ray stop`) is ignored, with a note."""
    import socket

    marker, address = current_cluster()
    if address is None:
        return None
    try:
        host, _, port = address.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=1.0):
            return address
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        log.warning(
            f"[run] note: {marker} names a Ray cluster at {address!r} that does not answer ({why}; "
            "a head stopped without `ray stop`): ignored it, starting an embedded Ray; "
            "--address HOST:PORT joins a cluster, --address local always starts a new one"
        )
        return None


def worker_config(spec: JobSpec) -> WorkerConfig:
    """What each rank needs of the spec, and nothing else."""
    ck, es = spec.checkpoint, spec.early_stopping
    return WorkerConfig(
        run_uri=spec.run_uri,
        storage_options=dict(spec.storage.options),
        retry=spec.retry_policy,
        task=spec.task.name,
        task_options=dict(spec.task.options),
        seed=spec.seed,
        epochs=spec.epochs,
        use_gpu=spec.scaling.use_gpu,
        monitor=ck.monitor,
        mode=ck.mode,
        every_n_epochs=ck.every_n_epochs,
        every_n_steps=ck.every_n_steps if isinstance(ck.every_n_steps, int) else None,
        auto_budget=ck.overhead_budget if ck.every_n_steps == "auto" else None,
        async_save=ck.async_save,
        local_cache=ck.local_cache,
        stop_on_nan=ck.stop_on_nan,
        early_stopping=(es.patience, es.min_delta) if es else None,
        kills=tuple(Kill(k.rank, k.epoch, k.step, k.point) for k in spec.chaos.kills),
        replicas=spec.failure.mode == "replicas",
        replica_timeout_s=spec.failure.replica_timeout_s,
        replica_quorum_timeout_s=spec.failure.replica_quorum_timeout_s,
    )


def torch_config(spec: JobSpec) -> Any:
    """Ray Train's backend: one process group of every worker, or (failure.mode replicas) one
    per worker plus torchft's lighthouse, which forms each step's quorum of live replicas."""
    from ray.train.torch import TorchConfig

    if spec.failure.mode != "replicas":
        return TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo")
    # min_replicas 1: the survivors go on alone; a replica is dropped from the quorum once it
    # misses heartbeats for this long (2 s paused the survivor 2.1 s here; torchft's default
    # of 5 s, 4.4-5.0 s: bench/torchft_replicas.py).
    return torchft_config(int(spec.failure.replica_heartbeat_timeout_s * 1000))


def start_coordinator(
    spec: JobSpec, storage: Storage, cfg: RetentionConfig, token: str, tracking: dict[str, Any] | None = None
) -> Any:
    """The run's coordinator actor, named after the run. On a shared cluster a driver that
    stalled and lost its lease may still have one there: this driver holds the lease now, so
    that one is stopped (it is fenced anyway) and the name taken over."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = f"coordinator:{spec.run_uri}"
    actor = coordinator_actor_class().options(
        name=name,
        namespace=NAMESPACE,
        # Pinned to the driver's node (a zero-CPU actor always fits): it survives the loss of
        # any other node. Soft affinity was seen to land it on worker nodes.
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=False
        ),
    )
    for _ in range(30):
        try:
            return actor.remote(storage, spec.name, cfg, token, tracking or tracking_settings(spec))
        except ValueError:  # the name is taken: the previous owner's coordinator
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            except ValueError:
                pass  # gone meanwhile
            time.sleep(1.0)
    raise RunFailed(f"{spec.run_uri}: the previous driver's coordinator actor ({name}) would not go away")


def tracking_settings(spec: JobSpec) -> dict[str, Any]:
    """What the coordinator's trackers need: the spec, flattened and with secrets redacted, is
    the MLflow params and the TensorBoard hparams."""
    t = spec.tracking
    env = {k: os.environ[k] for k in MLFLOW_ENV if k in os.environ}  # e.g. MLFLOW_ALLOW_FILE_STORE
    return {
        "tensorboard": t.tensorboard,
        "mlflow_uri": t.mlflow_uri,
        "experiment": t.mlflow_experiment,
        "params": flat_params(spec_record(spec)),
        "monitor": spec.checkpoint.monitor,
        "run_name": spec.name,
        "env": env,
    }


def checked_tracking(spec: JobSpec, resume: bool) -> dict[str, Any]:
    """The coordinator's tracking settings, once MLflow (if any) is known to work from here. A
    new run with a URI MLflow cannot use is refused (SpecError, before Ray starts: a run of
    hours with no tracking is worse); a resume is warned on stderr and goes on without MLflow,
    so a tracking server that is down never keeps a run from continuing."""
    settings = tracking_settings(spec)
    problem = preflight.check_tracking(spec)
    if problem is None:
        return settings
    if not resume:
        raise SpecError(problem)
    log.warning(f"[run] warning: {problem}. Going on without MLflow")
    return {**settings, "mlflow_uri": None}


def trackers_off(storage: Storage, since: float) -> list[dict[str, Any]]:
    """The trackers switched off while this driver ran (the `tracker_off` events), for the
    end-of-run summary: a failed MLflow or TensorBoard is not found only in the event log."""
    try:
        events = read_jsonl(storage, EVENTS)
    except Exception:  # noqa: BLE001  # the run's outcome matters more than this note
        return []
    return [e for e in events if e.get("kind") == "tracker_off" and e.get("ts", 0) >= since]


def failed_rank_log(storage: Storage, since: float) -> str:
    """Where a failed run's output is, for its error: the log of the rank whose exception
    ended the latest attempt (its `worker_error` event names it), else every rank's logs."""
    try:
        events = read_jsonl(storage, EVENTS)
    except Exception:  # noqa: BLE001  # the run's outcome matters more than this note
        events = []
    failed = [
        e for e in events if e.get("kind") == "worker_error" and e.get("log") and e.get("ts", 0) >= since
    ]
    if failed:  # the first failure of the last attempt that failed: the others may be its echo
        first = next(e for e in failed if e.get("restarts") == failed[-1].get("restarts"))
        return f"; rank {first.get('rank')}'s log: {first['log']}"
    return f"; every rank's log: {storage.child_uri(LOGS)}/"


def say_all_nan(storage: Storage, spec: JobSpec) -> None:
    """On stderr at the run's end, when every value of the monitored metric the run reported
    was NaN (or inf): nothing was ranked, and checkpoint.stop_on_nan would have stopped it."""
    try:
        rows = read_jsonl(storage, METRICS)
    except Exception:  # noqa: BLE001  # the run's outcome matters more than this note
        return
    if warning := all_nan_warning(spec.checkpoint.monitor, rows, spec.checkpoint.stop_on_nan):
        log.warning(warning)


def spec_record(spec: JobSpec) -> dict[str, Any]:
    """The spec as the run stores it (spec.yaml): plain data, secrets in storage.options redacted.
    `run --resume-if-exists` compares specs in this form, so a redacted secret is no difference."""
    data = spec.model_dump(mode="json")
    data["storage"]["options"] = redact_options(spec.storage.options)
    return data


def store_spec(storage: Storage, spec: JobSpec) -> None:
    storage.write_bytes(SPEC, yaml.safe_dump(spec_record(spec), sort_keys=False).encode())


def load_stored_spec(run_uri: str, options: dict[str, Any] | None = None, check_task: bool = True) -> JobSpec:
    """The spec a run was started with, for `resume`. Secrets were redacted when it was
    stored, so credentials come from the environment (or `options`) now. With
    check_task=False the task is not imported (reading a run never runs user code)."""
    storage = Storage(run_uri, options or {})
    if not storage.exists(SPEC):
        raise SpecError(f"{run_uri}: no {SPEC} here; is this a run directory?")
    data = yaml.safe_load(storage.read_bytes(SPEC))
    if not isinstance(data, dict):
        raise SpecError(f"{run_uri}/{SPEC}: not a job spec")
    data.setdefault("storage", {})
    opts = {k: v for k, v in data["storage"].get("options", {}).items() if v != "***"}
    data["storage"]["options"] = {**opts, **(options or {})}
    return parse_spec(data, source=f"{run_uri}/{SPEC}", check_task=check_task)


def run(
    spec: JobSpec,
    address: str | None = None,
    quiet: bool = False,
    resume: bool = False,
    verbose: bool = False,
    force: bool = False,
) -> Summary:
    """Train spec to the end: claim the run, connect to Ray, start the coordinator, fit, then
    act on the outcome (orchestrator/outcome.py decides it). Raises RunFailed (with the
    summary) when it cannot finish, LeaseLost when another driver took the run over."""
    import ray

    preflight.before_ray(spec, address, monitor=not resume)  # address, storage, monitor: before lease, Ray
    tracking = checked_tracking(spec, resume)
    since = time.time()
    storage = spec.open_run_storage()
    lease, replaced = claim_run(spec, storage, resume, force)
    started_ray = False
    try:
        store_spec(storage, spec)
        cpus = spec.scaling.max_workers * int(spec.scaling.resources_per_worker.get("CPU", 1))
        started_ray = connect(address, num_cpus_hint=cpus, verbose=verbose)
        preflight.workers_fit(spec, started_ray)  # before Ray Train waits for workers that never come
        started = {"pid": os.getpid(), "resume": resume, **({"replaced": replaced} if replaced else {})}
        coord = _start(spec, storage, lease, tracking, started)
        if not quiet:
            log.info(
                f"[run] {spec.name}: storage {spec.run_uri}, {spec.scaling.num_workers} workers, "
                f"{spec.epochs} epochs, {ray_described(started_ray)}"
            )
        interrupts = Interrupts(coord, spec.failure.stop_grace_s)
        spent = Spent(spec, coord)
        with _progress_view(spec, coord, quiet):  # one view: a group restart's fit() shows only what is new
            fit_error = _fit(spec, coord, interrupts, spent.budget())
            while _group_restart_instead(spec, fit_error, interrupts, spent.budget()):
                fit_error = _fit(spec, coord, interrupts, spent.budget())
        try:
            after, coord_error = ray.get(coord.progress.remote(), timeout=COORD_TIMEOUT_S), None
        except Exception as e:  # the coordinator is gone (its restart refused: taken over) or stuck
            after, coord_error = None, e
        outcome = decide_outcome(fit_error, after, coord_error, lease.lost)
        return _conclude(spec, storage, coord, outcome, interrupts, since)
    finally:
        lease.release()
        if started_ray:
            ray.shutdown()


def _start(spec: JobSpec, storage: Storage, lease: Lease, tracking: Any, started: dict[str, Any]) -> Any:
    """The run's coordinator, fenced with the lease, its first events recorded."""
    import ray

    cfg = RetentionConfig(
        monitor=spec.checkpoint.monitor,
        mode=spec.checkpoint.mode,
        top_k=spec.checkpoint.top_k,
        keep_latest=spec.checkpoint.keep_latest,
        keep_every_n_epochs=spec.checkpoint.keep_every_n_epochs,
    )
    coord = start_coordinator(spec, storage, cfg, lease.token, tracking)
    ray.get(coord.ping.remote(), timeout=COORD_TIMEOUT_S)
    lease.on_lost = lambda why: coord.fence.remote(why)  # the coordinator stops writing at once
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if storage.is_local and nodes > 1:
        log.info(
            f"[run] warning: storage {spec.run_uri} is a local path and the cluster has {nodes} "
            "nodes; every node must see the same directory (NFS, or one machine), or use s3://"
        )
    for ev in lease.events:
        coord.event.remote(ev.pop("kind"), ev, uuid.uuid4().hex)
    ray.get(coord.event.remote("driver_started", started, uuid.uuid4().hex), timeout=COORD_TIMEOUT_S)
    return coord


class Spent:
    """failure.mode replicas: the restarts this driver's fits spent so far, read back from the
    coordinator's counts (each Ray Train restart and each fallback is noted there), less those
    of earlier drivers (a resume starts with the whole budget, as Ray Train's own count does)."""

    def __init__(self, spec: JobSpec, coord: Any) -> None:
        self.spec, self.coord = spec, coord
        self.start = self._counts() if spec.failure.mode == "replicas" else (0, 0)

    def _counts(self) -> tuple[int, int]:
        """(restarts of the whole group, replicas replaced alone) as the coordinator counts them."""
        import ray

        p = ray.get(self.coord.progress.remote(1 << 62), timeout=COORD_TIMEOUT_S)  # no rows: counts only
        replaced = int(p.get("replacements", 0))
        return int(p["restarts"]) - replaced, replaced

    def budget(self) -> RestartBudget | None:
        if self.spec.failure.mode != "replicas":
            return None
        groups, replaced = self._counts()
        f = self.spec.failure
        return RestartBudget(
            f.max_failures, f.max_replacements, groups - self.start[0], replaced - self.start[1]
        )


def replicas_world(spec: JobSpec) -> int | None:
    """A replicas run's number of workers (one number, checked by the spec); None otherwise."""
    workers = spec.scaling.num_workers
    return workers if spec.failure.mode == "replicas" and isinstance(workers, int) else None


def _group_restart_instead(
    spec: JobSpec, fit_error: BaseException | None, interrupts: Interrupts, budget: RestartBudget | None
) -> bool:
    """failure.mode replicas: Ray Train's controller gave up (ControllerError) replacing several
    replica groups that failed at once (Ray 2.60 clears the result of one dead group while it
    replaces another: docs/architecture.md). Then the whole group restarts from the latest
    commit, as restart mode would, instead of a failed run; each such restart counts against
    failure.max_failures (replicas replaced alone do not). Recorded as a restart, with the cause."""
    import ray

    interrupted = interrupts.signum is not None
    if fit_error is None or budget is None:
        return False
    if not relaunch_group(spec.failure.mode, fit_error, interrupted, budget):
        # a replicas run that stops because a budget is spent says which (Ray Train's log only
        # reaches the console with --verbose)
        failed = max((len(failed_ranks(e)) for e in exception_chain(fit_error)), default=0)
        gave_up = controller_gave_up(fit_error)
        if not interrupted and (gave_up or failed):
            alone = not gave_up and replaced_alone(failed, spec.scaling.max_workers)
            if spent := budget.refused(alone):
                log.warning(f"[run] {spent}: the run stops")
        return False
    coord = interrupts.coord
    why = (
        f"Ray Train's controller gave up replacing failed replicas ({root_cause(describe(fit_error))}); "
        "the whole group restarts from the latest commit"
    )
    ray.get(coord.note_restart.remote(why, uuid.uuid4().hex, whole=True), timeout=COORD_TIMEOUT_S)
    log.warning(f"[run] {why}")
    return True


def _progress_view(spec: JobSpec, coord: Any, quiet: bool) -> ProgressView:
    """What the driver shows while fit() runs, polled from the coordinator."""
    import ray

    poll = lambda since: ray.get(coord.progress.remote(since), timeout=30)  # noqa: E731
    ck, replicas = spec.checkpoint, spec.failure.mode == "replicas"
    return ProgressView(poll, spec.epochs, ck.monitor, ck.mode, quiet, replicas=replicas)


def _fit(
    spec: JobSpec, coord: Any, interrupts: Interrupts, budget: RestartBudget | None = None
) -> BaseException | None:
    """Ray Train's fit(); the error it raised or returned, if any. With a budget (failure.mode
    replicas), replicas replaced alone and restarts of the whole group are counted apart."""
    # What `ray.train` exports in 2.60 (V2), imported from its public home so type
    # checkers see elastic scaling (`ray.train`'s own stubs still describe V1).
    from ray.train.v2.api.config import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    from workers.loop import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,  # type: ignore[arg-type]  # it returns a summary; Ray allows it
        train_loop_config={"worker": worker_config(spec), "coordinator": coord},
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.num_workers,
            elastic_resize_monitor_interval_s=spec.scaling.elastic_resize_interval_s,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker=dict(spec.scaling.resources_per_worker),
        ),
        torch_config=torch_config(spec),
        run_config=RunConfig(
            name=spec.name,
            storage_path=os.path.join(tempfile.gettempdir(), "orchestrator-ray-train"),
            failure_config=FailureConfig(max_failures=spec.failure.max_failures),
            callbacks=[restart_recorder(coord, replicas_world(spec))]
            + ([preemption_listener()] if spec.failure.checkpoint_on_preempt else []),
        ),
    )
    keep_driver_sigint(trainer)
    if budget is not None:
        count_replacements_apart(trainer, budget, spec.scaling.max_workers)
    os.environ.update(controller_poll_env(spec.failure.health_check_interval_s))
    with interrupts:
        try:
            return getattr(trainer.fit(), "error", None)
        except KeyboardInterrupt:  # a second Ctrl-C, or the workers did not stop in time
            raise RunInterrupted(
                f"{spec.run_uri}: stopped at once on {interrupts.name}; a checkpoint in flight was "
                f"not committed. Every committed checkpoint is intact; `orchestrator resume "
                f"{spec.run_uri}` continues from the latest",
                interrupts.signum or signal.SIGINT,
            ) from None
        except Exception as e:  # Ray Train gave up (max_failures) or the run was invalid
            return e


def _conclude(
    spec: JobSpec,
    storage: Storage,
    coord: Any,
    outcome: Outcome,
    interrupts: Interrupts,
    since: float,
) -> Summary:
    """Act on the outcome: record the run's end and say it (a summary, or the error to raise)."""
    import ray

    if outcome.kind == "taken_over":
        raise LeaseLost(
            f"{spec.run_uri}: {outcome.reason}. This driver stopped; it deleted nothing, and what the "
            "new owner commits is its own"
        )
    if outcome.kind == "input":
        ray.get(coord.finish.remote("failed"), timeout=COORD_TIMEOUT_S)
        raise SpecError(outcome.reason or "the run's input was refused")
    reason = redact(outcome.reason, secrets_in(spec.storage.options)) if outcome.reason else None
    try:
        kept = ray.get(coord.finish.remote(outcome.status), timeout=COORD_TIMEOUT_S)
        prog = ray.get(coord.progress.remote(), timeout=COORD_TIMEOUT_S)
        off = trackers_off(storage, since)
        say_all_nan(storage, spec)
    except Exception as e:  # storage (or the coordinator) is gone: committed data stays as it is
        if lost := lease_lost(e):
            raise LeaseLost(f"{spec.run_uri}: {root_cause(str(lost))}; this driver stopped") from None
        why = redact(root_cause(describe(e)), secrets_in(spec.storage.options))
        raise RunFailed(
            f"{reason or 'training finished'}; then recording the end of the run failed: {why}. "
            f"Every committed checkpoint is intact; once storage is back, run "
            f"`orchestrator resume {spec.run_uri}`",
            Summary(run_uri=spec.run_uri, status="failed", error=reason or why),
        ) from None
    summary = Summary(
        run_uri=spec.run_uri,
        status=outcome.status or "failed",
        epochs=(prog["metrics"] or {}).get("epoch", 0),
        restarts=prog["restarts"],
        attempts=prog["attempts"],
        best=_best_entry(spec, prog["best"]),
        kept=kept,
        error=reason,
        trackers_off=off,
    )
    if outcome.kind == "interrupted":
        raise RunInterrupted(
            f"{outcome.reason} ({interrupts.name}); `orchestrator resume {spec.run_uri}` continues it",
            interrupts.signum or signal.SIGINT,
            summary,
        )
    if outcome.kind == "failed":
        hint = f"; when the cause is fixed, `orchestrator resume {spec.run_uri}` continues it"
        raise RunFailed((reason or "training failed") + failed_rank_log(storage, since) + hint, summary)
    return summary


def claim_run(spec: JobSpec, storage: Storage, resume: bool, force: bool = False) -> tuple[Lease, str | None]:
    """Take the run's lease (refused while another live driver owns it: LeaseHeld). `run`
    (not resume) of a name that holds a run: a finished one or one with committed checkpoints
    is refused, since `run` never continues a run silently, perhaps with another spec; one that
    failed before committing any checkpoint (a wrong monitor, say) holds nothing to resume
    from, so it is replaced, said on stderr; with force, so is any run that committed none (a
    stale or interrupted one). Returns the lease and why a run was replaced."""
    existing = read_manifest(storage)
    if existing is None and storage.exists(BACKUP):
        # The manifest is gone but the run is not: starting over here would take the run's
        # committed checkpoints for orphans of the new run and delete them.
        raise SpecError(
            f"{spec.run_uri}: {MANIFEST} is missing but {BACKUP} is there: the run's manifest was "
            f"deleted or lost. `orchestrator repair {spec.run_uri}` restores it (--dry-run shows "
            f"what it would do); or `orchestrator delete {spec.run_uri}` to start over"
        )
    if existing is not None and not resume and existing.status == "finished":
        raise RunFailed(
            f"{spec.run_uri} already holds a finished run; pick another name "
            f"(--set name=...), `orchestrator resume` it, or `orchestrator delete {spec.run_uri}` it"
        )
    lease = Lease(storage, ttl_s=spec.failure.lease_ttl_s, heartbeat_s=spec.failure.lease_ttl_s / 6)
    lease.acquire()  # refuses while another live driver owns the run
    if existing is None or resume:
        return lease, None
    try:
        existing = read_manifest(storage)  # again, now that no other driver can change it
        why = lifecycle.replaceable(existing, force) if existing is not None else None
        if existing is not None and why is None:
            n = len(existing.checkpoints)
            hint = "; --force replaces it, as it committed nothing" if n == 0 else ""
            raise SpecError(
                f"{spec.run_uri} already holds a {existing.status} run ({n} committed "
                f"checkpoint(s)); continue it with `orchestrator resume {spec.run_uri}`, "
                f"start a new one under another name (--set name=...), or delete it first "
                f"(`orchestrator delete {spec.run_uri}`){hint}"
            )
        if why is not None:
            log.warning(f"[run] {spec.run_uri} held {why}: replacing it with this run")
            lifecycle.clear_run(storage)
    except BaseException:
        lease.release()
        raise
    return lease, why


def _best_entry(spec: JobSpec, best: dict[str, Any] | None) -> dict[str, Any] | None:
    if best is None:
        return None
    mon = spec.checkpoint.monitor
    return {
        "id": best["id"],
        "uri": f"{spec.run_uri}/checkpoints/{best['id']}",
        "epoch": best["epoch"],
        "monitor": mon,
        "value": best["metrics"].get(mon),
        "metrics": best["metrics"],
    }

"""Checks before a run takes its lease, starts Ray or hands its workers to Ray Train; each fails
in seconds with a message that names the storage, the address or the field and what is wrong.

- `before_ray(spec, address)`: the cluster address answers and takes this process's token;
  the storage can be reached and lets a run write, read and delete under its RUN_URI.
- `check_tracking(spec)`: MLflow can be used at `tracking.mlflow_uri` (the driver refuses a
  new run that names one it cannot use; a resumed run is warned and goes on without it).
- `workers_fit(spec, started_ray)`, once connected: the cluster can ever hold the workers the
  spec asks for (Ray Train would otherwise wait for them, 60 s at a time, forever).
- `check_monitor(spec)` (a new run, before Ray): the task reports checkpoint.monitor; it builds
  the user's task once in the driver (on the CPU) to see.

driver.run() calls them; nothing here starts a worker.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tenacity

from orchestrator.core.errors import RayProblem
from orchestrator.core.storage import Storage, StorageError, _s3_error, is_transient
from orchestrator.spec import JobSpec, SpecError

log = logging.getLogger(__name__)


class RayUnreachable(RayProblem, RuntimeError):
    """No Ray cluster answers at the address, or it refuses this process (exit 5)."""


def before_ray(spec: JobSpec, address: str | None, monitor: bool = False) -> None:
    check_address(address or os.environ.get("RAY_ADDRESS"))
    check_storage(spec)
    check_replicas(spec)
    if monitor:
        check_monitor(spec)


def check_monitor(spec: JobSpec) -> None:
    """checkpoint.monitor names a metric the task reports, in seconds and before Ray starts
    (on the workers it is found only once Ray, the workers and their data are up). The task
    is built here once, as rank 0 of the most workers the spec asks for, on the CPU, and one
    validation batch evaluated, as each rank does before training (workers/epoch.py
    check_monitor, which stays).
    A train function reports what it likes (checked at its first report), and a task that
    cannot be built here (its data only on the workers' machines, say) is left to the workers."""
    import torch

    from orchestrator.core.tasks import resolve_task
    from workers.loop import is_train_function
    from workers.metrics import metric_names
    from workers.task import TaskContext

    try:
        build = resolve_task(spec.task.name)
        if is_train_function(build):
            return
        cpu = torch.device("cpu")
        task = build(dict(spec.task.options), TaskContext(0, spec.scaling.max_workers, spec.seed, cpu))
        names = metric_names(task, task.model, cpu)
    except Exception:  # noqa: BLE001  # the workers check it again, where the task must build
        return
    if spec.checkpoint.monitor not in names:
        raise SpecError(
            f"checkpoint.monitor {spec.checkpoint.monitor!r} is not a metric of task "
            f"{spec.task.name!r}; it reports {sorted(names)}"
        )


def check_tracking(spec: JobSpec) -> str | None:
    """Why the spec's MLflow tracking cannot work from here (one line: the URI, the error,
    the fix), or None (also when there is none). The coordinator runs on this node, so what
    works here works there. TensorBoard writes into the run's storage, checked already."""
    if not spec.tracking.mlflow_uri:
        return None
    from orchestrator.tracking import mlflow_problem

    return mlflow_problem(spec.tracking.mlflow_uri, spec.tracking.mlflow_experiment)


def check_replicas(spec: JobSpec) -> None:
    """failure.mode replicas runs on torchft, which is not a dependency: say so before Ray."""
    if spec.failure.mode != "replicas":
        return
    import importlib.util

    if importlib.util.find_spec("torchft") is None:
        raise SpecError(
            "failure.mode: replicas needs torchft, which is not installed here; "
            "`pip install 'torchft>=0.2,<0.3'` (on every node: the image, or a runtime_env), or use "
            "failure.mode: restart"
        )


# -- the cluster address ---------------------------------------------------------------------


def check_address(address: str | None) -> None:
    """A host:port cluster address: something listens there (Ray itself retries a dead GCS for
    minutes) and, when the cluster uses token authentication, it accepts this process's token
    (else Ray retries for about 20 s and reports only that it failed to connect)."""
    if not address or address in ("local", "auto") or "://" in address:
        return  # an embedded Ray, or a form Ray resolves itself (ray://, ...)
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=5.0):
            pass
    except OSError as e:
        raise RayUnreachable(
            f"no Ray cluster answers at {address} ({e.strerror or e}); start one with "
            "`ray start --head`, or leave out --address to run on an embedded Ray"
        ) from None
    from orchestrator.ray_compat import gcs_token_check, use_token_auth

    use_token_auth()  # a `ray start --head` cluster usually wants ~/.ray/auth_token
    verdict = gcs_token_check(address)
    where = f"the Ray cluster at {address}"
    if verdict == "no token":
        raise RayUnreachable(
            f"{where} uses token authentication and this process has no token: set "
            "RAY_AUTH_MODE=token and put the cluster's token (`ray get-auth-token` on its head "
            "prints it) in ~/.ray/auth_token, or in RAY_AUTH_TOKEN or the file RAY_AUTH_TOKEN_PATH names"
        )
    if verdict == "token refused":
        raise RayUnreachable(
            f"{where} refused the token this process sent (from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
            "or ~/.ray/auth_token): it is not that cluster's token; `ray get-auth-token` on its "
            "head prints the right one"
        )


# -- storage -----------------------------------------------------------------------------------

# Failures that mean nothing answers at the endpoint (connection refused, no such host): a few
# quick tries, not the whole retry budget, which is for a store that answers badly for a while.
_NO_ANSWER = {"EndpointConnectionError", "ConnectionRefusedError", "ClientConnectorError", "gaierror"}
_NO_ANSWER_TRIES = 3


def _chain(e: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _no_answer(e: BaseException) -> bool:
    return any(
        c.__name__ in _NO_ANSWER or (isinstance(x, OSError) and x.errno == errno.ECONNREFUSED)
        for x in _chain(e)
        for c in type(x).__mro__
    )


def check_storage(spec: JobSpec) -> None:
    """Write, read and delete a small probe object under RUN_URI, as a run does; raise
    StorageError naming the storage and what is wrong (exit 4)."""
    storage = spec.open_run_storage()
    probe = f".probe-{uuid.uuid4().hex[:12]}"
    target = storage.path(probe)
    policy = spec.retry_policy

    def stop(state: tenacity.RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        limit = _NO_ANSWER_TRIES if exc is not None and _no_answer(exc) else policy.attempts
        return state.attempt_number >= limit

    def attempt(op: str, fn: Callable[[], Any]) -> None:
        retrying = tenacity.Retrying(
            stop=stop,
            wait=tenacity.wait_random_exponential(multiplier=policy.initial_s, max=policy.max_s),
            retry=tenacity.retry_if_exception(is_transient),
            reraise=True,
        )
        try:
            retrying(fn)
        except Exception as e:
            left = f"; the probe object {storage.child_uri(probe)} is left behind" if op == "delete" else ""
            raise StorageError(f"storage {spec.run_uri}: {_explain(e, op, storage)}{left}") from None

    def write() -> None:
        if storage.is_local:  # an object store has no directories (and s3fs would create a bucket)
            storage.fs.makedirs(storage.path(), exist_ok=True)
        storage.fs.pipe_file(target, b"orchestrator storage probe\n")

    attempt("write", write)
    attempt("read", lambda: storage.fs.cat_file(target))
    attempt("delete", lambda: storage.fs.rm(target))


def _endpoint(storage: Storage) -> str:
    client = getattr(storage.fs, "s3", None)
    url = getattr(getattr(client, "meta", None), "endpoint_url", None)
    opts = storage.options
    return str(
        url
        or opts.get("endpoint_url")
        or (opts.get("client_kwargs") or {}).get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or "the store's default endpoint"
    )


def _explain(e: BaseException, op: str, storage: Storage) -> str:
    """What went wrong with a probe's op, for a person: the cause first, then what to do."""
    why = storage.clean(e)
    s3 = next((r for x in _chain(e) if (r := _s3_error(x)) is not None), None)
    code, status = s3 or ("", 0)
    names = {c.__name__ for x in _chain(e) for c in type(x).__mro__}
    errnos = {x.errno for x in _chain(e) if isinstance(x, OSError)}
    if _no_answer(e):
        where = _endpoint(storage) if storage.is_s3 else storage.uri
        return (
            f"nothing answers at {where} ({why}); check storage.options.endpoint_url (or "
            "AWS_ENDPOINT_URL) and that the store is up"
        )
    if code == "NoSuchBucket":
        bucket = storage.root.split("/", 1)[0]
        return (
            f"bucket {bucket!r} does not exist at {_endpoint(storage)}; create it "
            f"(`aws s3 mb s3://{bucket}`) or fix storage.root"
        )
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch") or "NoCredentialsError" in names:
        return (
            f"the store did not accept the credentials ({why}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or storage.options key and secret"
        )
    if code == "AccessDenied" or status == 403 or "PermissionError" in names or errno.EACCES in errnos:
        need = (
            "the credentials in use need s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket there"
            if storage.is_s3
            else "this user needs to create, read and delete files there"
        )
        return (
            f"no permission to {op} under it ({why}); a run writes, reads and deletes files "
            f"under its RUN_URI: {need}"
        )
    if errno.ENOSPC in errnos or errno.EDQUOT in errnos:
        return f"no space left to {op} there ({why}); free some, or pick another storage.root"
    if errno.EROFS in errnos:
        return f"it is on a read-only filesystem ({why}); pick another storage.root"
    if errno.ENOTDIR in errnos or errno.EEXIST in errnos:
        path = next((x.filename for x in _chain(e) if isinstance(x, OSError) and x.filename), storage.root)
        blocker = _file_in_the_way(str(path))
        return (
            f"{blocker or path} is a file, not a directory, so no run can live under it ({why}); "
            "pick another storage.root"
        )
    return f"cannot {op} there: {why}"


def _file_in_the_way(path: str) -> str | None:
    """The first existing non-directory among path's parents (a local path)."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        p = os.sep.join(parts[:i])
        if os.path.lexists(p) and not os.path.isdir(p):
            return p
    return None


# -- can the cluster ever hold the workers ------------------------------------------------------


def worker_resources(spec: JobSpec) -> dict[str, float]:
    """What Ray Train reserves for each worker: resources_per_worker without zeros, plus one GPU
    with use_gpu (ray.air.ScalingConfig's own rule)."""
    need = {k: float(v) for k, v in spec.scaling.resources_per_worker.items() if v}
    if spec.scaling.use_gpu:
        need.setdefault("GPU", 1.0)
    return need


def workers_held(need: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> int | None:
    """How many workers of `need` the nodes (their total resources) can hold at once; None when a
    worker asks for nothing (any number fits)."""
    if not need:
        return None
    return sum(min(math.floor(node.get(r, 0.0) / v + 1e-9) for r, v in need.items()) for node in nodes)


def _fmt(res: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in res.items()) + "}"


def workers_fit(spec: JobSpec, started_ray: bool) -> None:
    """Refuse (SpecError, exit 2) a run whose fewest workers a fixed-size cluster can never hold;
    warn when the cluster may grow (an autoscaler) or whether it can is unknown."""
    import ray

    from orchestrator.ray_compat import cluster_can_grow

    need = worker_resources(spec)
    nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    n = spec.scaling.num_workers
    lo = n if isinstance(n, int) else n[0]  # an elastic run needs only its minimum
    holds = workers_held(need, nodes)
    if holds is None or holds >= lo:
        return
    where = (
        "on this machine's embedded Ray"
        if started_ray
        else (f"on the Ray cluster at {ray.get_runtime_context().gcs_address}")
    )
    short = [
        f"needs {lo * v:g} {r}, it has {total:g} {r} in total"
        for r, v in need.items()
        if lo * v > (total := sum(n.get(r, 0.0) for n in nodes)) + 1e-9
    ]
    if not short:
        big = max(nodes, key=lambda node: node.get("CPU", 0.0), default={})
        biggest = _fmt({r: big.get(r, 0.0) for r in need})
        short.append(f"no node can hold one worker (the largest has {biggest})")
    count = f"{lo} worker{'s' if lo != 1 else ''} x {_fmt(need)} {'does' if lo == 1 else 'do'} not fit"
    what = f"{count} {where} ({len(nodes)} node(s), room for {holds}): {'; '.join(short)}"
    grows = False if started_ray else cluster_can_grow()
    if grows is False:
        raise SpecError(
            f"scaling.num_workers: {what}; it cannot grow (no autoscaler). Lower scaling.num_workers "
            "or scaling.resources_per_worker, or add nodes"
        )
    how = "its autoscaler may add nodes" if grows else "if no autoscaler adds nodes, Ray Train waits forever"
    log.info(f"[run] warning: scaling.num_workers: {what} now; {how}")

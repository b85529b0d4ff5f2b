"""The job spec: a YAML file validated into a JobSpec before anything starts.

Every error names the file, the field path and what is wrong, so a bad spec
fails in milliseconds on the user's machine instead of minutes into a run.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.core import tasks
from orchestrator.core.errors import InputError
from orchestrator.core.storage import RetryPolicy, Storage

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SpecError(InputError, ValueError):
    """A job spec that cannot run; the message names the file and the field."""


class _Model(BaseModel):
    # No NaN or inf in any number of the spec: a TTL or a backoff of inf hangs, NaN compares false.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with a value its constructors cannot build (`!!int x`, an integer
    of more than 4300 digits) reported as a YAML error at that value's line, not a ValueError."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as e:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {e}", node.start_mark
            ) from None


def _yaml(stream: Any) -> Any:
    """Read YAML safely; RecursionError (nesting thousands deep) becomes a YAML error too."""
    try:
        return yaml.load(stream, Loader=_Loader)  # noqa: S506  # _Loader is a SafeLoader
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


_MAX_DEPTH = 32
_MAX_VALUES = 100_000  # YAML aliases can multiply a few lines into billions of values


def _plain(value: Any, where: str, depth: int = 0, seen: list[int] | None = None) -> None:
    """Task options must be plain data that survives the stored spec.yaml unchanged (resume
    reads it back): strings, finite numbers, booleans, null, lists and string-keyed maps."""
    seen = seen if seen is not None else [0]
    seen[0] += 1
    if seen[0] > _MAX_VALUES:
        raise ValueError(f"{where}: more than {_MAX_VALUES} values (YAML aliases that multiply?)")
    if depth > _MAX_DEPTH:
        raise ValueError(f"{where}: nested too deeply (more than {_MAX_DEPTH} levels)")
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: not a finite number (got {value})")
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _plain(v, f"{where}.{i}", depth + 1, seen)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} is not a string")
            _plain(v, f"{where}.{k}", depth + 1, seen)
        return
    kind = {"date": "a date", "datetime": "a date and time", "bytes": "binary data", "set": "a set"}.get(
        type(value).__name__, f"a {type(value).__name__}"
    )
    raise ValueError(f"{where}: {kind} ({value!r}) is not a plain value; quote it to pass it as a string")


class RetrySpec(_Model):
    attempts: int = Field(8, ge=1, description="Tries per storage operation, the first included.")
    initial_s: float = Field(0.2, gt=0, description="First backoff; doubles each retry.")
    max_s: float = Field(5.0, gt=0, description="Longest single backoff.")


class StorageSpec(_Model):
    root: str = Field(
        "runs", validate_default=True, description="Where runs live: a local dir, s3://bucket/prefix, ..."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options, e.g. endpoint_url / region_name for S3-compatible stores.",
    )
    retry: RetrySpec = Field(
        default_factory=RetrySpec, description="Retries of transient errors (5xx, throttling, resets)."
    )

    @field_validator("root")
    @classmethod
    def _local_roots_are_absolute(cls, v: str) -> str:
        # Ray workers and actors run in other directories: a relative path must not follow them.
        if "://" in v:
            return v.rstrip("/")
        path = os.path.expanduser(v)
        if not os.path.isabs(path) and (job_dir := ray_job_working_dir()):
            raise ValueError(
                f"{v!r} is relative, and this driver runs inside a Ray job, in Ray's temporary copy "
                f"of its working dir ({job_dir}), which Ray deletes after the job: the checkpoints "
                "and the best model would go with it. Give a path that outlives the job, e.g. "
                "--set storage.root=/shared/runs (one every node sees) or s3://bucket/runs"
            )
        return os.path.abspath(path)


def ray_job_working_dir() -> str | None:
    """The working dir of the Ray job this process is the entrypoint of (`ray job submit
    --working-dir ...`): Ray's temporary copy, which it deletes afterwards. None outside a
    job, or in a job without a working dir."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return os.getcwd() if runtime_env.get("working_dir") else None


class TaskSpec(_Model):
    name: str = Field("digits", description="Built-in task, package.module:function or file.py:function.")
    options: dict[str, Any] = Field(default_factory=dict, description="Passed to the task builder.")

    @field_validator("options")
    @classmethod
    def _options_are_plain(cls, v: dict[str, Any]) -> dict[str, Any]:
        seen = [0]
        for k, value in v.items():
            _plain(value, k, 0, seen)
        return v

    @field_validator("name")
    @classmethod
    def _task_files_are_absolute(cls, v: str) -> str:
        # A task file is relative to where the CLI runs; Ray workers run elsewhere.
        module, sep, func = v.rpartition(":")
        if sep and module.endswith(".py") and not os.path.isabs(module):
            return f"{os.path.abspath(module)}:{func}"
        return v


class ScalingSpec(_Model):
    num_workers: int | tuple[int, int] = Field(
        2,
        description="Training workers (one process per rank), or [min, max] to train elastically: "
        "on fewer workers after a node is lost, growing back when resources return.",
    )
    elastic_resize_interval_s: float = Field(
        60.0, ge=0, description="Elastic runs: how often Ray Train looks for room to grow."
    )
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL instead of gloo.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0}, description="Ray resources each worker reserves."
    )

    @field_validator("num_workers")
    @classmethod
    def _workers_positive_and_ordered(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1:
            raise ValueError(f"must be >= 1 (got {lo})")
        if lo > hi:
            raise ValueError(f"[min, max] needs min <= max (got [{lo}, {hi}])")
        return v

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]


class CheckpointSpec(_Model):
    monitor: str = Field("val_loss", description="Metric that ranks checkpoints.")
    mode: Literal["min", "max"] = Field("min", description="min for losses, max for accuracies.")
    top_k: int = Field(3, ge=1, description="Best checkpoints by `monitor` to keep.")
    keep_latest: int = Field(1, ge=1, description="Newest checkpoints to keep (resume needs >= 1).")
    every_n_epochs: int = Field(1, ge=1, description="Save at the end of every n-th epoch.")
    every_n_steps: int | Literal["auto"] | None = Field(
        None,
        description="Also save every n global steps, mid-epoch included; `auto`: as often as "
        "`overhead_budget` allows, measured as the run goes (a task's built-in loop).",
    )
    overhead_budget: float = Field(
        0.01,
        gt=0,
        le=1,
        description="With every_n_steps: auto, the share of step time saves may cost the training "
        "thread (0.01: 1%); never more often than the background writer drains a save.",
    )
    keep_every_n_epochs: int | None = Field(
        None,
        ge=1,
        description="Milestones: keep end-of-epoch checkpoints whose epoch is a multiple of n.",
    )
    async_save: bool = Field(
        True, description="Serialize and upload in the background; the step pays only a host copy."
    )
    local_cache: bool | str = Field(
        True,
        description="Node-local tier: each node keeps the last committed checkpoint it wrote or "
        "read on its own disk, and a restore uses it when its sha256 matches the committed record "
        "(else shared storage). true: <system temp dir>/orchestrator-cache-<uid> on each node; an "
        "absolute path; false: off.",
    )
    stop_on_nan: bool = Field(
        False,
        description="Stop the run (failed, every commit intact) at the first fresh metrics (an "
        "evaluation's: an epoch's end, a mid-epoch evaluation) that hold NaN or inf; they are not "
        "checkpointed. A mid-epoch save's carried metrics or NaN placeholder do not count.",
    )

    @field_validator("every_n_steps")
    @classmethod
    def _steps_are_positive(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be >= 1 or auto (got {v})")
        return v

    @field_validator("local_cache")
    @classmethod
    def _cache_is_an_absolute_path(cls, v: bool | str) -> bool | str:
        # The path is used on every node, in the worker's own working dir: it must not be relative.
        if isinstance(v, str) and not os.path.isabs(os.path.expanduser(v)):
            raise ValueError(f"{v!r}: give an absolute path on the nodes' local disk, true or false")
        return os.path.expanduser(v) if isinstance(v, str) else v


class FailureSpec(_Model):
    mode: Literal["restart", "replicas"] = Field(
        "restart",
        description="restart: a failed worker restarts the whole group from the latest committed "
        "checkpoint. replicas (needs torchft: `pip install 'torchft>=0.2,<0.3'`): every "
        "worker is a torchft replica group; a failed one is replaced alone and heals from a live "
        "peer while the others keep their state (a dead rank 0, the writer, hands its role to the "
        "lowest survivor at once); a train function trains through session.fit(task) "
        "(docs/operations.md, 'Replica groups').",
    )
    replica_heartbeat_timeout_s: float = Field(
        2.0,
        ge=0.5,
        le=600.0,
        description="failure.mode replicas: how long a replica may miss heartbeats before the "
        "others go on without it (the survivors' pause after a failure).",
    )
    replica_timeout_s: float = Field(
        30.0,
        ge=1.0,
        le=3600.0,
        description="failure.mode replicas: how long a collective, a heal's transfer or a step's "
        "commit vote may take before the replica gives up on it (its process group's timeout).",
    )
    replica_quorum_timeout_s: float = Field(
        120.0,
        ge=1.0,
        le=3600.0,
        description="failure.mode replicas: how long a step waits for its quorum, a replacement's "
        "first quorum included (it waits out the new process's start-up); must exceed "
        "replica_heartbeat_timeout_s, or a survivor gives up before the dead replica is dropped.",
    )
    max_failures: int = Field(3, ge=-1, description="Worker-group restarts before giving up (-1: no limit).")
    max_replacements: int = Field(
        20,
        ge=-1,
        le=100000,
        description="failure.mode replicas: replicas replaced alone (a dead worker restarted while "
        "the others train on) before giving up (-1: no limit); counted apart from max_failures, "
        "which counts only the restarts of the whole group.",
    )

    lease_ttl_s: float = Field(
        30.0,
        ge=1.0,
        description="A driver whose lease is not renewed for this long (by the storage's clock) "
        "may be taken over by another; it renews every ttl/6.",
    )
    stop_grace_s: float = Field(
        120.0,
        ge=1.0,
        le=86400.0,
        description="After a first Ctrl-C/SIGTERM on the driver, how long the workers get to reach "
        "their next save, commit it and stop before the driver stops at once.",
    )
    health_check_interval_s: float = Field(
        0.25,
        ge=0.05,
        le=60.0,
        description="How often Ray Train's controller polls the workers, so how soon a dead worker "
        "is noticed and the group restarted (Ray's own default: 2 s). Each poll is one small "
        "call per worker; raise it for hundreds of workers.",
    )
    checkpoint_on_preempt: bool = Field(
        False,
        description="A worker that gets SIGTERM (a preemptible node's notice before it is killed) "
        "makes every rank save and commit a checkpoint at the next sync point (every 10 steps), "
        "then the group restarts from it: no step is trained twice.",
    )


class TrackingSpec(_Model):
    tensorboard: bool = Field(True, description="Write TensorBoard event files under RUN_URI/tb.")
    mlflow_uri: str | None = Field(
        None, description="Also log to MLflow at this tracking URI (needs `pip install mlflow`)."
    )
    mlflow_experiment: str = Field("orchestrator", description="MLflow experiment name.")


class EarlyStoppingSpec(_Model):
    patience: int = Field(3, ge=1, description="Epochs without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as improvement.")


class ChaosKill(_Model):
    rank: int = Field(..., ge=0, description="World rank whose process is SIGKILLed.")
    epoch: int = Field(..., ge=1, description="Epoch (1-based) in which to kill.")
    step: int = Field(0, ge=0, description="Kill before this step within the epoch (0: at its start).")
    point: Literal["step", "after_upload", "mid_save"] = Field(
        "step",
        description="step: before a training step; after_upload: rank 0 after its checkpoint "
        "files are uploaded and before the commit; mid_save: this rank during a sharded save "
        "(session.report(sharded=...)), its shards written, before the checkpoint is recorded.",
    )


class ChaosSpec(_Model):
    kills: list[ChaosKill] = Field(default_factory=list, description="Each fires once per run.")


class JobSpec(_Model):
    name: str = Field(..., description="Run name; RUN_URI is storage.root/name.")
    storage: StorageSpec = Field(default_factory=StorageSpec)
    task: TaskSpec = Field(default_factory=TaskSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    early_stopping: EarlyStoppingSpec | None = None
    epochs: int = Field(10, ge=1)
    seed: int = Field(0, ge=0, lt=2**63, description="Model init and data order (every RNG takes it).")
    chaos: ChaosSpec = Field(default_factory=ChaosSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @field_validator("name")
    @classmethod
    def _name_is_a_path_segment(cls, v: str) -> str:
        if not RUN_NAME.fullmatch(v):  # fullmatch: `$` alone lets a trailing newline through
            raise ValueError(
                f"{v!r} is not a run name: it becomes a directory (an object key prefix) in storage, "
                f"so it must match {RUN_NAME.pattern}: letters, digits, '.', '_' and '-', starting "
                "with a letter or digit, at most 128 characters"
            )
        return v

    @model_validator(mode="after")
    def _chaos_fits_the_run(self) -> JobSpec:
        for i, kill in enumerate(self.chaos.kills):
            if kill.rank >= self.scaling.max_workers:
                raise ValueError(
                    f"chaos.kills.{i}.rank: {kill.rank} but scaling.num_workers is {self.scaling.num_workers}"
                )
            if kill.point == "after_upload" and kill.rank != 0:
                raise ValueError(f"chaos.kills.{i}.rank: after_upload kills rank 0, the writer")
            if kill.epoch > self.epochs:
                raise ValueError(
                    f"chaos.kills.{i}.epoch: {kill.epoch} is past epochs={self.epochs} (drop the fault "
                    "injection with --set 'chaos.kills=[]')"
                )
            if self.failure.mode == "replicas" and kill.point != "step":
                raise ValueError(f"chaos.kills.{i}.point: {kill.point} needs failure.mode restart")
        return self

    @model_validator(mode="after")
    def _quorum_outlasts_a_heartbeat(self) -> JobSpec:
        if self.failure.replica_quorum_timeout_s <= self.failure.replica_heartbeat_timeout_s:
            raise ValueError(
                f"failure.replica_quorum_timeout_s: {self.failure.replica_quorum_timeout_s:g} s must exceed "
                f"replica_heartbeat_timeout_s ({self.failure.replica_heartbeat_timeout_s:g} s): a survivor's "
                "quorum would time out before the lighthouse drops the dead replica"
            )
        return self

    @model_validator(mode="after")
    def _replicas_fit_the_run(self) -> JobSpec:
        if self.failure.mode != "replicas":
            return self
        why = None
        if not isinstance(self.scaling.num_workers, int) or self.scaling.num_workers < 2:
            why = (
                "scaling.num_workers must be one number >= 2: each worker is a replica group, and "
                "a failed one heals from a live peer"
            )
        elif self.checkpoint.every_n_steps == "auto":
            why = "checkpoint.every_n_steps: auto is not supported with replicas yet; give a number of steps"
        elif self.failure.checkpoint_on_preempt:
            why = (
                "failure.checkpoint_on_preempt: not needed and not supported with replicas (a "
                "preempted replica is replaced and heals from its peers)"
            )
        if why:
            raise ValueError(f"failure.mode replicas: {why}")
        return self

    @property
    def run_uri(self) -> str:
        return join_uri(self.storage.root, self.name)

    @property
    def retry_policy(self) -> RetryPolicy:
        r = self.storage.retry
        return RetryPolicy(r.attempts, r.initial_s, r.max_s)

    def open_run_storage(self, on_retry: Callable[..., None] | None = None) -> Storage:
        return Storage(self.run_uri, self.storage.options, self.retry_policy, on_retry)


def join_uri(root: str, *parts: str) -> str:
    # URIs stay str: Path would fold s3:// into s3:/.
    return "/".join([root.rstrip("/")] + [p.strip("/") for p in parts])


def resolve_task(name: str) -> Callable[..., Any]:
    """Return the builder a task name points to, or raise SpecError saying why not."""
    try:
        return tasks.resolve_task(name)
    except tasks.TaskError as e:
        raise SpecError(str(e)) from e.__cause__


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise SpecError(f"--set {dotted}: {k!r} is not a section")
        node = child
    node[keys[-1]] = value


_NUMBER = re.compile(r"[-+]?(\.\d+|\d+(\.\d*)?)([eE][-+]?\d+)?")


def read_value(raw: str, what: str) -> Any:
    """A command-line value read as YAML, with numbers read as YAML 1.2 does: PyYAML (YAML
    1.1) reads 1e-3 as the string "1e-3" (no dot), which a task then compares with a float."""
    if not raw:
        return ""
    try:
        value = _yaml(raw)
    except yaml.YAMLError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip() and not ln.lstrip().startswith("in ")]
        raise SpecError(f"{what}: not a valid YAML value: {' '.join(lines)[:300]}") from None
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return float(value)
    return value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides; values are parsed as YAML (so 3, 1e-3, true, [1,2] work)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item!r}: expected key.sub=value")
        _set_path(data, key.strip(), read_value(raw, f"--set {item}"))
    return data


# What `resume --set` may change: how long and how the run goes on, never what it computes
# (seed, task, monitor) or where it lives (name, storage.root). docs/operations.md lists them.
RESUME_SAFE = (
    "epochs",
    "failure.",
    "scaling.",
    "early_stopping",
    "chaos.",
    "checkpoint.top_k",
    "checkpoint.keep_latest",
    "checkpoint.keep_every_n_epochs",
    "checkpoint.every_n_epochs",
    "checkpoint.every_n_steps",
    "checkpoint.overhead_budget",
    "checkpoint.async_save",
    "checkpoint.stop_on_nan",
    "checkpoint.local_cache",
    "storage.options",
    "storage.retry",
    "tracking.",
)


def check_resume_overrides(overrides: Sequence[str]) -> None:
    """Refuse a `resume --set` that would change what the run computes or where it lives."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not any(key == safe.rstrip(".") or key.startswith(safe) for safe in RESUME_SAFE):
            why = "breaks exact resume" if key in ("seed", "task") or key.startswith("task.") else ""
            safe = ", ".join(s.rstrip(".") for s in RESUME_SAFE)
            raise SpecError(
                f"--set {key}: cannot change on resume{' (' + why + ')' if why else ''}; a resume "
                f"continues the run as it was started. Changeable: {safe}"
            )


def _fields_at(loc: Sequence[Any]) -> list[str]:
    """The field names the spec allows where loc's last part was found (for "did you mean")."""
    model: Any = JobSpec
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = next(
            (
                a
                for a in (field.annotation, *getattr(field.annotation, "__args__", ()))
                if hasattr(a, "model_fields")
            ),
            None,
        )
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _format_errors(source: str, err: ValidationError, overrides: Sequence[str] = ()) -> str:
    import difflib

    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _fields_at(e["loc"]), n=1)
            msg = "unknown field" + (f" (did you mean {close[0]!r}?)" if close else "")
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        got = (
            "" if e["type"] in ("missing", "value_error", "extra_forbidden") else f" (got {e.get('input')!r})"
        )
        # A field set on the command line is blamed on --set, not on the file.
        blame = next(
            (
                f"--set {o}"
                for o in overrides
                if loc == o.partition("=")[0].strip() or loc.startswith(o.partition("=")[0].strip() + ".")
            ),
            source,
        )
        lines.append(f"{blame}: {loc + ': ' if loc else ''}{msg}{got}")
    return "\n".join(lines)


def parse_spec(
    data: Any, source: str = "<spec>", check_task: bool = True, overrides: Sequence[str] = ()
) -> JobSpec:
    if data is None:
        raise SpecError(f"{source}: the spec is empty; it needs at least `name:` (see configs/digits.yaml)")
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_errors(source, e, overrides)) from None
    if check_task:
        try:
            build = resolve_task(spec.task.name)
        except SpecError as e:
            raise SpecError(f"{source}: task.name: {e}") from None
        check = getattr(sys.modules.get(build.__module__), "check_options", None)
        if check is not None:  # a task may check its options here, before Ray starts
            try:
                check(dict(spec.task.options))
            except (TypeError, ValueError) as e:
                raise SpecError(f"{source}: task.options: {e}") from None
    return spec


def load_spec(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), check_task: bool = True
) -> JobSpec:
    source = str(path)
    try:
        # A stream with a name: YAML errors then say which file and line.
        with open(path, encoding="utf-8") as f:
            data = _yaml(f)
    except OSError as e:
        raise SpecError(f"{source}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        bad = f"byte {e.object[e.start]:#04x} at offset {e.start}"
        raise SpecError(f"{source}: not UTF-8 text ({bad}); save the file as UTF-8") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: not valid YAML: {e}") from None
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides)
    return parse_spec(data, source, check_task, overrides)

"""What one rank needs to train: built by the control plane from the JobSpec, shipped to
every Ray Train worker. The worker never sees the whole spec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.core.node_cache import NodeCache, cache_root
from orchestrator.core.storage import RetryPolicy, Storage


@dataclass(frozen=True)
class Kill:
    """One injected SIGKILL (the spec's chaos.kills entry)."""

    rank: int  # world rank whose process is killed
    epoch: int  # 1-based epoch in which to kill
    step: int = 0  # before this step of the epoch
    point: Literal["step", "after_upload", "mid_save"] = "step"  # or: rank 0 after an upload, before
    # the commit; or: a rank in a sharded save, its shards written, before the checkpoint is recorded


@dataclass(frozen=True)
class WorkerConfig:
    run_uri: str  # storage root + run name
    storage_options: dict[str, Any]  # fsspec options (credentials included: not stored, only shipped)
    retry: RetryPolicy  # storage retry budget
    task: str  # task name, resolved on the worker
    task_options: dict[str, Any]  # passed to the task builder
    seed: int  # model init and data order
    epochs: int  # last epoch to train (1-based)
    use_gpu: bool  # one GPU per rank
    monitor: str  # the metric that must be reported
    mode: Literal["min", "max"]  # for early stopping
    every_n_epochs: int = 1  # end-of-epoch save cadence
    every_n_steps: int | None = None  # mid-epoch save cadence (global steps)
    auto_budget: float | None = None  # every_n_steps: auto, with this overhead budget (workers/cadence.py)
    async_save: bool = True  # serialize and upload in the background
    local_cache: bool | str = True  # node-local tier: the system temp dir's, a directory, or off
    stop_on_nan: bool = False  # stop at the first non-finite metric
    early_stopping: tuple[int, float] | None = None  # (patience, min_delta)
    kills: tuple[Kill, ...] = field(default_factory=tuple)  # fault injection
    replicas: bool = False  # failure.mode replicas: each rank a torchft replica group (workers/replicas.py)
    replica_timeout_s: float = 30.0  # a collective, a heal's transfer, a commit vote (replicas)
    replica_quorum_timeout_s: float = 120.0  # a step's quorum, a replacement's first one included

    def open_storage(self, on_retry: Callable[..., None] | None = None) -> Storage:
        storage = Storage(self.run_uri, self.storage_options, self.retry, on_retry)
        if (root := cache_root(self.local_cache)) is not None:
            storage.node_cache = NodeCache(root, self.run_uri)
        return storage

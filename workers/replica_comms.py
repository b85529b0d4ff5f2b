"""failure.mode replicas: what carries a replica group's collectives and its heals, by device
(workers/replicas.py builds its torchft Manager from it; bench/gpu_check.py checks it on a GPU).

    cpu:  torchft's ProcessGroupGloo for everything; heals over torchft's default
          HTTPTransport (the path tests/test_replicas.py runs).
    cuda: torchft's ProcessGroupNCCL for device tensors (the gradients), with a gloo backend
          registered on the same process group for CPU tensors, so the word
          (workers/replicas.py `_control`, a CPU float64 tensor) never goes through NCCL and
          both are rebuilt together at each new quorum; heals over torchft's PGTransport on
          that group, device to device (what torchft's and Ray's examples pair with NCCL), and
          NCCL's own timeouts set below failure.replica_quorum_timeout_s.

Written for GPUs and checked on CPU only here; `python bench/gpu_check.py --only replicas`
runs two replica groups, a kill and a heal on a device. NCCL refuses two ranks of one
communicator on one GPU ("Duplicate GPU detected"), so the NCCL heal needs two GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

GLOO, NCCL_GLOO = "gloo", "nccl+gloo"  # the process group
HTTP, PG = "http", "pg"  # the heal's transport: torchft's HTTPTransport, its PGTransport


@dataclass(frozen=True)
class Comms:
    pg: str  # GLOO or NCCL_GLOO
    transport: str  # HTTP or PG
    timeout_s: float  # a collective, a heal's transfer, a commit vote (the Manager's timeout)
    env: dict[str, str] = field(default_factory=dict)  # set in the worker before the first NCCL group


def replica_comms(device_type: str, timeout_s: float, quorum_timeout_s: float) -> Comms:
    """The process group, heal transport, timeout and NCCL environment of a replica on
    `device_type`, from failure.replica_timeout_s and failure.replica_quorum_timeout_s.

    On cuda, a collective with a dead peer does not fail at once as gloo's does (a closed
    connection): NCCL waits until torchft's timer aborts the communicator. The survivors must
    give up on it and come back to the quorum before their peers' quorum times out, so the
    timeout is at most half the quorum timeout. TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (clean up
    only): an error NCCL's watchdog sees (a peer gone) aborts the communicator and fails the
    collective, where torch's default (3) would end the survivor's process.
    TORCH_NCCL_NONBLOCKING_TIMEOUT: torchft's communicators are non-blocking; their creation
    and abort give up after the timeout (torchft sets it to its own timeout, with a warning,
    when unset). TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC: a watchdog stuck that long (in an abort
    that never returns) ends the process, between the timeout and the quorum timeout, so a
    replica stuck in NCCL, whose torchft heartbeats would keep it in the quorum, is replaced
    instead of holding the others past their quorum timeout. TORCH_NCCL_BLOCKING_WAIT=0:
    torchft waits with its own timers; a blocking wait would raise only at the communicator's
    own timeout (torchft clears each collective's), 10 minutes."""
    if device_type == "cpu":
        return Comms(GLOO, HTTP, timeout_s)
    if device_type != "cuda":
        raise ValueError(f"failure.mode replicas: no process group for device {device_type!r} (cpu or cuda)")
    timeout = min(timeout_s, quorum_timeout_s / 2)
    heartbeat = max(1, int((timeout + quorum_timeout_s) / 2))
    env = {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
        "TORCH_NCCL_NONBLOCKING_TIMEOUT": str(math.ceil(timeout)),  # whole seconds (torch reads an int)
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(heartbeat),
        "TORCH_NCCL_BLOCKING_WAIT": "0",
    }
    return Comms(NCCL_GLOO, PG, timeout, env)


def process_group(comms: Comms) -> Any:
    """torchft's reconfigurable process group for `comms` (torchft imported here: optional)."""
    from torchft import ProcessGroupGloo

    timeout = timedelta(seconds=comms.timeout_s)
    if comms.pg == GLOO:
        return ProcessGroupGloo(timeout=timeout)
    return _nccl_with_gloo(timeout)


def transport(comms: Comms, pg: Any, device: torch.device) -> Any:
    """The heal's checkpoint transport; None: the Manager's default (HTTPTransport)."""
    if comms.transport == HTTP:
        return None
    from torchft.checkpointing.pg_transport import PGTransport

    return PGTransport(pg, timeout=timedelta(seconds=comms.timeout_s), device=device)


def add_gloo_for_cpu(pg: Any, store: Any, rank: int, world_size: int, timeout: timedelta) -> Any:
    """Register a gloo backend for CPU tensors on `pg` (a torch ProcessGroup), under its own
    prefix of the quorum's store, so a collective dispatches by its tensor's device."""
    import torch.distributed as dist

    gloo = dist.ProcessGroupGloo(dist.PrefixStore("gloo/", store), rank, world_size, timeout)
    gloo._set_sequence_number_for_group()
    pg._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, gloo)
    return pg


def _nccl_with_gloo(timeout: timedelta) -> Any:
    from torchft import ProcessGroupNCCL

    class NcclWithGloo(ProcessGroupNCCL):  # type: ignore[misc]
        """torchft's NCCL group (device tensors), with gloo for CPU tensors on the same
        quorum: configured, aborted and rebuilt as one by the Manager."""

        def _create_pg(self, store: Any, rank: int, world_size: int) -> Any:
            pg = super()._create_pg(store, rank, world_size)
            return add_gloo_for_cpu(pg, store, rank, world_size, self._timeout)

        def getBackendName(self) -> str:
            return "torchft-nccl-gloo"

    return NcclWithGloo(timeout)

"""Resuming a rank: which checkpoint (planned once, on rank 0, with the coordinator),
putting model, optimizer and RNG streams back, and re-mapping a checkpoint taken with
another world size (elastic runs).

    rank 0: start_attempt -> the latest commit -> verify it (a bad one is marked and the
            next newest tried) -> broadcast the plan
    every rank: read and verify its own copy -> load -> RNG streams (same world size) or
                a fresh seed (another world size) -> where to continue
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.core.lease import LeaseLost
from orchestrator.core.manifest import CheckpointRecord
from orchestrator.core.storage import Storage
from orchestrator.core.verify import VerificationError, read_verified
from workers.calls import call
from workers.distributed import broadcast
from workers.rng import restore_rng, seed_all
from workers.task import Task

if TYPE_CHECKING:
    from workers.rank import Restoring


def plan_restore(
    coord: Any, storage: Storage, rank: int, world: int,
    on_local: Callable[[CheckpointRecord], object] | None = None,
) -> tuple[dict[str, Any], dict[str, bytes] | None]:  # fmt: skip
    """Rank 0 asks the coordinator to start an attempt and verifies the checkpoint it names,
    falling back past bad ones; every rank gets the plan. Rank 0 also returns the verified
    bytes, so it does not read them twice. on_local(record): rank 0's restore was served by
    the node-local tier, so the shared copy went unread (read_verified)."""
    plan: dict[str, Any] | None = None
    blobs: dict[str, bytes] | None = None
    if rank == 0:
        try:
            plan = call(coord.start_attempt, world)
        except LeaseLost as e:  # another driver took the run over: this attempt must not start
            return broadcast({"attempt": 0, "restore": None, "taken_over": str(e)}), None
        rec = plan["restore"]
        while rec is not None and not rec.get("sharded"):  # sharded: every rank verifies what it reads
            try:
                blobs = _read_twice(storage, CheckpointRecord.model_validate(rec), on_local)
                break
            except VerificationError as e:
                print(f"[restore] checkpoint {rec['id']} failed verification twice: {e}", flush=True)
                rec = call(coord.next_restore, rec["id"], f"{e} (read twice)")
        plan["restore"] = rec
    return broadcast(plan), blobs


def _read_twice(
    storage: Storage, record: CheckpointRecord, on_local: Callable[[CheckpointRecord], object] | None
) -> dict[str, bytes]:
    """read_verified, with a second look before a failure counts: marking a checkpoint bad
    deletes it from shared storage, so one flaky read must not be enough."""
    try:
        return read_verified(storage, record, on_local)
    except VerificationError as e:
        print(f"[restore] checkpoint {record.id} failed verification ({e}); reading it again", flush=True)
        return read_verified(storage, record, on_local)


@dataclass
class Resumed:
    """Where this rank continues, and the state the loop still needs."""

    attempt: int
    start_epoch: int = 1
    start_step: int = 0
    global_step: int = 0
    epoch_acc: dict[str, float] | None = None  # this rank's running loss of the epoch
    loader_state: Any = None  # this rank's StatefulDataLoader state_dict, mid-epoch
    train_state: dict[str, Any] = field(default_factory=dict)


def restore(session: Restoring, task: Task, model: torch.nn.Module) -> Resumed:
    """Put this rank of a Task back where the latest good checkpoint left it (or at the start)."""
    from workers.state import MODEL_FILE, STATE_FILE, Position, load_tensor_file

    blobs = session.restored_files()
    out = Resumed(attempt=session.attempt)
    if blobs is None:
        return out
    rank, world, seed = session.rank, session.world, session.cfg.seed
    # Both files load to host memory: load_state_dict copies weights onto the model's
    # device and the optimizer casts its moments to their parameters' devices, while RNG
    # states and Adam's step counters must stay CPU tensors (a cuda map_location broke a
    # GPU resume in torch.set_rng_state; bench/gpu_check.py shows it).
    model.load_state_dict(load_tensor_file(blobs[MODEL_FILE]))
    state = load_tensor_file(blobs[STATE_FILE])
    at = Position(**state["progress"])
    task.optimizer.load_state_dict(state["optimizer"])
    if task.scheduler is not None and state.get("scheduler") is not None:
        task.scheduler.load_state_dict(state["scheduler"])
    if task.grad_scaler is not None and state.get("grad_scaler") is not None:
        task.grad_scaler.load_state_dict(state["grad_scaler"])
    out.start_epoch, out.start_step = at.resume_point()
    out.global_step, out.train_state = at.global_step, state
    ranks = state["ranks"]
    if len(ranks) == world:
        restore_rng(ranks[rank]["rng"])
        out.epoch_acc = ranks[rank]["epoch_acc"]
        out.loader_state = ranks[rank].get("loader")
    else:  # elastic resume: per-rank streams cannot map onto a new world size
        seed_all(seed + rank + 7919 * at.global_step)
        if out.start_step:
            # Mid-epoch: keep the number of samples the epoch has seen, not the step index
            # (a step of 2 ranks covers twice the samples of a step of 1).
            out.start_step = out.start_step * len(ranks) // world
    return out

"""Resuming a rank: which checkpoint (planned once, on rank 0, with the coordinator),
putting model, optimizer and RNG streams back, and re-mapping a checkpoint taken with
another world size (elastic runs).

    rank 0: start_attempt -> the latest commit -> verify it (a bad one is marked and the
            next newest tried) -> broadcast the plan
    every rank: read and verify its own copy -> load -> RNG streams (same world size) or
                a fresh seed (another world size) -> where to continue
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.core.lease import LeaseLost
from orchestrator.core.manifest import CheckpointRecord
from orchestrator.core.storage import Storage
from orchestrator.core.verify import VerificationError, read_verified
from workers.calls import Coordinator
from workers.distributed import broadcast
from workers.format import MODEL_FILE, STATE_FILE, load_tensor_file
from workers.metrics import RunningLoss
from workers.rng import restore_rng, seed_all

if TYPE_CHECKING:
    from workers.rank import Restoring
    from workers.state import TrainState

log = logging.getLogger(__name__)


def plan_restore(
    coord: Coordinator,
    storage: Storage,
    rank: int,
    world: int,
    on_local: Callable[[CheckpointRecord], object] | None = None,
    replica: bool = False,
) -> tuple[dict[str, Any], dict[str, bytes] | None]:
    """Rank 0 asks the coordinator to start an attempt and verifies the checkpoint it names,
    falling back past bad ones; every rank gets the plan. Rank 0 also returns the verified
    bytes, so it does not read them twice. on_local(record): rank 0's restore was served by
    the node-local tier, so the shared copy went unread (read_verified). replica: a replicas
    run's rank 0, which may be a replacement while a survivor writes (then the plan names that
    writer, "writer", and restores nothing)."""
    plan: dict[str, Any] | None = None
    blobs: dict[str, bytes] | None = None
    if rank == 0:
        try:
            plan = coord.start_attempt(world, replica=replica)
        except LeaseLost as e:  # another driver took the run over: this attempt must not start
            return broadcast({"attempt": 0, "restore": None, "taken_over": str(e)}), None
        rec = plan["restore"]
        while rec is not None and not rec.get("sharded"):  # sharded: every rank verifies what it reads
            try:
                blobs = _read_twice(storage, CheckpointRecord.model_validate(rec), on_local)
                break
            except VerificationError as e:
                log.info(f"[restore] checkpoint {rec['id']} failed verification twice: {e}")
                rec = coord.next_restore(rec["id"], f"{e} (read twice)")
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
        log.info(f"[restore] checkpoint {record.id} failed verification ({e}); reading it again")
        return read_verified(storage, record, on_local)


@dataclass
class Resumed:
    """Where this rank continues, beyond what its TrainState holds."""

    attempt: int
    start_epoch: int = 1
    start_step: int = 0
    loader_state: Any = None  # this rank's StatefulDataLoader state_dict, mid-epoch
    restored: bool = False


def restore(session: Restoring, state: TrainState) -> Resumed:
    """Put this rank's TrainState back where the latest good checkpoint left it (or leave it
    at the start)."""
    blobs = session.restored_files()
    out = Resumed(attempt=session.attempt)
    if blobs is None:
        return out
    rank, world, seed = session.rank, session.world, session.cfg.seed
    # Both files load to host memory: load_state_dict copies weights onto the model's
    # device and the optimizer casts its moments to their parameters' devices, while RNG
    # states and Adam's step counters must stay CPU tensors (a cuda map_location broke a
    # GPU resume in torch.set_rng_state; bench/gpu_check.py shows it).
    saved = load_tensor_file(blobs[STATE_FILE])
    at = state.load_files(load_tensor_file(blobs[MODEL_FILE]), saved)
    out.start_epoch, out.start_step, out.restored = state.epoch, state.step, True
    ranks = saved["ranks"]
    if len(ranks) == world:
        restore_rng(ranks[rank]["rng"])
        state.epoch_loss = RunningLoss(state.device, ranks[rank]["epoch_acc"] if state.step else None)
        out.loader_state = ranks[rank].get("loader")
    else:  # elastic resume: per-rank streams cannot map onto a new world size
        seed_all(seed + rank + 7919 * at.global_step)
        if out.start_step:
            # Mid-epoch: keep the number of samples the epoch has seen, not the step index
            # (a step of 2 ranks covers twice the samples of a step of 1).
            out.start_step = state.step = out.start_step * len(ranks) // world
    return out

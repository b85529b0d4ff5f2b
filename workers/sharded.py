"""Sharded checkpoints: every rank writes its own shards with torch.distributed.checkpoint (DCP).

A train function whose model is sharded (FSDP2's `fully_shard`) hands the session the model
and optimizer instead of a full state:

    state = session.restore(sharded={"model": model, "optimizer": opt})   # loads in place
    session.report(metrics, epoch=epoch, state={"epoch": epoch},
                   sharded={"model": model, "optimizer": opt})

A save (every rank, on the training thread):
    every rank: DCP writes this rank's shards straight into checkpoints/<id>/ (`__<rank>_0.distcp`;
        rank 0 also DCP's `.metadata`), each file hashed (sha256) as it is written, never read back
    -> the `chaos.kills` point `mid_save` fires here
    -> the ranks' file lists are gathered to rank 0, whose background writer adds train_state.pt
       (`state`), writes checkpoint.json listing every rank's files last, and commits
So the coordinator sees a record only once every rank's part is in storage, and checks that it
names files from every rank. A directory some rank started that was never committed is an
orphan like any other: never named by the manifest, so never restored, and collected.

A restore (every rank): rank 0 names the checkpoint (plan_restore, as ever); DCP's own load
planner decides which files each rank reads (it reshards for another world size). Before any
data is read, each rank copies the files it will read from shared storage into a local
temporary directory, hashing them on the way (one read of shared storage), and DCP loads from
that verified copy; the coordinator rank hashes (without copying) any file no rank reads. A
file that does not match the record fails the load on every rank before anything is loaded:
the checkpoint is marked bad and the next newest is tried. DCP's `.metadata` and its small
pickled values are read weights-only (a pickle that names code is refused, never run).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemBase
from torch.distributed.checkpoint.metadata import Metadata

from orchestrator.core.manifest import CHECKPOINTS, CheckpointRecord, FileEntry
from orchestrator.core.storage import HashingWriter, Storage
from orchestrator.core.verify import CheckpointRefused, VerificationError, copy_verified
from workers.distributed import broadcast, gather
from workers.format import (  # noqa: F401  # load_metadata, consolidate: re-exported
    METADATA,
    MODEL,
    STATE_FILE,
    LocalReader,
    WeightsOnlyPlanner,
    consolidate,
    load_metadata,
    load_tensor_file,
)

if TYPE_CHECKING:
    from workers.rank import Restoring, Saving

log = logging.getLogger(__name__)


# -- what a train function hands over ------------------------------------------------------
def state_dict_of(targets: dict[str, Any]) -> dict[str, Any]:
    """DCP's state dict of {"model": module, "optimizer": optimizer or a list (optional)}:
    each rank's own shards (DTensors under FSDP2), through DCP's get_state_dict."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if "model" not in targets or set(targets) - {"model", "optimizer"}:
        raise ValueError(
            f"sharded= takes {{'model': module, 'optimizer': optimizer}} (the optimizer "
            f"optional), not {sorted(targets)}; other state goes in state="
        )
    if targets.get("optimizer") is None:
        return {"model": get_model_state_dict(targets["model"])}
    model_sd, optim_sd = get_state_dict(targets["model"], targets["optimizer"])
    return {"model": model_sd, "optimizer": optim_sd}


def apply_state_dict(targets: dict[str, Any], sd: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if "optimizer" in sd:
        set_state_dict(
            targets["model"],
            targets["optimizer"],
            model_state_dict=sd["model"],
            optim_state_dict=sd["optimizer"],
        )
    else:
        set_model_state_dict(targets["model"], sd["model"])


# -- save ------------------------------------------------------------------------------------
def save_shards(session: Saving, cid: str, epoch: int, targets: dict[str, Any]) -> list[FileEntry]:
    """Every rank writes its shards of checkpoint cid; returns every rank's files (size and
    sha256), in rank order, on every rank. A collective: every rank calls it."""
    part = write_shards(session.storage, cid, state_dict_of(targets), session.rank)
    session.chaos.mid_save(epoch, cid)
    return [entry for rank_part in gather(part) for entry in rank_part]


def write_shards(storage: Storage, cid: str, sd: dict[str, Any], rank: int) -> list[FileEntry]:
    """dcp.save of sd into checkpoints/<cid>/ on the run's storage; this rank's files."""
    fs = _HashedFS(storage.fs)
    writer = FileSystemWriter(cid, sync_files=storage.is_local)
    writer.fs, writer.path = fs, storage.path(f"{CHECKPOINTS}/{cid}")  # type: ignore[assignment]
    try:
        dcp.save(sd, storage_writer=writer)
    except CheckpointException as e:  # a BaseException: make it an error the loop reports
        raise RuntimeError(f"sharded save of {cid} failed: {e}") from None
    return [
        FileEntry(path=name, size=size, sha256=digest, rank=rank)
        for name, (size, digest) in sorted(fs.written.items())
    ]


class _HashedStream(HashingWriter):
    """What DCP writes a file through: hashed and counted on the way to storage."""

    def tell(self) -> int:  # DCP records each item's offset; the file starts empty
        return self.size

    def fileno(self) -> int:  # DCP fsyncs local files
        return int(self.out.fileno())

    def close(self) -> None:
        self.out.close()


class _HashedFS(FileSystemBase):
    """DCP's filesystem interface on the run's fsspec filesystem (local, s3://, ...), with
    every file written recorded as name -> (size, sha256)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs
        self.written: dict[str, tuple[int, str]] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        path = os.fspath(path)
        with self.fs.open(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            out = _HashedStream(raw)
            yield out  # type: ignore[misc]
        self.written[os.path.basename(path)] = (out.size, out.hexdigest())

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return f"{os.fspath(path).rstrip('/')}/{suffix}"

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        self.fs.mv(os.fspath(path), os.fspath(new_path))  # DCP writes .metadata.tmp, then renames it
        self.written[os.path.basename(new_path)] = self.written.pop(os.path.basename(path))

    def init_path(self, path: str | os.PathLike) -> str:
        return os.fspath(path)

    def mkdir(self, path: str | os.PathLike) -> None:
        self.fs.makedirs(os.fspath(path), exist_ok=True)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    def exists(self, path: str | os.PathLike) -> bool:
        return bool(self.fs.exists(os.fspath(path)))

    def rm_file(self, path: str | os.PathLike) -> None:
        self.fs.rm(os.fspath(path))


# -- restore -----------------------------------------------------------------------------------
def restore_shards(
    session: Restoring, targets: dict[str, Any]
) -> tuple[CheckpointRecord | None, bytes | None]:
    """Load the latest good sharded checkpoint into targets in place (every rank); returns its
    record and the verified bytes of its train_state.pt, or (None, None)."""
    record = session.restored_record()
    if record is None:
        return None, None
    sd = state_dict_of(targets)
    found, state = load_verified(
        session.storage, record, sd, session.rank, lambda bad, why: _next_restore(session, bad, why)
    )
    if found is not None:
        apply_state_dict(targets, sd)
        if session.rank == 0:
            log.info(
                f"[restore] attempt {session.attempt}: resumed from {found.id} (epoch {found.epoch}, "
                f"step {found.global_step}; sharded, saved by {found.world_size} ranks, loaded by "
                f"{session.world})"
            )
    return found, state


def _next_restore(session: Restoring, bad: str, why: str) -> dict[str, Any] | None:

    return session.coord.next_restore(bad, why)


def load_verified(
    storage: Storage,
    record: CheckpointRecord | None,
    sd: dict[str, Any],
    rank: int,
    next_restore: Callable[[str, str], dict[str, Any] | None],
) -> tuple[CheckpointRecord | None, bytes | None]:
    """dcp.load of record into sd (every rank), every file verified before any is loaded. A
    checkpoint that fails verification on any rank is reported (next_restore, on rank 0: the
    coordinator marks it bad and names the next newest) and the next one tried, after a second
    look: a read that failed once (a flaky connection) must not cost a good checkpoint."""
    second_look: set[str] = set()
    while record is not None:
        if not record.sharded:
            raise ValueError(
                f"checkpoint {record.id} is not sharded (rank 0 wrote it whole): restore it "
                "with session.restore() and load_state_dict"
            )
        with tempfile.TemporaryDirectory(prefix=f"orchestrator-{record.id}-r{rank}-") as local:
            reader = _VerifyingReader(storage, record, local)
            try:
                dcp.load(sd, storage_reader=reader, planner=WeightsOnlyPlanner())
            except CheckpointException as e:  # on every rank alike: DCP gathers its failures
                failed = [why for why in gather(reader.error) if why]
                if not failed:
                    raise RuntimeError(f"loading sharded checkpoint {record.id} failed: {e}") from None
            else:
                with open(os.path.join(local, STATE_FILE), "rb") as f:
                    return record, f.read()
        if record.id not in second_look:  # every rank gathered the same failures: all retry
            second_look.add(record.id)
            if rank == 0:
                log.info(
                    f"[restore] checkpoint {record.id} failed verification ({failed[0]}); reading it "
                    "again before marking it bad"
                )
            continue
        if rank == 0:
            log.info(f"[restore] checkpoint {record.id} failed verification twice: {failed[0]}")
        nxt = broadcast(next_restore(record.id, f"{failed[0]} (read twice)") if rank == 0 else None)
        record = CheckpointRecord.model_validate(nxt) if nxt else None
    return None, None


class _VerifyingReader(LocalReader):
    """Copies what this rank reads from the run's storage into `local`, checked against the
    record, after DCP has planned the reads and before it reads anything (StorageReader's
    prepare_local_plan); the coordinator hashes what no rank reads (prepare_global_plan)."""

    def __init__(self, storage: Storage, record: CheckpointRecord, local: str) -> None:
        super().__init__(local)
        self.storage, self.record, self.local = storage, record, local
        self.listed = {f.path for f in record.files}
        self.error: str | None = None  # why this rank found the checkpoint bad

    def _verify(self, names: set[str], into: str | None) -> None:
        try:
            if unlisted := sorted(names - self.listed):
                raise VerificationError(
                    f"{self.record.dir}/{unlisted[0]}: read by the checkpoint but not in its record"
                )
            copy_verified(self.storage, self.record, into, only=names)
        except VerificationError as e:
            self.error = str(e)
            raise

    def read_metadata(self, *args: Any) -> Metadata:
        self._verify({METADATA, STATE_FILE}, self.local)
        try:
            return super().read_metadata()
        except CheckpointRefused as e:
            self.error = str(e)
            raise

    def _files(self, plans: list[Any]) -> set[str]:
        return {self.storage_data[item.storage_index].relative_path for p in plans for item in p.items}

    def prepare_local_plan(self, plan: Any) -> Any:
        self._verify(self._files([plan]), self.local)
        return plan

    def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
        self._verify(self.listed - self._files(plans) - {METADATA, STATE_FILE}, None)
        return plans

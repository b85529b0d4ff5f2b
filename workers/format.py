"""The checkpoint format, the one thing the read side (orchestrator/api.py, export.py) needs
of the data plane: the file names, where in training a checkpoint was taken (Position),
loading a file's tensors weights-only, and reading a sharded checkpoint back in one process
(DCP's metadata, read weights-only, and consolidation). Imports nothing else of the project
but the core (tests/test_layers.py holds it to that).

    model.pt         the model's state_dict alone (loads with weights_only=True, without this package)
    train_state.pt   everything else exact resume needs (workers/state.py writes it)
    .metadata, *.distcp   a sharded checkpoint: DCP's index and every rank's shards (workers/sharded.py)
"""

from __future__ import annotations

import io
import os
import pickle
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from orchestrator.core.verify import CheckpointRefused

METADATA = ".metadata"  # DCP's index of the shards, written by rank 0
MODEL = "model."  # the model's keys in a sharded checkpoint (the optimizer's: "optimizer.")
MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


@dataclass
class Position:
    """Where in training a checkpoint was taken."""

    epoch: int = 1  # the epoch being trained (1-based)
    step_in_epoch: int = 0  # steps of it already trained
    global_step: int = 0
    end_of_epoch: bool = False

    def resume_point(self) -> tuple[int, int]:
        """(epoch, step) where training continues after this checkpoint."""
        return (self.epoch + 1, 0) if self.end_of_epoch else (self.epoch, self.step_in_epoch)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_tensor_file(
    data: bytes | str, device: str | torch.device = "cpu", name: str = "checkpoint file"
) -> Any:
    """A checkpoint file's tensors (bytes, or a local path), loaded weights-only: a pickle that
    names code (a `__reduce__` payload) is refused before anything in it runs, and the
    refusal is a CheckpointRefused naming the file, not torch's advice to load it unsafely."""
    import pickle

    from orchestrator.core.verify import CheckpointRefused

    try:
        return torch.load(
            io.BytesIO(data) if isinstance(data, bytes) else data, map_location=device, weights_only=True
        )
    except pickle.UnpicklingError as e:
        found = re.search(r"(Trying to load unsupported GLOBAL \S+|Unsupported [^\n]+)", str(e))
        raise CheckpointRefused(
            f"{name}: refused to load: it is not plain tensors ({found.group(1) if found else e}). "
            "Checkpoints are loaded weights-only, so nothing in the file ran. This project never "
            "writes such a file: someone else wrote it; do not load it with weights_only=False"
        ) from None


class LocalReader(FileSystemReader):
    """DCP's reader over a local directory of verified files; .metadata read weights-only."""

    def read_metadata(self, *args: Any) -> Metadata:  # no **kwargs: no rank-local metadata
        with open(os.path.join(self.path, METADATA), "rb") as f:
            md = load_metadata(f.read(), os.path.join(self.path, METADATA))
        meta = md.storage_meta or StorageMeta()
        meta.load_id = self.load_id
        md.storage_meta = meta
        return md


class WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP stores small non-tensor values (an optimizer's lr, betas) as pickles and loads them
    with weights_only=False; these are checked weights-only first, so one that names code is
    refused before it runs."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        load_tensor_file(value.getvalue(), name=f"sharded value {read_item.dest_index.fqn}")
        value.seek(0)
        super().load_bytes(read_item, value)


_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        kinds = (torch.dtype, torch.layout, torch.memory_format)
        if name in _METADATA_GLOBALS.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), kinds)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global {module}.{name}")


def load_metadata(data: bytes, name: str) -> Metadata:
    """DCP's .metadata (a pickle), allowing only the types DCP's metadata is made of."""
    try:
        md = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise CheckpointRefused(
            f"{name}: refused to load: it is not DCP metadata ({e}); nothing in it ran. "
            "This project never writes such a file: someone else wrote it"
        ) from None
    if not isinstance(md, Metadata):
        raise CheckpointRefused(f"{name}: refused to load: a {type(md).__name__}, not DCP metadata")
    return md


def consolidate(local: str) -> dict[str, torch.Tensor]:
    """The model's full state_dict from a verified local copy of a sharded checkpoint, in one
    process without a process group (DCP reassembles every rank's shards)."""
    md = LocalReader(local).read_metadata()
    sd = {
        key: torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in md.state_dict_metadata.items()
        if key.startswith(MODEL) and isinstance(m, TensorStorageMetadata)
    }
    dcp.load(sd, storage_reader=LocalReader(local), planner=WeightsOnlyPlanner(), no_dist=True)
    return {key[len(MODEL) :]: t for key, t in sd.items()}

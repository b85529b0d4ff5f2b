"""The Python API: read a run from its storage alone, and get its best model.

    from orchestrator import open_run, load_best

    run = open_run("s3://bucket/runs/digits")         # or a local runs/digits
    run.best()                                         # the best checkpoint, verified
    run.state()                                        # running | stale | interrupted | failed | finished
    run.checkpoints(); run.metrics(); run.events()
    model = load_best("runs/digits", model=MyNet())    # weights verified and loaded, model.eval()

Read-only: nothing here writes to the run, and nothing imports the user's task unless
asked (`load_best(..., build=True)`). Monitor and mode come from the manifest, never a
guess. The CLI's read commands (`checkpoints`, `best`, `metrics`, `events`) are built on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.core.errors import EXIT_INPUT, OrchestratorError
from orchestrator.core.manifest import (
    EVENTS,
    METRICS,
    SPEC,
    CheckpointRecord,
    Manifest,
    ManifestError,
    read_jsonl,
    read_manifest,
)
from orchestrator.core.retention import rank_best
from orchestrator.core.storage import Storage
from orchestrator.core.verify import VerificationError, copy_verified
from orchestrator.lifecycle import RunState, run_state

MODEL_FILE = "model.pt"  # the weights alone (workers/format.py; not imported here: it needs torch)
# Files handed out of a run (`best --download`, `export`) are read by a server, often as another
# user: mode 0644 whatever the umask.
FILE_MODE = 0o644


def readable_by_all(paths: list[str]) -> list[str]:
    """paths, each made mode FILE_MODE (0644)."""
    for p in paths:
        os.chmod(p, FILE_MODE)
    return paths


def weight_files(record: CheckpointRecord) -> set[str]:
    """The files that hold a checkpoint's weights: model.pt, or a sharded one's shards and
    their index (workers/sharded.py; everything but train_state.pt and the extra files)."""
    if record.sharded:
        return {f.path for f in record.files if f.path != "train_state.pt"} - record.extra_files
    return {MODEL_FILE}


class RunNotFound(ManifestError):
    """RUN_URI holds no run (no manifest.json)."""

    exit_code = EXIT_INPUT


class NoCheckpoint(OrchestratorError, LookupError):
    """The run has no committed checkpoint that carries the monitor and verifies."""


@dataclass(frozen=True)
class Checkpoint:
    """One committed checkpoint as a reader sees it."""

    id: str
    uri: str
    epoch: int
    global_step: int
    end_of_epoch: bool
    metrics: dict[str, float]
    metrics_fresh: bool  # measured on these weights (not carried over), so ranked by the monitor
    kept_because: list[str]
    rank: int | None  # 1 = best by the monitor; None: not ranked (carried metrics, NaN)
    record: CheckpointRecord = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "record"}
        out["files"] = [f.model_dump() for f in self.record.files]
        return out


@dataclass
class Verified:
    """A checkpoint whose files matched their record, where they were copied (if asked), and
    the better-ranked ones skipped as damaged."""

    checkpoint: Checkpoint
    paths: list[str]
    skipped: list[dict[str, str]]


class Run:
    """A run at RUN_URI (storage root + run name), read from storage."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.storage = Storage(self.uri, storage_options or {})
        self._spec: dict[str, Any] | None = None
        self.manifest = self._read()
        self.monitor, self.mode = self._ranking()

    def _read(self) -> Manifest:
        m = read_manifest(self.storage)
        if m is None:
            raise RunNotFound(
                f"{self.uri}: no manifest.json; is this a run directory (storage root + run name)?"
            )
        return m

    def refresh(self) -> Run:
        """Read the manifest again (a live run commits while you look)."""
        self.manifest = self._read()
        return self

    def _ranking(self) -> tuple[str, str]:
        """Monitor and mode from the manifest; for runs written before it carried them, from
        the stored spec as data (the task is not imported). Never a guess."""
        if self.manifest.retention:
            return self.manifest.retention["monitor"], self.manifest.retention["mode"]
        import yaml

        try:
            ck = self.stored_spec().get("checkpoint") or {}
            return str(ck.get("monitor", "val_loss")), str(ck.get("mode", "min"))
        except (FileNotFoundError, yaml.YAMLError, AttributeError) as e:
            raise ManifestError(
                f"{self.uri}: cannot tell which metric ranks this run's checkpoints (an old manifest "
                f"without its monitor, and no readable {SPEC}: {e})"
            ) from None

    @property
    def status(self) -> str:
        """The status the manifest stores: running, finished or failed. state() says what it
        means now (interrupted, or stale by a driver that is gone)."""
        return self.manifest.status

    def state(self) -> RunState:
        """The run's state now: running, stale (stored running, its driver gone: lease stale
        or missing), interrupted (Ctrl-C/SIGTERM, resumable), failed or finished, with why and
        what to run next. Reads lease.json for a running run; writes nothing (but the storage's
        clock probe, for a local run). See orchestrator.lifecycle."""
        return run_state(self.storage, self.manifest)

    def stored_spec(self) -> dict[str, Any]:
        """The spec the run was started with (spec.yaml, secrets redacted), as plain data: read,
        never validated, so the task is not imported."""
        if self._spec is None:
            import yaml

            self._spec = yaml.safe_load(self.storage.read_bytes(SPEC)) or {}
        return self._spec

    def checkpoint(self, which: str | int = 1) -> Checkpoint:
        """A committed checkpoint: a rank by the monitor (1 = best), "best", "latest" or an id.
        Not verified (weights() verifies)."""
        if isinstance(which, int) or which == "best":
            return self.best(which if isinstance(which, int) else 1, verify=False)
        cks = self.checkpoints()
        if not cks:
            raise NoCheckpoint(f"{self.uri}: no committed checkpoint")
        if which == "latest":
            return max(cks, key=lambda c: c.record.seq)
        for c in cks:
            if c.id == which:
                return c
        raise NoCheckpoint(
            f"{self.uri}: no committed checkpoint {which!r}; it has {', '.join(c.id for c in cks)}"
        )

    def weights(self, which: str | int = 1) -> tuple[Checkpoint, dict[str, Any], list[dict[str, str]]]:
        """(checkpoint, its verified state_dict, better-ranked ones skipped as damaged) for which
        (see checkpoint()). A ranked pick passes over damaged checkpoints; a named one
        (latest, an id) raises VerificationError. model.pt is streamed through its sha256 into
        a temp file and loaded with weights_only=True: one that holds more than tensors raises
        CheckpointRefused (a VerificationError), and nothing in it runs. A sharded checkpoint's
        files (every rank's shards) are copied the same way and consolidated into one."""
        import tempfile

        from workers.format import consolidate, load_tensor_file

        with tempfile.TemporaryDirectory(prefix="orchestrator-weights-") as tmp:
            if isinstance(which, int) or which == "best":
                found = self.verified_best(
                    which if isinstance(which, int) else 1, into=tmp, only=weight_files
                )
                ck, paths, skipped = found.checkpoint, found.paths, found.skipped
            else:
                ck, skipped = self.checkpoint(which), []
                paths = copy_verified(self.storage, ck.record, tmp, only=weight_files(ck.record))
            if ck.record.sharded:
                return ck, consolidate(tmp), skipped
            # Weights-only: a file that names code is refused (CheckpointRefused), never run.
            return ck, load_tensor_file(paths[0], "cpu", f"{ck.uri}/{MODEL_FILE}"), skipped

    def build_task(self) -> Any:
        """The run's task, built afresh from the stored spec on the CPU (imports the user's task
        and runs its builder, datasets included); for a train function, the Servable its
        module's `serving_model(options)` returns (TaskError naming the hook when it has none)."""
        import torch

        from orchestrator.core.tasks import TaskError, is_train_function, resolve_task, serving_hook
        from workers.task import Servable, TaskContext

        spec = self.stored_spec()
        task = spec.get("task") or {}
        name, options = task.get("name", "digits"), dict(task.get("options") or {})
        fn = resolve_task(name)
        if is_train_function(fn):
            built = serving_hook(name, fn)(options)
            if isinstance(built, Servable):  # with model_args and preprocessing for config.json
                return built
            if not (isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], torch.nn.Module)):
                raise TaskError(
                    f"task {name!r}: serving_model(options) returned a {type(built).__name__}; "
                    "it returns (model, example_input), the model an nn.Module (or a workers.task.Servable)"
                )
            return Servable(*built)
        ctx = TaskContext(rank=0, world_size=1, seed=int(spec.get("seed", 0)), device=torch.device("cpu"))
        return fn(options, ctx)

    def checkpoints(self) -> list[Checkpoint]:
        """Every committed checkpoint, oldest first, with why it is kept and its rank."""
        m = self.manifest
        ranks = {
            c.id: i + 1
            for i, c in enumerate(rank_best([c.view(self.monitor) for c in m.checkpoints], self.mode))
        }
        return [
            Checkpoint(
                id=c.id,
                uri=self.storage.child_uri(c.dir),
                epoch=c.epoch,
                global_step=c.global_step,
                end_of_epoch=c.end_of_epoch,
                metrics=c.metrics,
                metrics_fresh=c.metrics_fresh,
                kept_because=list(m.kept.get(c.id, [])),
                rank=ranks.get(c.id),
                record=c,
            )
            for c in sorted(m.checkpoints, key=lambda c: c.seq)
        ]

    def ranked(self) -> list[Checkpoint]:
        """Checkpoints with a finite, fresh monitor value, best first."""
        return sorted((c for c in self.checkpoints() if c.rank is not None), key=lambda c: c.rank or 0)

    def best(self, rank: int = 1, verify: bool = True) -> Checkpoint:
        """The rank-th best checkpoint (1: the best). With verify, its files are checked against
        its record first, and a damaged one is passed over for the next (see verified_best)."""
        if not verify:
            ranked = self.ranked()
            if len(ranked) < rank:
                raise NoCheckpoint(f"{self.uri}: {len(ranked)} ranked checkpoint(s), asked for rank {rank}")
            return ranked[rank - 1]
        return self.verified_best(rank).checkpoint

    def verified_best(
        self,
        rank: int = 1,
        into: str | None = None,
        only: set[str] | Callable[[CheckpointRecord], set[str]] | None = None,
    ) -> Verified:
        """The rank-th best checkpoint whose files verify (streamed and hashed, never whole in
        memory), copied into the directory `into` when given (`only` these files). A damaged
        one is skipped and listed; one that retention deleted while it was read (a live run)
        is chosen again from a fresh manifest."""
        skipped: list[dict[str, str]] = []
        for _ in range(5):
            candidates = [c for c in self.ranked() if not any(s["id"] == c.id for s in skipped)]
            if len(candidates) < rank:
                why = "that verify" if skipped else f"carrying {self.monitor!r}"
                raise NoCheckpoint(
                    f"{self.uri}: {len(candidates)} committed checkpoint(s) {why}; asked for rank {rank}"
                )
            for c in candidates[rank - 1 :]:
                try:
                    files = only(c.record) if callable(only) else only
                    paths = readable_by_all(copy_verified(self.storage, c.record, into, files))
                    return Verified(c, paths, skipped)
                except VerificationError as e:
                    fresh = read_manifest(self.storage)
                    if fresh is not None and fresh.get(c.id) is None:
                        self.manifest = fresh  # dropped by retention while read, not damaged
                        break
                    skipped.append({"id": c.id, "reason": str(e)})
            else:
                raise NoCheckpoint(f"{self.uri}: no committed checkpoint at rank {rank} or below verifies")
        raise NoCheckpoint(f"{self.uri}: the best checkpoint kept changing while it was read; try again")

    def metrics(self, as_frame: bool | None = None) -> Any:
        """Per-epoch metric rows; a pandas DataFrame when pandas is installed (or as_frame=True)."""
        rows = read_jsonl(self.storage, METRICS)
        if as_frame is False:
            return rows
        try:
            import pandas as pd
        except ImportError:
            if as_frame:
                raise
            return rows
        return pd.DataFrame(rows)

    def events(self, kinds: list[str] | str | None = None) -> list[dict[str, Any]]:
        """The event log, optionally only these kinds (docs: core.manifest.EVENT_KINDS)."""
        if isinstance(kinds, str):
            kinds = [kinds]
        rows = read_jsonl(self.storage, EVENTS)
        return [e for e in rows if not kinds or e.get("kind") in kinds]


def open_run(uri: str, storage_options: dict[str, Any] | None = None) -> Run:
    return Run(uri, storage_options)


def load_best(
    uri: str,
    model: Any = None,
    *,
    rank: int = 1,
    build: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """The best checkpoint's weights, verified against its record.

    - model=None, build=False: the state_dict (loaded with weights_only=True);
    - model given: its load_state_dict(weights), then model.eval(), returned;
    - build=True: the run's task is imported and built (user code runs: only when asked)
      and its model returned with the weights, in eval mode."""
    run = open_run(uri, storage_options)
    _, state, _ = run.weights(rank)
    if model is None and build:
        model = run.build_task().model
    if model is None:
        return state
    model.load_state_dict(state)
    return model.eval()


def build_model(uri: str, storage_options: dict[str, Any] | None = None) -> Any:
    """The run's task model, freshly built from the stored spec (imports the user's task)."""
    return open_run(uri, storage_options).build_task().model

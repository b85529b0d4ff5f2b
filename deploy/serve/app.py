"""Serve a run's best checkpoint over HTTP; switch to a better one when it is committed.

    serve run deploy/serve/config.yaml                       # from the repository root
    serve run deploy.serve.app:app run_uri=runs/digits poll_s=10
    serve run deploy.serve.app:app alias=prod root=runs        # follow `orchestrator promote ... --as prod`

POST /predict {"inputs": [[64 floats], ...]} (or 8x8 images)
  -> {"predictions": [label, ...], "outputs": [{"label": l, "probabilities": [p0, ...]}, ...],
      "checkpoint": id, "epoch": n, "generation": g}
GET  /healthz  -> which checkpoint is loaded, when, and the poller's state

Each replica loads the best checkpoint (verified against its record) into the model the
run's task builds. A thread reads manifest.json every `poll_s`; when the best checkpoint
changed it loads the new weights (verified) and swaps them in with one assignment: a
request takes the model once when it starts, so requests in flight finish on the old one.
Given an alias instead (alias=NAME root=ROOT), it serves the checkpoint the alias points at
and the poll reads ROOT/aliases/NAME.json: a promote, of any run under ROOT, is served
without a redeploy. Nothing here writes to the run. See docs/serving.md.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime.
import copy
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import RayServeException

from orchestrator.aliases import Alias, AliasError, Follower
from orchestrator.api import Run, RunNotFound, open_run
from orchestrator.core.manifest import ManifestError
from orchestrator.core.storage import StorageError
from orchestrator.core.tasks import TaskError, is_train_function, resolve_task, serving_hook

log = logging.getLogger("ray.serve")


class NotServable(RayServeException):
    """The app cannot be built from its arguments: the message says which and what to do.

    A RayServeException because Serve reports one as its message alone, from one try; any
    other error the builder raises Serve retries three times (`serve run CONFIG` prints each
    try's traceback) before the application goes DEPLOY_FAILED with a fourth."""


class AppArgs(BaseModel):
    """The builder's arguments (`key=value` after the import path, or `args:` in config.yaml)."""

    run_uri: str | None = None  # storage root + run name: runs/digits, s3://bucket/runs/digits
    alias: str | None = None  # instead of run_uri: serve what ROOT/aliases/NAME.json points at
    root: str | None = None  # the storage root the alias lives under (with alias)
    poll_s: float = Field(10.0, gt=0)  # how often manifest.json is read
    endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, moto, ...)
    storage_options: dict[str, Any] = Field(default_factory=dict)  # any fsspec/s3fs option
    input_shape: list[int] = [1, 8, 8]  # one model input (the digits CNN: 1x8x8)

    def options(self) -> dict[str, Any]:
        extra = {"endpoint_url": self.endpoint_url} if self.endpoint_url else {}
        return {**self.storage_options, **extra}


class PredictRequest(BaseModel):
    inputs: list[Any]  # each one input: a flat list or nested lists (8x8), as the model takes it


@dataclass(frozen=True)
class Loaded:
    """One model with its weights, never changed after it is built: swapped whole."""

    model: torch.nn.Module
    checkpoint: str
    epoch: int
    generation: int  # of the manifest it was chosen from
    run: str  # the run it came from (an alias may move to another run)
    metrics: dict[str, float]
    loaded_at: float
    load_s: float


api = FastAPI(title="ray-orchestrator: best checkpoint")


@serve.deployment
@serve.ingress(api)
class BestCheckpoint:
    def __init__(
        self,
        run_uri: str,
        poll_s: float,
        storage_options: dict[str, Any],
        input_shape: list[int],
        alias: str | None = None,
        root: str | None = None,
    ) -> None:
        self.follow = Follower(root or "", alias, storage_options) if alias else None
        found = self.follow.read() if self.follow else None
        self.target: Alias | None = found[0] if found else None
        self.alias_version: str | None = found[1] if found else None
        self.run = open_run(self.target.run_uri if self.target else run_uri, storage_options)
        self.input_shape = tuple(input_shape)
        self.template = self.run.build_task().model  # the task's code runs once per run, here
        self.skipped: list[dict[str, str]] = []  # better checkpoints that failed verification
        self.current = self._load(self.run, self.target)
        self.checked_generation = self.current.generation
        self.last_poll: float | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, args=(poll_s,), daemon=True, name="poller")
        self._poller.start()

    def _load(self, run: Run, alias: Alias | None = None, template: torch.nn.Module | None = None) -> Loaded:
        t0 = time.perf_counter()
        # Streamed and hashed against the record; a damaged best is passed over for the next.
        c, state, skipped = run.weights(alias.checkpoint if alias else 1)
        if alias and not alias.matches(c):
            raise AliasError(
                f"alias {alias.name!r}: {c.uri} is no longer the checkpoint it was promoted with"
            )
        self.skipped = skipped
        model = copy.deepcopy(template or self.template)
        model.load_state_dict(state)
        for s in self.skipped:
            log.warning("checkpoint %s failed verification, not served: %s", s["id"], s["reason"])
        return Loaded(
            model=model.eval(),
            checkpoint=c.id,
            epoch=c.epoch,
            generation=run.manifest.generation,
            run=run.uri,
            metrics=c.metrics,
            loaded_at=time.time(),
            load_s=time.perf_counter() - t0,
        )

    def _poll(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self._check()
                self.last_error = None
            except Exception as e:  # storage down, every checkpoint bad: keep serving what we have
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("checking %s for a better checkpoint: %s", self.run.uri, self.last_error)
            self.last_poll = time.time()

    def _check(self) -> None:
        if self.follow:
            return self._follow()
        generation = self.run.refresh().manifest.generation  # reads manifest.json only
        if generation == self.checked_generation:
            return
        ranked = self.run.ranked()
        if ranked and ranked[0].id != self.current.checkpoint:
            new = self._load(self.run)
            if new.checkpoint != self.current.checkpoint:
                old, self.current = self.current, new  # the swap: one assignment
                log.info(
                    "serving %s (epoch %d, generation %d) instead of %s; loaded in %.3fs",
                    new.checkpoint,
                    new.epoch,
                    new.generation,
                    old.checkpoint,
                    new.load_s,
                )
        self.checked_generation = generation  # only once handled: a failed load is retried

    def _follow(self) -> None:
        """The alias's version changed: load what it points at now (another run's, maybe)."""
        assert self.follow is not None
        alias, version = self.follow.read()  # reads the alias file only
        if version == self.alias_version:
            return
        if (alias.run_uri, alias.checkpoint) != (self.current.run, self.current.checkpoint):
            same = alias.run_uri == self.run.uri
            run = self.run.refresh() if same else open_run(alias.run_uri, self.run.storage.options)
            template = self.template if same else run.build_task().model
            new = self._load(run, alias, template)
            self.run, self.template, self.target = run, template, alias
            old, self.current = self.current, new  # the swap: one assignment
            log.info(
                "alias %s: serving %s %s instead of %s", alias.name, new.run, new.checkpoint, old.checkpoint
            )
        self.alias_version = version  # only once handled: a failed load is retried

    def check_health(self) -> None:  # Serve restarts a replica whose poller died
        if not self._poller.is_alive():
            raise RuntimeError("the checkpoint poller thread stopped")

    def __del__(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()

    @api.post("/predict")
    def predict(self, req: PredictRequest) -> dict[str, Any]:
        cur = self.current  # this request's model, whatever swap lands meanwhile
        size = math.prod(self.input_shape)
        try:
            x = torch.tensor(req.inputs, dtype=torch.float32)
        except (ValueError, TypeError) as e:
            raise HTTPException(422, f"inputs: not a list of equally shaped numeric inputs: {e}") from None
        if x.ndim < 2 or x[0].numel() != size:
            raise HTTPException(
                422, f"inputs: each input must hold {size} numbers (shape {list(self.input_shape)})"
            )
        with torch.inference_mode():
            logits = cur.model(x.reshape(-1, *self.input_shape))
        predictions = logits.argmax(dim=1).tolist()
        # Softmax of the logits, in float64 so that each input's probabilities sum to 1 closely.
        probabilities = logits.double().softmax(dim=1).tolist()
        return {
            "predictions": predictions,  # kept as it was: clients that read the labels alone
            "outputs": [
                {"label": label, "probabilities": p}
                for label, p in zip(predictions, probabilities, strict=True)
            ],
            "checkpoint": cur.checkpoint,
            "epoch": cur.epoch,
            "generation": cur.generation,
        }

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        cur = self.current
        return {
            "run": cur.run,
            "alias": self.follow.name if self.follow else None,
            "checkpoint": cur.checkpoint,
            "epoch": cur.epoch,
            "generation": cur.generation,
            "monitor": self.run.monitor,
            "metrics": cur.metrics,
            "loaded_at": cur.loaded_at,
            "load_s": round(cur.load_s, 4),
            "skipped": self.skipped,
            "checked_generation": self.checked_generation,
            "last_poll": self.last_poll,
            "last_error": self.last_error,
        }


def app_builder(args: dict[str, Any]) -> Application:
    """The Serve application for `args` (see AppArgs). Fails here, before any replica starts,
    when the arguments are bad, the run is missing or has no checkpoint to serve yet: with
    NotServable, one line naming run_uri and what to do."""
    try:
        a = AppArgs.model_validate(args)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in e.errors())
        raise NotServable(f"the Serve app's arguments (args: in the config, key=value): {problems}") from None
    if (a.run_uri is None) == (a.alias is None) or (a.alias is None) != (a.root is None):
        raise NotServable(
            "the Serve app's arguments (args: in the config, key=value): give run_uri=RUN_URI, "
            "or alias=NAME with root=ROOT (the storage root it was promoted under), not both"
        )
    if a.alias is not None and a.root is not None:
        root = absolute(a.root)
        try:
            target = Follower(root, a.alias, a.options()).read()[0]
        except AliasError as e:
            raise NotServable(f"alias={a.alias} root={a.root}: {e}") from None
        except (StorageError, OSError) as e:
            raise NotServable(f"alias={a.alias} root={a.root}: the alias cannot be read: {e}") from None
        servable_run(f"{target.run_uri} (alias {a.alias})", target.run_uri, a.options())
        return BestCheckpoint.bind("", a.poll_s, a.options(), a.input_shape, a.alias, root)  # type: ignore[attr-defined]
    assert a.run_uri is not None
    uri = absolute(a.run_uri)
    servable_run(a.run_uri, uri, a.options())  # else NotServable, before any replica starts
    return BestCheckpoint.bind(uri, a.poll_s, a.options(), a.input_shape)  # type: ignore[attr-defined]


def absolute(uri: str) -> str:
    """Replicas do not share the caller's working directory: a local path is made absolute."""
    return uri if "://" in uri else os.path.abspath(uri)


def servable_run(given: str, uri: str, options: dict[str, Any]) -> Run:
    """The run at uri, holding a checkpoint to serve; else NotServable, one line that names
    run_uri as given (and where it resolved to) and what to do."""
    where = f"run_uri {given}" + (f" ({uri})" if uri != given else "")
    try:
        run = open_run(uri, options)
    except RunNotFound:
        raise NotServable(
            f"{where}: no run there (no manifest.json). Train one first (`make demo` writes "
            "runs/digits), or set run_uri to a run's storage root + name (args.run_uri in "
            "deploy/serve/config.yaml; run_uri=... after the import path); Ctrl-C stops `serve run`"
        ) from None
    except (ManifestError, StorageError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise NotServable(f"{where}: the run cannot be read: {type(e).__name__}: {first}") from None
    if not run.ranked():
        raise NotServable(
            f"{where}: no committed checkpoint with a {run.monitor!r} value to serve yet "
            f"(status {run.status}); start the app after the run's first commit"
        )
    task = (run.stored_spec().get("task") or {}).get("name", "digits")
    try:  # a train function serves only through its serving_model hook: say so before any replica
        fn = resolve_task(task)
        if is_train_function(fn):
            serving_hook(task, fn)
    except TaskError as e:
        raise NotServable(f"{where}: {e}") from None
    return run


app = app_builder

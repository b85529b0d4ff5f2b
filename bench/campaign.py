"""A seeded fault campaign: short digits runs under random schedules of real faults, each
checked against a fault-free run of the same spec.

    python -m bench.campaign --runs 30 --seed 12 --json bench/results/campaign.json
    make campaign                                   # the campaign docs/reliability.md reports

One Ray cluster (a head and two worker nodes on this machine: tests/cluster_support.py) and
one moto S3 server behind a fault-injecting proxy (tests/s3_support.py) serve every run;
each run is `orchestrator run SPEC --address CLUSTER`, storage on the S3 server through the
proxy. A run's faults are drawn (seeded) from:

    worker_kill          SIGKILL of one or two ranks at a random step (chaos.kills)
    after_upload         SIGKILL of rank 0 after a checkpoint's upload, before its commit
    raylet_kill          SIGKILL of the raylet of a node that hosts a rank (a new node joins)
    driver_kill          SIGKILL of the driver, then `orchestrator resume`
    coordinator_restart  SIGKILL of the coordinator actor's process (Ray restarts it)
    s3_outage            the proxy answers 503 SlowDown, resets connections, or both, for seconds

The first two are in the run's spec (the workers fire them); the others the campaign fires
once the run has committed a chosen epoch. Every block of three runs covers all six kinds.
A run that fails on its own must fail with the documented error (naming `orchestrator
resume RUN_URI`), and is then resumed. Each run is then checked against a fault-free run of
the same spec (one per spec, made first):

    finished           the run ends `finished`, after at most a few resumes
    lost commits       every checkpoint a commit event names is still kept, or was deleted
                       by retention at a time the retention rules no longer kept it; every
                       position the fault-free run committed was committed, once
    kept set           exactly best-k ∪ latest ∪ milestones, computed here from the metrics
    verifies           every kept checkpoint's files match its record
    orphans            no object under checkpoints/ that no kept record names, no temp file,
                       no lease left behind
    bitwise            every kept checkpoint (weights, optimizer, scheduler, RNG streams,
                       data position) equals the fault-free run's at the same position
    metrics            each epoch once, equal to the fault-free run's; `best` is the true best
    fired              every scheduled fault happened (a chaos_kill, a restart, a new
                       coordinator, refused requests, a resumed driver)

The exit status is 1 when any check failed, 0 otherwise. Docs: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's cluster and S3 helpers

from orchestrator.core.manifest import (  # noqa: E402
    CHECKPOINTS,
    EVENTS,
    METRICS,
    RECORD,
    CheckpointRecord,
    Manifest,
    read_jsonl,
    read_manifest,
)
from orchestrator.core.storage import Storage  # noqa: E402
from orchestrator.core.verify import VerificationError, read_verified  # noqa: E402

KINDS = ("worker_kill", "after_upload", "raylet_kill", "driver_kill", "coordinator_restart", "s3_outage")
CHAOS_KINDS = ("worker_kill", "after_upload")  # written into the spec; the workers fire them
MONITOR, MODE = "val_loss", "min"
# Spec variants: what retention keeps and when checkpoints are taken. Each has its own
# fault-free reference run.
VARIANTS: dict[str, dict[str, Any]] = {
    "epochs": {"top_k": 2, "keep_latest": 1, "keep_every_n_epochs": 2, "every_n_steps": None},
    "midepoch": {"top_k": 1, "keep_latest": 2, "keep_every_n_epochs": 3, "every_n_steps": 10},
}
BUCKET = "campaign"
MAX_LIVES = 4  # drivers per run: the first, and resumes after a driver kill or a clear failure
LIFE_TIMEOUT_S = 600.0
POLL_S = 0.3  # how often a run's events are read for fault triggers (an epoch takes seconds)
RUN_ACTORS = ("Coordinator", "TrainController", "RayTrainWorker")  # a run's processes, by Ray's titles


# -- the plan -----------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    epoch: int  # chaos: the epoch it fires in; the others: fire once this epoch is committed
    kills: list[dict[str, Any]] = field(default_factory=list)  # chaos: the spec's kill entries
    mode: str = ""  # s3_outage: 503 | reset | flaky
    seconds: float = 0.0  # s3_outage: how long
    fired: bool = False
    at: float = 0.0  # when the campaign fired it (time.time())
    note: str = ""  # what happened, or why it could not fire
    problem: str = ""  # something that went wrong around it

    def describe(self) -> str:
        if self.kind == "worker_kill":
            where = ", ".join(f"rank {k['rank']} e{k['epoch']}s{k['step']}" for k in self.kills)
            return f"worker_kill({where})"
        if self.kind == "after_upload":
            return f"after_upload(e{self.epoch})"
        extra = f", {self.mode} {self.seconds:.1f}s" if self.kind == "s3_outage" else ""
        return f"{self.kind}(after e{self.epoch}{extra})"


@dataclass
class Plan:
    index: int  # 1-based
    variant: str
    faults: list[Fault]

    @property
    def name(self) -> str:
        return f"run-{self.index:03d}"

    def chaos(self) -> list[dict[str, Any]]:
        return [k for f in self.faults for k in f.kills]


def make_plans(seed: int, runs: int, epochs: int, steps: int, variants: list[str]) -> list[Plan]:
    """Each run gets two fault kinds, drawn so that every block of three runs covers all six,
    and now and then a third; epochs, steps, ranks, modes and durations are drawn too."""
    if epochs < 4:
        raise ValueError("a campaign needs at least 4 epochs (external faults fire before the last three)")
    rng = random.Random(seed)
    plans: list[Plan] = []
    deck: list[str] = []
    for i in range(1, runs + 1):
        kinds = []
        for _ in range(2):
            if not deck:
                deck = list(KINDS)
                rng.shuffle(deck)
            kinds.append(deck.pop())
        if rng.random() < 0.3:
            kinds.append(rng.choice(KINDS))
        external = [k for k in kinds if k not in CHAOS_KINDS]
        # Fired once epoch k is committed, k early enough that training still runs while the
        # campaign sees the commit and fires (a raylet kill needs a rank alive on a worker node).
        slots = rng.sample(range(1, epochs - 2), min(len(external), epochs - 3))
        faults: list[Fault] = []
        for kind in kinds:
            if kind == "worker_kill":
                if rng.random() < 0.5:
                    e, s = rng.randint(1, epochs), rng.randrange(steps)
                    kills = [
                        {"rank": r, "epoch": e, "step": s} for r in rng.sample([0, 1], rng.choice([1, 2]))
                    ]
                else:  # two workers at two moments
                    kills = [
                        {
                            "rank": rng.randrange(2),
                            "epoch": rng.randint(1, epochs),
                            "step": rng.randrange(steps),
                        }
                        for _ in range(2)
                    ]
                faults.append(Fault(kind, min(k["epoch"] for k in kills), kills=kills))
            elif kind == "after_upload":
                e = rng.randint(1, epochs)
                faults.append(Fault(kind, e, kills=[{"rank": 0, "epoch": e, "point": "after_upload"}]))
            elif slots:
                f = Fault(kind, slots.pop())
                if kind == "s3_outage":
                    f.mode, f.seconds = rng.choice(["503", "reset", "flaky"]), round(rng.uniform(2.0, 5.0), 1)
                faults.append(f)
        plans.append(Plan(i, variants[(i - 1) % len(variants)], faults))
    return plans


# -- the checks -----------------------------------------------------------------------------------


@dataclass
class Reference:
    """What a fault-free run of a spec left: the truth the faulted runs are held to."""

    metrics: list[dict[str, Any]]  # without the attempt column
    positions: set[tuple[int, int]]  # (epoch, global_step) of every commit
    kept: dict[tuple[int, int], dict[str, bytes]]  # kept position -> verified files
    best_epoch: int


@dataclass
class Checked:
    finished: bool = False
    lost: list[str] = field(default_factory=list)  # committed checkpoints gone without cause
    orphans: list[str] = field(default_factory=list)  # objects no kept record names
    mismatches: list[str] = field(default_factory=list)  # differences from the fault-free run
    problems: list[str] = field(default_factory=list)  # every other failed check
    notes: list[str] = field(default_factory=list)  # findings that break no promise

    def all(self) -> list[str]:
        return [
            *(f"lost: {x}" for x in self.lost),
            *(f"orphan: {x}" for x in self.orphans),
            *(f"bitwise: {x}" for x in self.mismatches),
            *self.problems,
        ]


def position(rec: CheckpointRecord | dict[str, Any]) -> tuple[int, int]:
    r = rec if isinstance(rec, dict) else rec.model_dump()
    return int(r["epoch"]), int(r["global_step"])


def _id_position(cid: str) -> dict[str, int]:
    """epoch and global_step from a checkpoint id (epoch0004-step0000092-a1)."""
    epoch, step, _ = cid.split("-")
    return {"epoch": int(epoch[len("epoch") :]), "global_step": int(step[len("step") :])}


def expected_keep(
    commits: list[dict[str, Any]], cfg: dict[str, Any], steps: int, fresh: dict[int, float]
) -> set[str]:
    """The ids best-k ∪ latest ∪ milestones keep among commits, by the rules
    as documented, written out here apart from orchestrator.core.retention: best-k ranks the
    end-of-epoch checkpoints by the epoch's reported metric (ties: the newer), latest the
    newest commits, milestones the newest end-of-epoch save of every n-th epoch."""
    commits = sorted(commits, key=lambda c: c["global_step"])  # newer is further in training
    end = [c for c in commits if c["global_step"] == c["epoch"] * steps]
    sign = 1.0 if MODE == "min" else -1.0
    rankable = [c for c in end if math.isfinite(fresh.get(c["epoch"], math.nan))]
    best = sorted(rankable, key=lambda c: (sign * fresh[c["epoch"]], -c["global_step"]))[: cfg["top_k"]]
    keep = {c["id"] for c in best} | {c["id"] for c in commits[-cfg["keep_latest"] :]}
    n = cfg.get("keep_every_n_epochs")
    if n:
        milestones: dict[int, dict[str, Any]] = {}
        for c in end:
            if c["epoch"] % n == 0:
                milestones[c["epoch"]] = c  # the newest wins
        keep |= {c["id"] for c in milestones.values()}
    return keep


def run_objects(storage: Storage) -> list[str]:
    """Every object under the run, as paths relative to it (fsspec's find: local, memory, s3)."""
    if not storage.is_local:
        storage.fs.invalidate_cache()
    base = storage.path().rstrip("/")
    return sorted(p[len(base) + 1 :] for p in storage.fs.find(base))


def compare_tree(a: Any, b: Any, where: str) -> list[str]:
    """Where two loaded checkpoint trees differ (tensors bit for bit, dtype included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys"]
        return [d for k in a for d in compare_tree(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in compare_tree(x, y, f"{where}[{i}]")
        ]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [where]


def load_files(files: dict[str, bytes]) -> dict[str, Any]:
    return {name: torch.load(io.BytesIO(data), weights_only=True) for name, data in files.items()}


def check_run(
    storage: Storage, cfg: dict[str, Any], epochs: int, steps: int, ref: Reference | None
) -> tuple[Checked, Reference]:
    """Every check of one finished (or not) run; with ref None, the run is its own reference
    (a fault-free run: its own metrics are the truth, bitwise checks are skipped)."""
    out = Checked()
    manifest: Manifest | None = read_manifest(storage)
    if manifest is None:
        out.problems.append("no manifest")
        return out, Reference([], set(), {}, 0)
    events = read_jsonl(storage, EVENTS)
    metrics = [{k: v for k, v in r.items() if k != "attempt"} for r in read_jsonl(storage, METRICS)]
    out.finished = manifest.status == "finished"
    if not out.finished:
        out.problems.append(f"manifest status {manifest.status}")

    # Metrics: each epoch once, the fault-free run's values.
    got_epochs = [r["epoch"] for r in metrics]
    if got_epochs != list(range(1, epochs + 1)):
        out.problems.append(f"metrics epochs {got_epochs}, want 1..{epochs} once each")
    if ref is not None and metrics != ref.metrics:
        diff = [r["epoch"] for r, w in zip(metrics, ref.metrics, strict=False) if r != w]
        out.mismatches.append(f"metrics rows differ from the fault-free run (epochs {diff or 'count'})")
    fresh = {r["epoch"]: float(r[MONITOR]) for r in metrics}

    # Commits and deletions, replayed from the events log in order. Its only writer is the
    # coordinator, and one that dies (killed, or with its driver) between a storage write and
    # its event leaves that event out:
    # - a commit without its event is known from the final manifest, a retention delete (only
    #   committed checkpoints are) or an attempt that restored it; it enters the replay right
    #   after the last logged commit before it in training (the earliest it can have been made);
    # - a delete without its event: a committed checkpoint is gone. Only a coordinator that then
    #   died can have deleted it, so by the next coordinator_started the rules must have
    #   dropped it; else (or with no later coordinator) it is a lost commit.
    kept_ids = {c.id for c in manifest.checkpoints}
    logged_commits = {e["id"]: i for i, e in enumerate(events) if e["kind"] == "commit"}
    logged_deletes = {e["id"] for e in events if e["kind"] == "delete"}
    committed = set(logged_commits) | kept_ids
    committed |= {e["id"] for e in events if e["kind"] == "delete" and e["why"] == "retention"}
    committed |= {e["restore"] for e in events if e["kind"] == "attempt_started" and e.get("restore")}
    enters: dict[int, list[dict[str, Any]]] = {}
    for cid in committed:
        row = {"id": cid, **_id_position(cid)}
        at = logged_commits.get(cid)
        if at is None:
            earlier = [
                i
                for i, e in enumerate(events)
                if e["kind"] == "commit" and e["global_step"] < row["global_step"]
            ]
            at = max(earlier, default=-1)
        enters.setdefault(at, []).append(row)
    commits: list[dict[str, Any]] = list(enters.get(-1, []))
    live: list[dict[str, Any]] = list(commits)
    deleted: dict[str, str] = {}
    for i, e in enumerate(events):
        if e["kind"] == "delete" and e["id"] in committed:
            # Retention deletes only after the manifest that drops a checkpoint is durable; a
            # coordinator killed in between leaves the files to the next orphan collection.
            # Either way the rules must no longer keep it at that moment.
            deleted[e["id"]] = e["why"]
            if e["why"] != "retention" and not e["why"].startswith("orphan"):
                out.lost.append(f"{e['id']} deleted as {e['why']!r} after its commit")
            elif e["id"] in expected_keep(live, cfg, steps, fresh):
                out.lost.append(f"{e['id']} deleted ({e['why']}) while the retention rules still kept it")
            elif e["why"] != "retention":
                out.notes.append(
                    f"{e['id']}: committed, dropped by retention, its delete logged as {e['why']!r}"
                )
            live = [c for c in live if c["id"] != e["id"]]
        if e["kind"] == "coordinator_started":
            keep = expected_keep(live, cfg, steps, fresh)
            for c in [c for c in live if c["id"] not in kept_ids | logged_deletes | keep]:
                deleted[c["id"]] = "unlogged"
                out.notes.append(
                    f"{c['id']}: committed, dropped by retention, deleted by a coordinator "
                    "that died before it logged the delete"
                )
                live.remove(c)
        commits += enters.get(i, [])
        live += enters.get(i, [])
    for c in commits:
        if c["id"] not in kept_ids and c["id"] not in deleted:
            out.lost.append(f"{c['id']} committed, gone, and no delete of it can be accounted for")
    committed_at = Counter(position(c) for c in commits)
    twice = sorted(p for p, n in committed_at.items() if n > 1)
    if twice:
        out.problems.append(f"positions committed more than once: {twice}")
    if ref is not None and set(committed_at) != ref.positions:
        missing = sorted(ref.positions - set(committed_at))
        extra = sorted(set(committed_at) - ref.positions)
        out.lost.extend(f"position e{e}/step{s} of the fault-free run never committed" for e, s in missing)
        if extra:
            out.problems.append(f"committed positions the fault-free run has not: {extra}")

    # The kept set: best-k ∪ latest ∪ milestones, by the rules, from the metrics.
    want = expected_keep(live, cfg, steps, fresh)
    if kept_ids != want:
        out.problems.append(f"kept {sorted(kept_ids)}, the rules keep {sorted(want)}")
    if set(manifest.kept) != kept_ids:
        out.problems.append(f"manifest.kept {sorted(manifest.kept)} is not its checkpoint list")

    # Every kept checkpoint verifies and equals the fault-free run's at its position.
    kept: dict[tuple[int, int], dict[str, bytes]] = {}
    for rec in manifest.checkpoints:
        try:
            kept[position(rec)] = read_verified(storage, rec)
        except (VerificationError, OSError) as e:
            out.lost.append(f"{rec.id} does not verify: {e}")
    if ref is not None:
        if set(kept) != set(ref.kept):
            out.problems.append(f"kept positions {sorted(kept)} != fault-free {sorted(ref.kept)}")
        for pos in sorted(set(kept) & set(ref.kept)):
            if kept[pos] != ref.kept[pos]:
                diff = compare_tree(load_files(kept[pos]), load_files(ref.kept[pos]), "")
                if diff:
                    out.mismatches.append(f"e{pos[0]}/step{pos[1]} differs at {', '.join(diff[:5])}")

    # Orphans: objects no kept record names, temp files, a lease nobody holds.
    allowed = {f"{CHECKPOINTS}/{c.id}/{f.path}" for c in manifest.checkpoints for f in c.files}
    allowed |= {f"{CHECKPOINTS}/{c.id}/{RECORD}" for c in manifest.checkpoints}
    for rel in run_objects(storage):
        top = rel.split("/", 1)[0]
        if rel.startswith(CHECKPOINTS + "/") and rel not in allowed:
            out.orphans.append(rel)
        elif ".tmp-" in top or top == "lease.json":
            out.orphans.append(rel)

    # The true best: the best epoch by the metrics, and what the manifest ranks first.
    ranked = sorted(
        (r for r in metrics if math.isfinite(r[MONITOR])),
        key=lambda r: (r[MONITOR] if MODE == "min" else -r[MONITOR], -r["epoch"]),
    )
    best_epoch = ranked[0]["epoch"] if ranked else 0
    if ref is not None and best_epoch != ref.best_epoch:
        out.mismatches.append(f"best epoch {best_epoch} != fault-free {ref.best_epoch}")
    fresh_kept = [c for c in manifest.checkpoints if c.metrics_fresh and c.global_step == c.epoch * steps]
    first = sorted(fresh_kept, key=lambda c: (c.metrics[MONITOR], -c.seq))[:1]
    if not first or first[0].epoch != best_epoch:
        out.problems.append(f"the best kept checkpoint is not the best epoch {best_epoch}")
    return out, Reference(metrics, set(committed_at), kept, best_epoch)


# -- the harness ---------------------------------------------------------------------------------


@dataclass
class RunResult:
    plan: Plan
    wall_s: float = 0.0
    lives: int = 0
    resumes: list[str] = field(default_factory=list)  # why each resume was needed
    restarts: int = 0
    checked: Checked = field(default_factory=Checked)
    logs: str = ""
    summary: dict[str, Any] = field(default_factory=dict)  # the last driver's --json summary

    def row(self) -> dict[str, Any]:
        c = self.checked
        return {
            "run": self.plan.index,
            "name": self.plan.name,
            "spec": self.plan.variant,
            "faults": [asdict(f) for f in self.plan.faults],
            "wall_s": round(self.wall_s, 1),
            "drivers": self.lives,
            "resumes": self.resumes,
            "restarts": self.restarts,
            "finished": c.finished,
            "lost_commits": len(c.lost),
            "orphans": len(c.orphans),
            "bitwise_mismatches": len(c.mismatches),
            "problems": c.all(),
            "notes": c.notes,
            "ok": not c.all(),
            "logs": self.logs,
        }


class Campaign:
    """The cluster, the S3 server and its proxy, shared by every run; the fault-free
    references, made once per spec variant."""

    def __init__(self, workdir: Path, epochs: int, log: Callable[[str], None]) -> None:
        self.workdir, self.epochs, self.log = workdir, epochs, log
        self.refs: dict[str, Reference] = {}
        self.steps = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Campaign:
        from cluster_support import local_cluster
        from s3_support import CREDS, FaultProxy, MotoServer

        self.moto = MotoServer.start(self.workdir / "moto.log")
        self._stack.callback(self.moto.stop)
        self.moto.client().create_bucket(Bucket=BUCKET)
        self.proxy = FaultProxy(self.moto.port)
        self.proxy.server.handle_error = lambda *a: None  # type: ignore[method-assign]  # resets by killed clients
        self._stack.callback(self.proxy.close)
        self.cluster = self._stack.enter_context(local_cluster(workers=2, head_num_cpus=1, **CREDS))
        self.direct = {
            "endpoint_url": self.moto.endpoint,
            "key": CREDS["AWS_ACCESS_KEY_ID"],
            "secret": CREDS["AWS_SECRET_ACCESS_KEY"],
        }
        self.log(
            f"[campaign] cluster {self.cluster.address} ({len(self.cluster.nodes)} nodes), "
            f"S3 {self.moto.endpoint} behind proxy {self.proxy.endpoint}"
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.proxy.mode = "ok"
        self._stack.close()

    def storage(self, name: str) -> Storage:
        return Storage(f"s3://{BUCKET}/runs/{name}", self.direct)

    def spec(self, name: str, variant: str, kills: list[dict[str, Any]]) -> Path:
        data = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
        data.update(name=name, epochs=self.epochs, chaos={"kills": kills})
        data["storage"] = {"root": f"s3://{BUCKET}/runs", "options": {"endpoint_url": self.proxy.endpoint}}
        data["checkpoint"].update(VARIANTS[variant])
        data["failure"] = {"max_failures": 8}
        data["tracking"] = {"tensorboard": False}
        path = self.workdir / "specs" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    # -- one run ------------------------------------------------------------------------------
    def reference(self, variant: str) -> Reference:
        if variant not in self.refs:
            t0 = time.time()
            name = f"ref-{variant}"
            res = RunResult(Plan(0, variant, []))
            self._drive(res, name, self.spec(name, variant, []))
            st = self.storage(name)
            m = read_manifest(st)
            latest = m.latest() if m else None
            if latest is None or res.lives != 1 or res.checked.problems:
                raise RuntimeError(f"the fault-free run {name} did not finish: see {res.logs}")
            self.steps = latest.global_step // self.epochs
            self._keep_log(st, Path(res.logs))
            checked, ref = check_run(st, VARIANTS[variant], self.epochs, self.steps, None)
            if checked.all():  # the rules fail without any fault: every run would inherit it
                raise RuntimeError(f"the fault-free run {name} fails its checks: {checked.all()}")
            self.refs[variant] = ref
            self.log(
                f"[campaign] fault-free {variant}: {time.time() - t0:.0f}s, best epoch {ref.best_epoch}, "
                f"{len(ref.positions)} commits, kept {sorted(ref.kept)}"
            )
        return self.refs[variant]

    def leftovers(self, timeout: float = 60.0) -> list[str]:
        """Processes of a run (its coordinator, Ray Train's controller and workers) still on
        the cluster after its last driver ended; waits for them to go, up to timeout."""
        end = time.time() + timeout
        while True:
            left = []
            for p in self.cluster.processes():
                with contextlib.suppress(psutil.Error):
                    title = " ".join(p.cmdline())
                    if any(f"ray::{a}" in title for a in RUN_ACTORS):
                        left.append(f"pid {p.pid} {title[:60]}")
            if not left or time.time() > end:
                return left
            time.sleep(1.0)

    def run(self, plan: Plan) -> RunResult:
        ref = self.reference(plan.variant)
        res = RunResult(plan)
        t0 = time.time()
        self._drive(res, plan.name, self.spec(plan.name, plan.variant, plan.chaos()), plan.faults)
        res.wall_s = time.time() - t0
        st = self.storage(plan.name)
        res.checked, _ = check_run(st, VARIANTS[plan.variant], self.epochs, self.steps, ref)
        shown = (res.summary.get("best") or {}).get("epoch")
        if res.summary and shown != ref.best_epoch:  # what the user is told is the best
            res.checked.mismatches.append(
                f"the driver's summary names epoch {shown} best, not {ref.best_epoch}"
            )
        m = read_manifest(st)
        res.restarts = m.restarts if m else 0
        self._check_fired(res, st)
        if left := self.leftovers():
            res.checked.problems.append(f"still running after the run ended: {left}")
        self._keep_log(st, Path(res.logs))
        return res

    def _keep_log(self, st: Storage, logdir: Path) -> None:
        """The run's manifest, events and metrics next to its driver logs."""
        for rel in ("manifest.json", EVENTS, METRICS):
            with contextlib.suppress(FileNotFoundError):
                (logdir / rel).write_bytes(st.read_bytes(rel))

    def _drive(self, res: RunResult, name: str, spec: Path, faults: list[Fault] = ()) -> None:  # type: ignore[assignment]
        """Run the spec to the end: fire the external faults as it goes, resume after a
        driver kill or a failure that names `orchestrator resume`."""
        st = self.storage(name)
        uri = st.uri
        logdir = self.workdir / name
        logdir.mkdir(exist_ok=True)
        res.logs = str(logdir)
        args = ["run", str(spec)]
        pending = sorted((f for f in faults if f.kind not in CHAOS_KINDS), key=lambda f: f.epoch)
        while res.lives < MAX_LIVES:
            res.lives += 1
            out, err = logdir / f"driver-{res.lives}.out", logdir / f"driver-{res.lives}.err"
            with open(out, "wb") as o, open(err, "wb") as e:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "orchestrator",
                        *args,
                        "--address",
                        self.cluster.address,
                        "--json",
                        "--quiet",
                    ],
                    cwd=ROOT,
                    env=self.cluster.env,
                    stdout=o,
                    stderr=e,
                    start_new_session=True,
                )
            try:
                killed = self._watch(proc, st, pending)
            finally:  # interrupted (Ctrl-C, a harness error): the driver goes too
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            if proc.returncode == 0:
                self._read_summary(res, out)
                return
            # Reading the run's stored spec needs the endpoint first, as docs/storage.md says.
            args = ["resume", uri, "--storage-option", f"endpoint_url={self.proxy.endpoint}"]
            if killed:
                res.resumes.append("driver killed")
                continue
            text = err.read_text(errors="replace")
            if proc.returncode in (1, 4) and f"orchestrator resume {uri}" in text and "Traceback" not in text:
                why = text.strip().splitlines()[-1][:300]
                res.resumes.append(f"failed clearly (exit {proc.returncode}): {why}")
                continue
            res.checked.problems.append(
                f"driver {res.lives} exited {proc.returncode} without the documented "
                f"error: {text.strip()[-600:]}"
            )
            return
        res.checked.problems.append(f"not finished after {MAX_LIVES} drivers")

    @staticmethod
    def _read_summary(res: RunResult, out: Path) -> None:
        """The driver's --json summary: its stdout should hold that one JSON document."""
        text = out.read_text(errors="replace").strip()
        try:
            res.summary, end = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError as e:
            res.checked.problems.append(
                f"driver {res.lives}: stdout is not its --json summary ({e}): {text[:300]}"
            )
            return
        if extra := text[end:].strip():
            first = extra.splitlines()[0][:300]
            res.checked.notes.append(
                f"driver {res.lives}: stdout holds more than its --json summary: {first}"
            )

    def _watch(self, proc: subprocess.Popen[bytes], st: Storage, pending: list[Fault]) -> bool:
        """Wait for the driver to exit, firing pending faults as their epochs are committed.
        True when this driver was killed by the campaign."""
        end = time.time() + LIFE_TIMEOUT_S
        started = time.time()
        killed = False
        while proc.poll() is None:
            if time.time() > end:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"a driver of {st.uri} ran past {LIFE_TIMEOUT_S:.0f}s")
            if pending and self._committed(st, pending[0].epoch):
                f = pending[0]
                if self._fire(f, proc, st, started):
                    pending.pop(0)
                    killed = killed or f.kind == "driver_kill"
            time.sleep(POLL_S)
        return killed

    def _committed(self, st: Storage, epoch: int) -> bool:
        """A commit at or past the end of epoch is logged (at or past: the event of one commit
        may have died with its coordinator)."""
        with contextlib.suppress(Exception):  # a torn read of events.jsonl: try again
            events = read_jsonl(st, EVENTS)
            return any(e["kind"] == "commit" and e["global_step"] >= epoch * self.steps for e in events)
        return False

    def _fire(self, f: Fault, proc: subprocess.Popen[bytes], st: Storage, started: float) -> bool:
        """Fire f now if it can be (False: not yet, e.g. no rank on a worker node right now)."""
        f.at = time.time()
        if f.kind == "driver_kill":
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            f.fired, f.note = True, f"driver pid {proc.pid} SIGKILLed"
        elif f.kind == "s3_outage":
            before = self.proxy.faults
            self.proxy.mode = f.mode
            time.sleep(f.seconds)
            self.proxy.mode = "ok"
            refused = self.proxy.faults - before
            f.fired, f.note = refused > 0, f"{refused} requests refused"
        elif f.kind == "coordinator_restart":
            proc_ = self._coordinator(st, started)
            if proc_ is None:
                return False
            proc_.kill()
            f.fired, f.note = True, f"coordinator pid {proc_.pid} SIGKILLed"
        elif f.kind == "raylet_kill":
            victim = self._victim(st, started)
            if victim is None:
                return False
            f.fired, f.note = True, f"node {victim} killed"
            try:
                self.cluster.kill_node(victim)  # SIGKILL its raylet, then the rest of the node
            except AssertionError as e:  # some process of the node outlived it
                f.problem = str(e)
            self.cluster.add_node()  # the replacement
        return True

    def _coordinator(self, st: Storage, since: float) -> psutil.Process | None:
        """The live coordinator of this driver (from its coordinator_started event)."""
        starts = [
            e for e in read_jsonl(st, EVENTS) if e["kind"] == "coordinator_started" and e["ts"] >= since
        ]
        for e in reversed(starts):
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(e["pid"])
                if "Coordinator" in " ".join(p.cmdline()):
                    return p
        return None

    def _victim(self, st: Storage, since: float) -> str | None:
        """A worker node hosting a rank, not the driver's node (the coordinator's)."""
        coord = self._coordinator(st, since)
        if coord is None:
            return None
        for name in self.cluster.nodes:
            if name == "head":
                continue
            procs = self.cluster.processes(name)
            pids = {p.pid for p in procs}
            if coord.pid in pids:
                continue
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    if "RayTrainWorker" in " ".join(p.cmdline()):
                        return name
        return None

    def _check_fired(self, res: RunResult, st: Storage) -> None:
        """Each scheduled fault happened, as the run's own log shows."""
        events = read_jsonl(st, EVENTS)
        m = read_manifest(st)
        fired_keys = set(m.chaos_fired) if m else set()
        i = 0
        for f in res.plan.faults:
            if f.kind in CHAOS_KINDS:
                keys = {f"kill-{j}" for j in range(i, i + len(f.kills))}
                i += len(f.kills)
                f.fired = keys <= fired_keys
                f.note = f"{len(keys & fired_keys)}/{len(keys)} chaos_kill claimed"
            elif f.fired and f.kind == "raylet_kill":
                if not any(e["kind"] == "restart" and e["ts"] >= f.at for e in events):
                    res.checked.problems.append(f"{f.describe()}: no restart after it")
            elif f.fired and f.kind == "coordinator_restart":
                if not any(e["kind"] == "coordinator_started" and e["ts"] >= f.at for e in events):
                    res.checked.problems.append(f"{f.describe()}: the coordinator did not come back")
            elif f.fired and f.kind == "driver_kill":
                if not any(e["kind"] == "driver_started" and e["resume"] and e["ts"] >= f.at for e in events):
                    res.checked.problems.append(f"{f.describe()}: no resumed driver after it")
            if not f.fired:
                res.checked.problems.append(f"{f.describe()} did not fire{': ' + f.note if f.note else ''}")
            if f.problem:
                res.checked.problems.append(f"{f.describe()}: {f.problem}")


# -- the report ------------------------------------------------------------------------------------


def summarize(results: list[RunResult], wall_s: float) -> dict[str, Any]:
    rows = [r.row() for r in results]
    kinds = Counter(f.kind for r in results for f in r.plan.faults if f.fired)
    workers = sum(len(f.kills) for r in results for f in r.plan.faults if f.kind == "worker_kill" and f.fired)
    return {
        "runs": len(rows),
        "finished": sum(r["finished"] for r in rows),
        "faults": {k: kinds.get(k, 0) for k in KINDS},
        "workers_killed": workers,
        "restarts": sum(r["restarts"] for r in rows),
        "resumes_after_driver_kill": sum(x == "driver killed" for r in rows for x in r["resumes"]),
        "resumes_after_clear_failure": sum(
            x.startswith("failed clearly") for r in rows for x in r["resumes"]
        ),
        "lost_commits": sum(r["lost_commits"] for r in rows),
        "orphans": sum(r["orphans"] for r in rows),
        "bitwise_mismatches": sum(r["bitwise_mismatches"] for r in rows),
        "failed_runs": sum(not r["ok"] for r in rows),
        # Findings that break no promise (docs/reliability.md): a committed checkpoint that
        # retention dropped, deleted by orphan collection after its coordinator died, or
        # deleted by a coordinator that died before logging it.
        "retention_deletes_logged_as_orphans": sum(
            "logged as 'orphan" in n for r in rows for n in r["notes"]
        ),
        "deletes_without_an_event": sum("before it logged" in n for r in rows for n in r["notes"]),
        "stdout_beyond_the_json_summary": sum("more than its --json" in n for r in rows for n in r["notes"]),
        "wall_s": round(wall_s, 1),
    }


def table(results: list[RunResult], totals: dict[str, Any]) -> str:
    """One line per run, then the totals and the faults by kind as markdown tables."""
    cols = f"{'run':>4}  {'spec':<8}  {'faults':<60}  {'rst':>3}  {'res':>3}  {'lost':>4}  {'orph':>4}"
    head = f"{cols}  {'bits':>4}  {'wall_s':>6}  result"
    lines = [head, "-" * len(head)]
    for r in results:
        row = r.row()
        faults = ", ".join(f.describe() for f in r.plan.faults)
        verdict = "ok" if row["ok"] else "FAIL: " + "; ".join(row["problems"])[:200]
        lines.append(
            f"{row['run']:>4}  {row['spec']:<8}  {faults[:60]:<60}  {row['restarts']:>3}  "
            f"{len(row['resumes']):>3}  {row['lost_commits']:>4}  {row['orphans']:>4}  "
            f"{row['bitwise_mismatches']:>4}  {row['wall_s']:>6.1f}  {verdict}"
        )
    t = totals
    resumes = t["resumes_after_driver_kill"] + t["resumes_after_clear_failure"]
    lines += [
        "",
        "| runs | finished | restarts | resumes | lost commits | orphans | bitwise mismatches | failed runs "
        "| wall time |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {t['runs']} | {t['finished']} | {t['restarts']} | {resumes} | {t['lost_commits']} | "
        f"{t['orphans']} | {t['bitwise_mismatches']} | {t['failed_runs']} | {t['wall_s'] / 60:.1f} min |",
        "",
        "| fault | fired | runs with it | of those ok |",
        "|---|---|---|---|",
    ]
    for kind in KINDS:
        runs = [r for r in results if any(f.kind == kind and f.fired for f in r.plan.faults)]
        fired = f"{t['faults'][kind]}" + (f" ({t['workers_killed']} ranks)" if kind == "worker_kill" else "")
        lines.append(f"| {kind} | {fired} | {len(runs)} | {sum(not r.checked.all() for r in runs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.campaign", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="faulted runs (default 30)")
    ap.add_argument("--seed", type=int, default=12, help="seeds every schedule (default 12)")
    ap.add_argument("--epochs", type=int, default=8, help="epochs per run (default 8)")
    ap.add_argument(
        "--specs", default=",".join(VARIANTS), help=f"spec variants, in turn (default {','.join(VARIANTS)})"
    )
    ap.add_argument("--json", dest="json_path", help="write the table and every run's details here")
    ap.add_argument("--workdir", help="specs and driver logs (default: a temp dir, kept when a run fails)")
    args = ap.parse_args(argv)
    variants = args.specs.split(",")
    if unknown := set(variants) - set(VARIANTS):
        ap.error(f"--specs: unknown {sorted(unknown)}; known: {sorted(VARIANTS)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="campaign-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(line: str) -> None:  # progress, with the minutes since the start
        print(line.replace("[campaign]", f"[campaign {(time.time() - t0) / 60:4.1f}m]", 1), flush=True)

    results: list[RunResult] = []
    with Campaign(workdir, args.epochs, log) as c:
        c.reference(variants[0])  # the steps per epoch, for the plans
        plans = make_plans(args.seed, args.runs, args.epochs, c.steps, variants)
        for plan in plans:
            log(
                f"[campaign] run {plan.index}/{args.runs} ({plan.variant}): "
                + ", ".join(f.describe() for f in plan.faults)
            )
            try:
                res = c.run(plan)
            except Exception as e:  # the campaign's own trouble: this run fails, the next one runs
                res = RunResult(plan)
                res.checked.problems.append(f"campaign error: {type(e).__name__}: {e}")
            results.append(res)
            row = res.row()
            verdict = "ok" if row["ok"] else "FAIL: " + "; ".join(row["problems"])
            log(
                f"[campaign] run {plan.index}/{args.runs}: {verdict} ({res.wall_s:.0f}s, "
                f"{res.restarts} restart(s), {len(res.resumes)} resume(s))"
            )
    totals = summarize(results, time.time() - t0)
    print(table(results, totals), flush=True)
    if args.json_path:
        out = {
            "command": f"python -m bench.campaign --runs {args.runs} --seed {args.seed} "
            f"--epochs {args.epochs} --specs {args.specs}",
            "seed": args.seed,
            "epochs": args.epochs,
            "specs": {v: VARIANTS[v] for v in variants},
            "totals": totals,
            "runs": [r.row() for r in results],
        }
        Path(args.json_path).write_text(json.dumps(out, indent=1))
    failed = totals["failed_runs"]
    if not failed and not args.workdir:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    elif failed:
        log(f"[campaign] {failed} run(s) failed; specs and driver logs in {workdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""A seeded fault campaign: short digits runs under random schedules of real faults, each
checked against a fault-free run of the same spec.

    python -m harness.campaign --runs 30 --seed 12 --json bench/results/campaign.json
    make campaign                                   # the campaign docs/reliability.md reports

One Ray cluster (a head and two worker nodes on this machine: harness/cluster.py) and
one moto S3 server behind a fault-injecting proxy (harness/s3.py) serve every run;
each run is `orchestrator run SPEC --address CLUSTER`, storage on the S3 server through the
proxy. For the first partition a second cluster like the first is started, with a proxy of
its own in front of the same S3 server (its own network path to S3), and kept. A run's
faults are drawn (seeded) from:

    worker_kill          SIGKILL of one or two ranks at a random step (chaos.kills)
    after_upload         SIGKILL of rank 0 after a checkpoint's upload, before its commit
    raylet_kill          SIGKILL of the raylet of a node that hosts a rank (a new node joins)
    driver_kill          SIGKILL of the driver, then `orchestrator resume`
    coordinator_restart  SIGKILL of the coordinator actor's process (Ray restarts it)
    s3_outage            the proxies answer 503 SlowDown, reset connections, or both, for seconds
    partition            the driver and its coordinator frozen (SIGSTOP) past the lease TTL while
                         a second driver on the second cluster takes the run over, then thawed

The first two are in the run's spec (the workers fire them); the others the campaign fires
once the run has committed a chosen epoch. Every block of three runs covers the first six
kinds (two drawn from a shuffled deck per run, now and then a third), and one run of each
block, drawn, gets a partition besides: a third of the runs.

A partition is the stale owner: driver A's node stalls (a VM paused, a long GC pause, a
network partition that holds its packets) while the rest of its cluster runs on, another
driver takes the run over, and A's node wakes up. The run's spec sets
`failure.lease_ttl_s` to PARTITION_TTL_S (5 s). Each partition is drawn one of two moments:

    training   after the chosen epoch's commit, whatever A is doing then;
    orphans    after it, the campaign SIGKILLs one of A's ranks, so that the worker group
               restarts and A's coordinator collects orphans for the new attempt, and
               freezes A while the first proxy holds that coordinator's listing of
               checkpoints/. The listing is answered at the thaw, from what S3 holds then:
               B's checkpoints, which no manifest A knows names. A stale owner deleting
               the new owner's checkpoints as orphans: the defect fencing must prevent,
               hit on purpose rather than by chance.

Then, in order:

    1. SIGSTOP of A's coordinator actor's process (its pid from A's coordinator_started
       event), then of A's driver's process group (the lease heartbeat thread lives in the
       driver). Both are on the driver's node (the coordinator is pinned to it): that node
       frozen. A's Ray Train controller and workers are not frozen: the controller and the
       ranks run as processes of their own, on other nodes as well, and a stalled driver
       node leaves them running. They train on up to their next call to the coordinator,
       which waits (a worker's calls time out after 300 s); rank 0's writer uploads its
       next checkpoint and its commit call waits behind the freeze. So A's side wakes with
       uploads and a commit in flight, the harder case for the fencing.
    2. Wait until lease.json's age, by the storage's clock, is past the TTL (+1 s).
    3. `orchestrator resume RUN_URI --address SECOND` (driver B) on the second cluster,
       through the second proxy: it takes the lease over (a lease_taken_over event),
       starts its coordinator there (on A's cluster it would `ray.kill` A's coordinator by
       name, which would hide the stale writer this fault is about), claims the manifest
       and trains. Within TAKEOVER_TIMEOUT_S, well inside the workers' 300 s.
    4. Once B has committed a checkpoint (a commit event after B's driver_started): the
       held listing (orphans) is let through, A's coordinator is thawed (SIGCONT), and
       A's driver THAW_GAP_S (1 s) later. The coordinator works through what it was doing
       and its queued calls before A's heartbeat can find the lease lost and fence it: the
       worst order for the fencing, which must not depend on the driver's word.
    5. A must stop by itself within FENCE_TIMEOUT_S: exit 3 (EXIT_LEASE, "taken over").
       Once it has, what A's side changed since the freeze (everything through the first
       proxy, which logs every write) must hold no delete of a checkpoint B wrote (attempt
       past the manifest's count at the takeover) or B's manifest kept at the thaw, and no
       write of manifest.json or lease.json that went through; every checkpoint of B's
       manifest at the thaw must still verify; lease.json must be B's while B runs. A's
       coordinator rewriting events.jsonl or metrics.jsonl from its stale rows after the
       thaw is noted (B's next write restores them; stale_journal_rewrites in the JSON).
       B is the run's next driver (a resume, counted), later faults of the run fire on B's
       cluster, and the run is checked like every other.

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
                       coordinator, refused requests, a resumed driver; a partition: a
                       lease_taken_over and a resumed driver after it, B's commit before
                       the thaw, the held listing (orphans), and step 5 above)
    nothing left       no process of the run on either cluster after its last driver ended

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
from urllib.parse import parse_qs, unquote, urlsplit

import psutil
import torch
import yaml

from harness.cli import ROOT
from orchestrator.core.lease import LEASE, holder
from orchestrator.core.manifest import (
    CHECKPOINTS,
    EVENTS,
    METRICS,
    RECORD,
    CheckpointRecord,
    Manifest,
    read_jsonl,
    read_manifest,
)
from orchestrator.core.storage import Storage
from orchestrator.core.verify import VerificationError, read_verified

DECK = ("worker_kill", "after_upload", "raylet_kill", "driver_kill", "coordinator_restart", "s3_outage")
KINDS = (*DECK, "partition")
CHAOS_KINDS = ("worker_kill", "after_upload")  # written into the spec; the workers fire them
MONITOR, MODE = "val_loss", "min"
# Spec variants: what retention keeps and when checkpoints are taken. Each has its own
# fault-free reference run.
VARIANTS: dict[str, dict[str, Any]] = {
    "epochs": {"top_k": 2, "keep_latest": 1, "keep_every_n_epochs": 2, "every_n_steps": None},
    "midepoch": {"top_k": 1, "keep_latest": 2, "keep_every_n_epochs": 3, "every_n_steps": 10},
}
BUCKET = "campaign"
MAX_LIVES = 5  # drivers per run: the first, and resumes after a driver kill, a partition or a clear failure
LIFE_TIMEOUT_S = 600.0
# A partition (see the docstring): the lease TTL of its run's spec; how long B may take to
# commit (A's workers wait on the frozen coordinator: their calls time out at 300 s); how
# long A may take to stop once thawed.
PARTITION_TTL_S = 5.0
TAKEOVER_TIMEOUT_S = 200.0
FENCE_TIMEOUT_S = 300.0
HOLD_TIMEOUT_S = 120.0  # "orphans": from the rank's kill to the coordinator's listing
THAW_GAP_S = 1.0  # from the coordinator's thaw to the driver's
TOOK_OVER = "took over after a partition"  # a resume, as RunResult.resumes names it
POLL_S = 0.3  # how often a run's events are read for fault triggers (an epoch takes seconds)
RUN_ACTORS = ("Coordinator", "TrainController", "RayTrainWorker")  # a run's processes, by Ray's titles


# -- the plan -----------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    epoch: int  # chaos: the epoch it fires in; the others: fire once this epoch is committed
    kills: list[dict[str, Any]] = field(default_factory=list)  # chaos: the spec's kill entries
    mode: str = ""  # s3_outage: 503 | reset | flaky; partition: training | orphans
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
        extra = f", {self.mode}" if self.kind == "partition" else extra
        return f"{self.kind}(after e{self.epoch}{extra})"


@dataclass
class Driver:
    """One driver process of a run: its logs, the cluster it runs on, when it started."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    cluster: Any  # harness.cluster.LocalCluster
    started: float


@dataclass
class Thawed:
    """A partition's driver A after its thaw, until it stops, and what it is checked against."""

    a: Driver
    b: Driver  # the driver that took the run over
    fault: Fault
    res: RunResult
    b_first: int  # B's first attempt (the manifest's count when B started, plus one)
    at_thaw: dict[str, CheckpointRecord]  # the checkpoints of B's manifest at the thaw
    mark: int  # A's side's writes (Campaign.proxy.writes) from here on were made since the freeze
    thawed: float  # when A's coordinator was thawed
    deadline: float  # A must have stopped by then


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

    @property
    def partitioned(self) -> bool:
        return any(f.kind == "partition" for f in self.faults)


def make_plans(
    seed: int, runs: int, epochs: int, steps: int, variants: list[str], only: tuple[str, ...] = KINDS
) -> list[Plan]:
    """Each run gets two fault kinds, drawn so that every block of three runs covers the six
    of DECK, and now and then a third; one run of each block, drawn, gets a partition too.
    Epochs, steps, ranks, modes and durations are drawn as well. `only` narrows the kinds
    (for debugging: the blocks then cover those; with only partition, every run has one)."""
    if epochs < 4:
        raise ValueError("a campaign needs at least 4 epochs (external faults fire before the last three)")
    rng = random.Random(seed)
    plans: list[Plan] = []
    deck: list[str] = []
    cards = [k for k in DECK if k in only]
    partitioned = -1  # the run of the current block that gets a partition
    for i in range(1, runs + 1):
        if (i - 1) % 3 == 0:
            partitioned = i + rng.randrange(min(3, runs - i + 1))
        kinds = []
        for _ in range(2 if cards else 0):
            if not deck:
                deck = list(cards)
                rng.shuffle(deck)
            kinds.append(deck.pop())
        if cards and rng.random() < 0.3:
            kinds.append(rng.choice(cards))
        if "partition" in only and (i == partitioned or not cards):  # only partitions: every run
            kinds.append("partition")
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
                if kind == "partition":
                    f.mode = rng.choice(["training", "orphans"])
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

    def merge(self, earlier: Checked) -> None:
        """Put what an earlier look at the run found before what this one did."""
        for name in ("lost", "orphans", "mismatches", "problems", "notes"):
            setattr(self, name, [*getattr(earlier, name), *getattr(self, name)])

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
        self.second: Any = None  # the second cluster, started for the first partition
        self.proxy2: Any = None  # the second cluster's way to the S3 server
        self.active: Any = None  # the cluster the run's current driver is on
        self._drivers: list[Driver] = []  # the current run's, to stop if the campaign is interrupted

    def __enter__(self) -> Campaign:
        from harness.cluster import local_cluster
        from harness.s3 import CREDS, FaultProxy, MotoServer

        self.moto = MotoServer.start(self.workdir / "moto.log")
        self._stack.callback(self.moto.stop)
        self.moto.client().create_bucket(Bucket=BUCKET)
        self.proxy = FaultProxy(self.moto.port)
        self.proxy.server.handle_error = lambda *a: None  # type: ignore[method-assign]  # resets by killed clients
        self._stack.callback(self.proxy.close)
        self.cluster = self._stack.enter_context(local_cluster(workers=2, head_num_cpus=1, **CREDS))
        self.active = self.cluster
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
        for proxy in self.proxies():
            proxy.mode = "ok"
            proxy.release()
        self._stack.close()

    def second_cluster(self) -> Any:
        """The second Ray cluster (a partition's driver B runs there), like the first, with a
        proxy of its own in front of the same S3 server (its own network path: what goes
        through the first proxy after a partition is driver A's side, and only A's); started
        the first time it is asked for, then kept for the rest of the campaign."""
        if self.second is None:
            from harness.cluster import local_cluster
            from harness.s3 import CREDS, FaultProxy

            t0 = time.time()
            self.proxy2 = FaultProxy(self.moto.port)
            self.proxy2.server.handle_error = lambda *a: None  # type: ignore[method-assign]
            self._stack.callback(self.proxy2.close)
            self.second = self._stack.enter_context(local_cluster(workers=2, head_num_cpus=1, **CREDS))
            self.log(
                f"[campaign] second cluster {self.second.address} ({len(self.second.nodes)} nodes) "
                f"up in {time.time() - t0:.0f}s, S3 behind proxy {self.proxy2.endpoint}"
            )
        return self.second

    def clusters(self) -> list[Any]:
        return [c for c in (self.cluster, self.second) if c is not None]

    def proxies(self) -> list[Any]:
        return [p for p in (self.proxy, self.proxy2) if p is not None]

    def resume_args(self, uri: str, cluster: Any) -> list[str]:
        """`orchestrator resume` of uri from cluster, through that cluster's proxy. (Reading the
        run's stored spec needs the endpoint first, as docs/storage.md says.)"""
        proxy = self.proxy if cluster is self.cluster else self.proxy2
        return ["resume", uri, "--storage-option", f"endpoint_url={proxy.endpoint}"]

    def storage(self, name: str) -> Storage:
        return Storage(f"s3://{BUCKET}/runs/{name}", self.direct)

    def spec(self, name: str, variant: str, kills: list[dict[str, Any]], partition: bool = False) -> Path:
        data = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
        data.update(name=name, epochs=self.epochs, chaos={"kills": kills})
        data["storage"] = {"root": f"s3://{BUCKET}/runs", "options": {"endpoint_url": self.proxy.endpoint}}
        data["checkpoint"].update(VARIANTS[variant])
        data["failure"] = {"max_failures": 8}
        if partition:  # a stale lease in seconds, not the default 30
            data["failure"]["lease_ttl_s"] = PARTITION_TTL_S
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
            for p in [p for c in self.clusters() for p in c.processes()]:
                with contextlib.suppress(psutil.Error):
                    title = " ".join(p.cmdline())
                    if any(f"ray::{a}" in title for a in RUN_ACTORS):
                        left.append(f"pid {p.pid} {title[:60]}")
            if not left or time.time() > end:
                return left
            time.sleep(1.0)

    def run(self, plan: Plan) -> RunResult:
        ref = self.reference(plan.variant)
        if plan.partitioned:
            self.second_cluster()  # up before the run starts: a partition fires within seconds
        res = RunResult(plan)
        t0 = time.time()
        spec = self.spec(plan.name, plan.variant, plan.chaos(), plan.partitioned)
        self._drive(res, plan.name, spec, plan.faults)
        res.wall_s = time.time() - t0
        st = self.storage(plan.name)
        during = res.checked  # what driving the run found (a driver's exit, a partition's checks)
        res.checked, _ = check_run(st, VARIANTS[plan.variant], self.epochs, self.steps, ref)
        res.checked.merge(during)
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
        driver kill or a failure that names `orchestrator resume`. After a partition the
        driver that took the run over (on the second cluster) is the run's next life, and
        later resumes go to its cluster."""
        st = self.storage(name)
        uri = st.uri
        logdir = self.workdir / name
        logdir.mkdir(exist_ok=True)
        res.logs = str(logdir)
        self.active = self.cluster
        self._drivers = []
        args = ["run", str(spec)]
        pending = sorted((f for f in faults if f.kind not in CHAOS_KINDS), key=lambda f: f.epoch)
        try:
            while res.lives < MAX_LIVES:
                drv = self._start(args, res, logdir, self.active)
                drv, killed = self._watch(drv, st, pending, res, logdir)
                if drv.proc.returncode == 0:
                    self._read_summary(res, drv.out)
                    return
                args = self.resume_args(uri, self.active)
                if killed:
                    res.resumes.append("driver killed")
                    continue
                text = drv.err.read_text(errors="replace")
                rc = drv.proc.returncode
                if rc in (1, 4) and f"orchestrator resume {uri}" in text and "Traceback" not in text:
                    why = text.strip().splitlines()[-1][:300]
                    res.resumes.append(f"failed clearly (exit {rc}): {why}")
                    continue
                res.checked.problems.append(
                    f"driver {res.lives} exited {rc} without the documented error: {text.strip()[-600:]}"
                )
                return
            res.checked.problems.append(f"not finished after {MAX_LIVES} drivers")
        finally:  # interrupted (Ctrl-C, a harness error): the drivers go too
            for d in self._drivers:
                if d.proc.poll() is None:
                    os.killpg(d.proc.pid, signal.SIGKILL)  # a stopped process too
                    d.proc.wait()

    def _start(self, args: list[str], res: RunResult, logdir: Path, cluster: Any) -> Driver:
        """The run's next driver on cluster: `orchestrator ARGS --address CLUSTER --json`."""
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
                    cluster.address,
                    "--json",
                    "--quiet",
                ],
                cwd=ROOT,
                env=cluster.env,
                stdout=o,
                stderr=e,
                start_new_session=True,
            )
        drv = Driver(proc, out, err, cluster, time.time())
        self._drivers.append(drv)
        return drv

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

    def _watch(
        self, drv: Driver, st: Storage, pending: list[Fault], res: RunResult, logdir: Path
    ) -> tuple[Driver, bool]:
        """Wait for the run's driver to exit, firing pending faults as their epochs are
        committed. A partition hands the run to driver B, watched from then on, while the
        thawed driver A must stop by itself (checked as it exits). Returns the last driver,
        and True when the campaign killed it."""
        end = drv.started + LIFE_TIMEOUT_S
        killed = False
        stale: list[Thawed] = []  # thawed drivers, until they stop
        while drv.proc.poll() is None or stale:
            stale = [x for x in stale if not self._stale_ended(st, x)]
            if drv.proc.poll() is not None:  # waiting for a thawed driver only
                time.sleep(POLL_S)
                continue
            if time.time() > end:
                os.killpg(drv.proc.pid, signal.SIGKILL)
                drv.proc.wait()
                raise RuntimeError(f"a driver of {st.uri} ran past {LIFE_TIMEOUT_S:.0f}s")
            if pending and self._committed(st, pending[0].epoch):
                f = pending[0]
                if f.kind == "partition":
                    thawed = self._partition(f, drv, st, res, logdir)
                    if thawed is not None:
                        pending.pop(0)
                        stale.append(thawed)
                        drv, end = thawed.b, thawed.b.started + LIFE_TIMEOUT_S
                elif self._fire(f, drv, st):
                    pending.pop(0)
                    killed = killed or f.kind == "driver_kill"
            time.sleep(POLL_S)
        return drv, killed

    def _committed(self, st: Storage, epoch: int) -> bool:
        """A commit at or past the end of epoch is logged (at or past: the event of one commit
        may have died with its coordinator)."""
        with contextlib.suppress(Exception):  # a torn read of events.jsonl: try again
            events = read_jsonl(st, EVENTS)
            return any(e["kind"] == "commit" and e["global_step"] >= epoch * self.steps for e in events)
        return False

    def _fire(self, f: Fault, drv: Driver, st: Storage) -> bool:
        """Fire f now if it can be (False: not yet, e.g. no rank on a worker node right now)."""
        f.at = time.time()
        proc = drv.proc
        if f.kind == "driver_kill":
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            f.fired, f.note = True, f"driver pid {proc.pid} SIGKILLed"
        elif f.kind == "s3_outage":  # of the S3 server: every cluster's proxy
            before = sum(p.faults for p in self.proxies())
            for p in self.proxies():
                p.mode = f.mode
            time.sleep(f.seconds)
            # An outage nobody reached did not happen: one that fell in a quiet stretch (a group
            # restarting, no save due) is held until it refuses a request, for at most 30 s more.
            # (Seen: the full suite's campaign, a 3.4 s reset after a raylet kill, 0 refused.)
            held = time.time()
            while sum(p.faults for p in self.proxies()) == before and time.time() - held < 30:
                time.sleep(0.1)
            for p in self.proxies():
                p.mode = "ok"
            refused = sum(p.faults for p in self.proxies()) - before
            extra = time.time() - held
            longer = f", held {extra:.1f}s more for a request" if extra > 0.2 else ""
            f.fired, f.note = refused > 0, f"{refused} requests refused{longer}"
        elif f.kind == "coordinator_restart":
            proc_ = self._coordinator(st, drv.started)
            if proc_ is None:
                return False
            proc_.kill()
            f.fired, f.note = True, f"coordinator pid {proc_.pid} SIGKILLed"
        elif f.kind == "raylet_kill":
            victim = self._victim(st, drv)
            if victim is None:
                return False
            where = "" if drv.cluster is self.cluster else " of the second cluster"
            f.fired, f.note = True, f"node {victim}{where} killed"
            try:
                drv.cluster.kill_node(victim)  # SIGKILL its raylet, then the rest of the node
            except AssertionError as e:  # some process of the node outlived it
                f.problem = str(e)
            drv.cluster.add_node()  # the replacement
        return True

    def _partition(self, f: Fault, a: Driver, st: Storage, res: RunResult, logdir: Path) -> Thawed | None:
        """Freeze driver A and its coordinator past the lease TTL, let driver B take the run
        over on the second cluster and commit, then thaw A (the module's docstring, steps
        1-4). Returns A and B as they are at the thaw; None: not yet (A's coordinator is not
        up, or no rank to kill right now)."""
        coord = self._coordinator(st, a.started)
        if coord is None or a.proc.poll() is not None:
            return None
        second = self.second_cluster()  # started with the run (Campaign.run): no wait here
        steps: list[str] = []
        if f.mode == "orphans" and not self._hold_orphan_listing(f, a, st, steps):
            return None
        f.at = f.at or time.time()
        at_thaw: dict[str, CheckpointRecord] = {}
        mark = len(self.proxy.writes)  # from here on, what A's side changes in storage
        try:
            coord.suspend()  # SIGSTOP
        except psutil.Error:  # it died just now (a worker node's loss, a kill)
            self.proxy.release()
            f.problem = f"the coordinator (pid {coord.pid}) died before the freeze"
            f.note = "; ".join(steps)
            return None
        try:
            os.killpg(a.proc.pid, signal.SIGSTOP)
            steps.append(f"driver pid {a.proc.pid} and coordinator pid {coord.pid} SIGSTOPped")
            limit = time.time() + 4 * PARTITION_TTL_S + 60
            while True:
                age = -1.0
                with contextlib.suppress(Exception):  # a storage hiccup: read again
                    v = st.read_versioned(LEASE)
                    age = math.inf if v is None else v.age_s
                if age > PARTITION_TTL_S + 1:
                    break
                if time.time() > limit:
                    f.problem = f"lease.json still {age:.1f}s old {time.time() - f.at:.0f}s into the freeze"
                    break
                time.sleep(0.5)
            steps.append(f"lease {age:.1f}s old at +{time.time() - f.at:.1f}s")
            b_first = self._attempts(st) + 1  # A's last write landed by now: B's come after
            b = self._start(self.resume_args(st.uri, second), res, logdir, second)
            res.resumes.append(TOOK_OVER)
            self.active = second
            first = self._first_commit(st, b, time.time() + TAKEOVER_TIMEOUT_S)
            if first is None:
                rc = b.proc.poll()
                state = "running" if rc is None else f"exited {rc}"
                steps.append(f"driver B ({state}) committed nothing in {time.time() - f.at:.0f}s")
            else:
                f.fired = True
                steps.append(
                    f"B (driver {res.lives}, second cluster) committed {first} at +{time.time() - f.at:.0f}s"
                )
            with contextlib.suppress(Exception):
                m = read_manifest(st)
                at_thaw = {c.id: c for c in m.checkpoints} if m else {}
        finally:
            # The held listing is answered now, from what storage holds now (B's commits in it);
            # then the coordinator wakes, and works through it and its queued calls for
            # THAW_GAP_S before A's driver, whose heartbeat would fence it: the worst order.
            self.proxy.release()
            thawed = time.time()
            with contextlib.suppress(psutil.Error):
                coord.resume()
            time.sleep(THAW_GAP_S)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(a.proc.pid, signal.SIGCONT)
        steps.append(f"thawed at +{time.time() - f.at:.0f}s")
        f.note = "; ".join(steps)
        return Thawed(a, b, f, res, b_first, at_thaw, mark, thawed, thawed + FENCE_TIMEOUT_S)

    def _hold_orphan_listing(self, f: Fault, a: Driver, st: Storage, steps: list[str]) -> bool:
        """A partition's "orphans" moment: SIGKILL one of A's ranks, so that the worker group
        restarts and the coordinator collects orphans for the new attempt, and hold its
        listing of checkpoints/ at the proxy (answered at the thaw, with B's commits in it).
        True once the listing is held, or after HOLD_TIMEOUT_S without it (f.problem says so;
        the freeze goes on mid-training); False: no rank to kill right now."""
        ranks = []
        for p in a.cluster.processes():
            with contextlib.suppress(psutil.Error):
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    ranks.append(p)
        if not ranks:
            return False
        prefix = f"{st.path(CHECKPOINTS).split('/', 1)[1]}/"  # runs/<name>/checkpoints/

        def listing(method: str, path: str) -> bool:
            q = parse_qs(urlsplit(path).query)
            return method == "GET" and q.get("list-type") == ["2"] and q.get("prefix") == [prefix]

        self.proxy.hold_next(listing)
        f.at = time.time()
        victim = ranks[0]
        with contextlib.suppress(psutil.Error):
            victim.kill()
        steps.append(f"rank process pid {victim.pid} SIGKILLed")
        end = time.time() + HOLD_TIMEOUT_S
        while not self.proxy.held and time.time() < end and a.proc.poll() is None:
            time.sleep(0.05)
        if self.proxy.held:
            steps.append(f"the coordinator's listing of checkpoints/ held at +{time.time() - f.at:.1f}s")
        else:
            self.proxy.release()
            f.problem = f"no listing of checkpoints/ in {time.time() - f.at:.0f}s after the rank's kill"
        return True

    def _first_commit(self, st: Storage, b: Driver, deadline: float) -> str | None:
        """The id of the first checkpoint driver B committed (a commit event after its
        driver_started), waited for until deadline or B's exit."""
        while time.time() < deadline and b.proc.poll() is None:
            with contextlib.suppress(Exception):  # a torn read: again
                events = read_jsonl(st, EVENTS)
                start = next(
                    i
                    for i, e in enumerate(events)
                    if e["kind"] == "driver_started" and e.get("resume") and e["ts"] >= b.started
                )
                commits = [e["id"] for e in events[start:] if e["kind"] == "commit"]
                if commits:
                    return commits[0]
            time.sleep(POLL_S)
        return None

    def _stale_ended(self, st: Storage, t: Thawed) -> bool:
        """Whether thawed driver A has stopped (step 5 of a partition); when it has (or was
        killed at its deadline), what it did goes into the fault's note, what it did wrong
        into its problem."""
        f, a = t.fault, t.a
        rc = a.proc.poll()
        if rc is None and time.time() < t.deadline:
            return False
        problems = []
        if rc is None:
            os.killpg(a.proc.pid, signal.SIGKILL)
            a.proc.wait()
            problems.append(
                f"driver A (pid {a.proc.pid}) still running {FENCE_TIMEOUT_S:.0f}s after the thaw"
            )
        else:
            text = a.err.read_text(errors="replace").strip()
            last = text.splitlines()[-1][:300] if text else ""
            f.note += f"; A exited {rc} at +{time.time() - f.at:.0f}s: {last}"
            if rc != 3 or "taken over" not in text:
                problems.append(f"driver A exited {rc}, not 3 (taken over): {text[-600:]}")
        with contextlib.suppress(Exception):  # the lease: B's while B runs (A must not release it)
            held = holder(st)
            m = read_manifest(st)
            if m is not None and m.status == "running" and (held is None or held.get("token") != m.owner):
                problems.append(f"after A stopped, lease.json is not the owner's (B's): {held}")
        for cid in self._damaged(st, t.at_thaw):
            problems.append(f"{cid}, in the manifest at the thaw, no longer verifies after A stopped")
        problems += self._a_side_writes(st, t)
        if problems:
            f.problem = "; ".join(filter(None, [f.problem, *problems]))
        return True

    def _a_side_writes(self, st: Storage, t: Thawed) -> list[str]:
        """What driver A's side (everything behind the first cluster's proxy) changed in the
        run since the freeze: the problems (a delete of a checkpoint B wrote or kept, a
        manifest or lease write that went through); the rest goes into the fault's note and
        the run's notes (A's workers' uploads; a journal A's coordinator rewrote)."""
        base = st.path("").rstrip("/") + "/"  # campaign/runs/<name>/
        problems: list[str] = []
        deleted: dict[str, int] = {}
        uploads, refused = 0, 0
        journals: Counter[str] = Counter()
        for ts, method, path, status in self.proxy.writes[t.mark :]:
            rel = unquote(path.split("?", 1)[0]).lstrip("/")
            if not rel.startswith(base):
                continue
            rel = rel[len(base) :]
            if not 200 <= status < 300:
                refused += 1
                continue
            top, _, rest = rel.partition("/")
            if top == CHECKPOINTS and method == "DELETE":
                cid = rest.split("/", 1)[0]
                deleted[cid] = deleted.get(cid, 0) + 1
            elif top == CHECKPOINTS:
                uploads += 1
            elif top in (EVENTS, METRICS) and ts >= t.thawed:
                journals[top] += 1
            elif top in ("manifest.json", LEASE) and ts >= t.thawed:  # before: in flight at the freeze
                problems.append(
                    f"A's side: {method} {top} went through ({status}) at +{ts - t.fault.at:.0f}s"
                )
        committed = set(t.at_thaw)
        with contextlib.suppress(Exception):  # B's commits so far (B rewrites a clobbered log)
            committed |= {e["id"] for e in read_jsonl(st, EVENTS) if e["kind"] == "commit"}
        for cid, n in sorted(deleted.items()):
            attempt = int(cid.rsplit("-a", 1)[1]) if "-a" in cid else 0
            if cid in committed and (cid in t.at_thaw or attempt >= t.b_first):
                # Lost whatever B's retention did with it later: it was committed, and deleted
                # by a driver that no longer owned the run.
                whose = "committed by B" if attempt >= t.b_first else "kept by B's manifest at the thaw"
                t.res.checked.lost.append(
                    f"{cid} ({whose}) deleted by A's side after the takeover ({n} objects)"
                )
            elif attempt >= t.b_first:
                problems.append(f"A's side deleted {cid}, B's upload ({n} objects)")
            else:
                t.fault.note += f"; A's side deleted its own uncommitted {cid}"
        t.fault.note += f"; A's side since the freeze: {uploads} upload(s), {refused} refused write(s)"
        for name, n in sorted(journals.items()):
            t.res.checked.notes.append(
                f"{t.fault.describe()}: A's coordinator rewrote {name} {n} time(s) after the thaw, "
                "with its stale rows (B's next write restores them)"
            )
        return problems

    @staticmethod
    def _attempts(st: Storage) -> int:
        """The manifest's attempt count (a few tries: a storage hiccup is no answer)."""
        for _ in range(5):
            with contextlib.suppress(Exception):
                m = read_manifest(st)
                return m.attempts if m else 0
            time.sleep(1.0)
        raise RuntimeError(f"{st.uri}: the manifest could not be read")

    @staticmethod
    def _damaged(st: Storage, at_thaw: dict[str, CheckpointRecord]) -> list[str]:
        """Checkpoints of at_thaw still in the manifest whose files do not verify (read again
        after a failure: one that B's retention dropped meanwhile is no damage)."""
        out = []
        m = read_manifest(st)
        for rec in m.checkpoints if m else []:
            if rec.id not in at_thaw:
                continue
            try:
                read_verified(st, rec)
            except (VerificationError, OSError) as e:
                now = read_manifest(st)
                if now is not None and now.get(rec.id) is not None:
                    out.append(f"{rec.id} ({type(e).__name__}: {str(e)[:200]})")
        return out

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

    def _victim(self, st: Storage, drv: Driver) -> str | None:
        """A worker node of the driver's cluster hosting a rank, not the driver's node (the
        coordinator's), while an attempt of this driver trains: not while the worker group
        (re)starts, where a lost node ends the start, not the attempt, and no `restart` is
        logged (seed 12, run 1, after the partition's change of the draws: the second of two
        raylet kills hit the replacement group as it started)."""
        coord = self._coordinator(st, drv.started)
        if coord is None:
            return None
        events = read_jsonl(st, EVENTS)
        last = {e["kind"]: i for i, e in enumerate(events) if e["ts"] >= drv.started}
        if last.get("attempt_started", -1) < last.get("restart", -1) or "attempt_started" not in last:
            return None
        for name in drv.cluster.nodes:
            if name == "head":
                continue
            procs = drv.cluster.processes(name)
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
            elif f.fired and f.kind == "partition":
                if not any(e["kind"] == "lease_taken_over" and e["ts"] >= f.at for e in events):
                    res.checked.problems.append(f"{f.describe()}: no lease_taken_over after it")
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
        "resumes_after_partition": sum(x == TOOK_OVER for r in rows for x in r["resumes"]),
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
        # A partition's driver A, thawed, rewrote events.jsonl or metrics.jsonl from its stale
        # rows before it was fenced (B's next write restores them): runs where it did.
        "stale_journal_rewrites": sum(any("A's coordinator rewrote" in n for n in r["notes"]) for r in rows),
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
    resumes = t["resumes_after_driver_kill"] + t["resumes_after_partition"] + t["resumes_after_clear_failure"]
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
    ap = argparse.ArgumentParser(prog="python -m harness.campaign", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="faulted runs (default 30)")
    ap.add_argument("--seed", type=int, default=12, help="seeds every schedule (default 12)")
    ap.add_argument("--epochs", type=int, default=8, help="epochs per run (default 8)")
    ap.add_argument(
        "--specs", default=",".join(VARIANTS), help=f"spec variants, in turn (default {','.join(VARIANTS)})"
    )
    ap.add_argument("--json", dest="json_path", help="write the table and every run's details here")
    ap.add_argument("--workdir", help="specs and driver logs (default: a temp dir, kept when a run fails)")
    ap.add_argument(
        "--only",
        help="draw only these fault kinds, comma-separated (debugging; not for the reported campaign)",
    )
    args = ap.parse_args(argv)
    variants = args.specs.split(",")
    if unknown := set(variants) - set(VARIANTS):
        ap.error(f"--specs: unknown {sorted(unknown)}; known: {sorted(VARIANTS)}")
    only = tuple(args.only.split(",")) if args.only else KINDS
    if unknown := set(only) - set(KINDS):
        ap.error(f"--only: unknown {sorted(unknown)}; known: {list(KINDS)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="campaign-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(line: str) -> None:  # progress, with the minutes since the start
        print(line.replace("[campaign]", f"[campaign {(time.time() - t0) / 60:4.1f}m]", 1), flush=True)

    results: list[RunResult] = []
    with Campaign(workdir, args.epochs, log) as c:
        c.reference(variants[0])  # the steps per epoch, for the plans
        plans = make_plans(args.seed, args.runs, args.epochs, c.steps, variants, only)
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
            "command": f"python -m harness.campaign --runs {args.runs} --seed {args.seed} "
            f"--epochs {args.epochs} --specs {args.specs}" + (f" --only {args.only}" if args.only else ""),
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

"""Goodput under failure: one training job, a seeded failure schedule, four sides.

The job: digits (scikit-learn's load_digits, each 8x8 image upscaled to 32x64 = 2048
features) through a DataLoader with a DistributedSampler, 2 workers, an MLP of 3 layers of
2048 (12.6M parameters: with Adam's two moments a 144 MB state) trained with Adam for a fixed
number of steps, a checkpoint every `every` steps (and at each epoch's end), the held-out
split evaluated at each epoch's end. The same job on every side:

    ray         bare Ray Train as its docs write it: report(checkpoint=...) from rank 0,
                get_checkpoint() to resume, SYNC upload, the 2 s poll; FailureConfig's
                max_failures raised to the number of failures (its default, 0, ends the run)
    ray_tuned   the same with the 0.25 s poll this project uses and ASYNC upload
    restart     this project, failure.mode restart, the job as a Task (the built-in loop)
    replicas    this project, failure.mode replicas: replicas refuse a DataLoader, so their
                Task gets the same samples as an indexable dataset and the loop deals the order

Each side runs once without failures and once with the schedule: SIGKILLs of a worker after
a seeded step, rank 0 among them (bare Ray's workers kill themselves after that step; this
project's through its chaos kills, before the next step: the same point). The sides are
interleaved in one sitting. Every worker appends a line per training step (time, pid and
the indices of its samples) and a mark per start of its train function / task build; the
figures come from those files:

    wall        the first step's start to the last step's start, over every rank
    goodput     tuned bare Ray's failure-free wall / the side's wall with failures
    lost        the side's wall with failures - tuned bare Ray's failure-free wall, split into
      overhead  the side's failure-free wall - tuned bare Ray's (what every step costs more)
      stood     for each failure, the longest stretch without a step starting on any rank,
                from the last step before the kill on (detection, restart, restore, the
                step the kill broke); of which detection+restart (kill -> the victim's
                restarted function) and restore (-> its first step)
      redone    steps rank 0 trained beyond the job's, x the side's failure-free step time
      other     the rest (a slower step while a replica is missing, noise)
    skipped     samples trained fewer times than in the side's own failure-free run

Tuned bare Ray's failure-free time is the reference (the brief's "bare Ray Train's failure-
free time"): the defaults' own includes their SYNC upload's stall on every save, which is a
per-step overhead of theirs, not a property of the job.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from bench.recovery import ROOT, make, ray_fit, stood_still

SIDES = ("ray", "ray_tuned", "restart", "replicas", "auto")
KEYS = (
    "goodput_ray",
    "goodput_ray_tuned",
    "goodput_restart",
    "goodput_replicas",
    "lost_vs_ray_tuned",
    "lost_vs_ray",
    "clean_vs_ray_tuned",
    "step_time_replicas_vs_restart",
    "auto_clean_vs_restart",
    "auto_redone_per_failure",
)
# 1536 training samples, 32 a rank, 2 ranks: 24 steps an epoch; a save every 12 steps (two an
# epoch, one at its end). A step takes ~0.15 s on a quiet 2-core machine: 12 epochs (288 steps)
# ~ 45 s of training with 2 kills in --quick; 40 epochs (960 steps) ~ 150 s with 3 in the full run.
QUICK = {
    "width": 2048,
    "batch": 32,
    "world": 2,
    "every": 12,
    "epochs": 12,
    "failures": 3,
    "node_losses": 1,  # of the failures: a node lost (its raylet and processes SIGKILLed)
    "seed": 0,
    "rounds": 1,
}
FULL = {**QUICK, "epochs": 40, "failures": 4}
TRAIN = 1536  # samples trained on; the rest of the 1797 are held out


# -- the failure schedule -----------------------------------------------------------------
def schedule(
    seed: int, steps: int, per_epoch: int, failures: int, world: int, node_losses: int = 0
) -> list[dict[str, Any]]:
    """`failures` failures, one drawn in each equal stretch of the steps between the first and
    the last epoch (so they come at a steady rate), each of a seeded rank; `node_losses` of them
    (seeded) lose the rank's whole node, the others SIGKILL the rank's worker, rank 0's at least
    once. `step`: the steps done when the failure comes (after that step, before the next);
    `epoch` (1-based) and `in_epoch`: the same as this project's chaos kill; `kind`: "kill" or
    "node"."""
    rng = random.Random(seed)
    lo, hi = per_epoch, steps - per_epoch
    if failures < 1 or hi - lo < failures:
        return []
    width = (hi - lo) / failures
    at = [rng.randrange(lo + int(i * width), lo + int((i + 1) * width)) for i in range(failures)]
    ranks = [rng.randrange(world) for _ in at]
    if 0 not in ranks:
        ranks[rng.randrange(failures)] = 0
    nodes = set(rng.sample(range(failures), min(node_losses, failures - 1))) if node_losses else set()
    kills = [i for i in range(failures) if i not in nodes]
    if all(ranks[i] != 0 for i in kills):  # a SIGKILL of rank 0, the writer, at least once
        ranks[kills[0]] = 0
    return [
        {"step": k, "rank": r, "epoch": k // per_epoch + 1, "in_epoch": k % per_epoch}
        | {"kind": "node" if i in nodes else "kill"}
        for i, (k, r) in enumerate(zip(at, ranks, strict=True))
    ]


def described(kills: list[dict[str, Any]]) -> str:
    what = {"kill": "SIGKILL of", "node": "node lost with"}
    at = ", ".join(f"{what[k.get('kind', 'kill')]} rank {k['rank']} after step {k['step']}" for k in kills)
    return f"{len(kills)} failures: {at}"


# -- the data, the marks ------------------------------------------------------------------
def digits(width: int) -> tuple[TensorDataset, TensorDataset]:
    """(train: x, y, sample index; held out: x, y), the same split everywhere; each image
    upscaled to `width` features (32 rows of width / 32)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    x = nn.functional.interpolate(x, size=(32, width // 32), mode="bilinear", align_corners=False).flatten(1)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return TensorDataset(x[:TRAIN], y[:TRAIN], torch.arange(TRAIN)), TensorDataset(x[TRAIN:], y[TRAIN:])


class Marks:
    """What a worker writes: a start mark when its function starts, a line per step."""

    def __init__(self, workdir: str, rank: int) -> None:
        import ray

        self.workdir, self.rank = workdir, rank
        # None outside Ray (this project's driver builds the task once to check it, before it
        # connects): asking for a runtime context there would start a Ray of its own.
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        with open(os.path.join(workdir, f"marks-{rank}.jsonl"), "a") as f:
            f.write(
                json.dumps({"ev": "start", "t": time.time(), "pid": os.getpid(), "node": self.node}) + "\n"
            )
        self.steps = open(os.path.join(workdir, f"steps-{rank}.txt"), "a", buffering=1)

    def step(self, idx: torch.Tensor) -> None:
        self.steps.write(f"{time.time():.6f} {os.getpid()} {','.join(map(str, idx.tolist()))}\n")

    def maybe_kill(self, done: int, kills: list[dict[str, Any]]) -> None:
        """Bare Ray's side of the schedule: after step `done`, SIGKILL this worker or lose its
        node, once."""
        for i, k in enumerate(kills):
            if k["rank"] == self.rank and k["step"] == done:
                self.fail(i, k.get("kind", "kill"))

    def fail(self, i: int, kind: str) -> None:
        """Failure i of the schedule, here, once a run: a SIGKILL of this process, or a request
        to the bench (NodeKiller) to lose this node, waited out (the node's loss kills it)."""
        mark = os.path.join(self.workdir, f"{kind}-{i}.json")
        if os.path.exists(mark):
            return
        with open(mark + ".tmp", "w") as f:
            json.dump({"t": time.time(), "rank": self.rank, "node": self.node}, f)
        os.replace(mark + ".tmp", mark)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)  # the bench kills this node in well under a second
        raise RuntimeError(f"node-{i}: this node was not lost")


# -- bare Ray Train -----------------------------------------------------------------------
def ray_train(cfg: dict[str, Any]) -> None:
    import ray.train
    from ray.train import CheckpointUploadMode
    from ray.train.torch import prepare_model

    from bench.side_by_side import _ray_save

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    marks = Marks(cfg["workdir"], rank)
    model, opt = make(cfg["width"])
    done = 0
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        done = int(state["step"])
    ddp = prepare_model(model)
    train, val = digits(cfg["width"])
    sampler: DistributedSampler[Any] = DistributedSampler(train, world, rank, seed=cfg["seed"])
    loader = DataLoader(train, batch_size=cfg["batch"], sampler=sampler, drop_last=True)
    per_epoch = len(loader)
    mode = CheckpointUploadMode.ASYNC if cfg["async_upload"] else CheckpointUploadMode.SYNC
    for epoch in range(done // per_epoch, cfg["epochs"]):
        sampler.set_epoch(epoch)
        for x, y, idx in itertools.islice(loader, done - epoch * per_epoch, None):  # resume mid-epoch
            marks.step(idx)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()
            done += 1
            if done % per_epoch == 0:
                with torch.no_grad():
                    float(nn.functional.cross_entropy(model(val.tensors[0]), val.tensors[1]))
            if done % cfg["every"] == 0:
                if rank == 0:
                    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done}
                    _ray_save({"state.pt": state}, mode, done)
                else:
                    ray.train.report({"i": done})
            marks.maybe_kill(done, cfg["kills"])


# -- this project -------------------------------------------------------------------------
def build(options: dict[str, Any], ctx: Any) -> Any:
    """The job as a Task: a DataLoader (restart) or the same samples indexable (replicas)."""
    from workers.task import Task

    torch.set_num_threads(1)
    marks = Marks(options["workdir"], ctx.rank)
    model, opt = make(options["width"])
    train, val = digits(options["width"])
    data: Any = train
    if options["loader"]:
        sampler: DistributedSampler[Any] = DistributedSampler(
            train, num_replicas=ctx.world_size, rank=ctx.rank, seed=ctx.seed
        )
        data = DataLoader(train, batch_size=options["batch"], sampler=sampler, drop_last=True)
    lose_node_at = node_loss_batches(options, ctx)

    def step(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y, idx = batch
        if (i := lose_node_at.get(tuple(idx.tolist()))) is not None:
            marks.fail(i, "node")  # before the step starts, as bare Ray's after the one before
        marks.step(idx)
        return nn.functional.cross_entropy(model(x), y)

    return Task(
        model=model,
        optimizer=opt,
        train_data=data,
        val_data=val,
        batch_size=options["batch"],
        train_step=step,
    )


def node_loss_batches(options: dict[str, Any], ctx: Any) -> dict[tuple[int, ...], int]:
    """This rank's batch (its sample indices) at each node loss of the schedule -> the loss's
    index: the step function knows its batch, not its step. The order is the loop's: the
    loader's DistributedSampler at set_epoch(epoch), or the dealt order of workers/data.py
    (epochs counted from 1). A target that never comes fails the run's check (`fired`)."""
    from workers.data import rank_batches

    out = {}
    for i, k in options["nodes"]:
        if k["rank"] != ctx.rank:
            continue
        if options["loader"]:
            sampler: DistributedSampler[Any] = DistributedSampler(
                range(TRAIN), num_replicas=ctx.world_size, rank=ctx.rank, seed=ctx.seed
            )
            sampler.set_epoch(k["epoch"])
            order = list(sampler)
            batch = order[k["in_epoch"] * options["batch"] : (k["in_epoch"] + 1) * options["batch"]]
        else:
            batch = rank_batches(TRAIN, options["batch"], ctx.seed, k["epoch"], ctx.world_size, ctx.rank)[
                k["in_epoch"]
            ]
        out[tuple(batch)] = i
    return out


def run_ours(
    workdir: Path, cfg: dict[str, Any], mode: str, kills: list[dict[str, Any]], losses: NodeLosses
) -> list[float | None]:
    """One `orchestrator run` on the cluster; returns the times of its failures, in the
    schedule's order (SIGKILLs by its chaos kills, node losses by the bench)."""
    sigkills = [k for k in kills if k["kind"] == "kill"]
    spec = {
        "name": "bench-goodput",
        "storage": {"root": str(workdir / "ours-storage")},
        "task": {
            "name": f"{ROOT / 'bench' / 'goodput.py'}:build",
            "options": {
                "width": cfg["width"],
                "batch": cfg["batch"],
                "workdir": str(workdir),
                "loader": mode != "replicas",
                "nodes": [(i, k) for i, k in enumerate(kills) if k["kind"] == "node"],
            },
        },
        "scaling": {"num_workers": cfg["world"]},
        "checkpoint": {
            "monitor": "val_loss",
            "mode": "min",
            "top_k": 1,
            "keep_latest": 1,
            "every_n_steps": "auto" if mode == "auto" else cfg["every"],
        },
        "epochs": cfg["epochs"],
        "seed": cfg["seed"],
        "failure": {"max_failures": len(kills) + 1, "mode": "replicas" if mode == "replicas" else "restart"},
        "chaos": {
            "kills": [{"rank": k["rank"], "epoch": k["epoch"], "step": k["in_epoch"]} for k in sigkills]
        },
    }
    path = workdir / "spec.json"  # JSON is YAML
    path.write_text(json.dumps(spec))
    run = [
        sys.executable,
        "-m",
        "orchestrator",
        "run",
        str(path),
        "--address",
        losses.cluster.address,
        "--json",
    ]
    _supervise(run, losses.cluster.env, losses, "orchestrator run")
    events = (workdir / "ours-storage" / "bench-goodput" / "events.jsonl").read_text().splitlines()
    fired = {e["key"]: e["ts"] for e in map(json.loads, events) if e["kind"] == "chaos_kill"}
    chosen = [e for e in map(json.loads, events) if e["kind"] == "cadence"]  # every_n_steps: auto
    (workdir / "cadence.json").write_text(json.dumps(chosen))
    chaos = iter(f"kill-{j}" for j in range(len(sigkills)))  # the chaos kills' keys, in order
    return [
        fired.get(next(chaos)) if k["kind"] == "kill" else _fired(workdir, i, "node")
        for i, k in enumerate(kills)
    ]


def _fired(workdir: Path, i: int, kind: str) -> float | None:
    """When failure i (a SIGKILL or a node loss) came, from the mark the victim wrote."""
    mark = workdir / f"{kind}-{i}.json"
    return json.loads(mark.read_text())["t"] if mark.exists() else None


class NodeLosses:
    """The bench's side of a node loss: a worker asks (Marks.fail writes node-<i>.json and
    waits); `check` SIGKILLs that node's raylet and processes (LocalCluster.kill_node) and adds
    a replacement node of the same size at once, as a cluster's autoscaler or Kubernetes would,
    on every side alike. It runs in the bench's main thread: a Ray node installs signal
    handlers as it starts, which only the main thread may do."""

    def __init__(self, cluster: Any, workdir: Path) -> None:
        self.cluster, self.workdir = cluster, workdir
        self.done: set[int] = set()

    def check(self) -> None:
        for mark in self.workdir.glob("node-*.json"):
            i = int(mark.name.split("-")[1].split(".")[0])
            if i in self.done:
                continue
            self.done.add(i)
            t0, note = time.time(), ""
            try:
                self.cluster.kill_node(self.cluster.name_of(json.loads(mark.read_text())["node"]))
            except AssertionError as e:  # a process outlived its raylet by 30 s; kill_node killed it
                note = str(e)
            t1 = time.time()
            self.cluster.add_node()
            times = {"lost_s": t1 - t0, "replaced_s": time.time() - t1, "note": note}
            (self.workdir / f"lost-{i}.json").write_text(json.dumps(times))


def _supervise(cmd: list[str], env: dict[str, str], losses: NodeLosses, what: str) -> None:
    """Run one side's driver process to its end, losing nodes as its workers ask."""
    log = losses.workdir / "driver.log"
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=out)
        deadline = time.time() + 900
        try:
            while p.poll() is None and time.time() < deadline:
                losses.check()
                time.sleep(0.02)
        finally:  # on an error here too: the side's driver never outlives its run
            if p.poll() is None:
                p.kill()
    if p.wait() != 0:
        raise RuntimeError(f"{what} exited {p.returncode}: {log.read_text()[-3000:]}")


def _bare_ray(
    workdir: Path, side: str, cfg: dict[str, Any], kills: list[dict[str, Any]], losses: NodeLosses
) -> None:
    """Bare Ray Train's driver as a user runs it: its own process, joined to the cluster."""
    tuned = side == "ray_tuned"
    config = {**cfg, "workdir": str(workdir), "kills": kills, "async_upload": tuned, "tuned": tuned}
    (workdir / "ray-side.json").write_text(json.dumps(config))
    c = losses.cluster
    cmd = [sys.executable, "-m", "bench.goodput", "--ray-driver", str(workdir / "ray-side.json"), c.address]
    _supervise(cmd, c.env, losses, "bare Ray Train's driver")


def run_side(side: str, cfg: dict[str, Any], kills: list[dict[str, Any]]) -> dict[str, Any]:
    """One run of one side (`kills` empty: failure-free) on a fresh local cluster (a head for
    the drivers and controllers, one 1-CPU node a worker); what its marks say."""
    from harness.cluster import local_cluster

    with (
        tempfile.TemporaryDirectory(prefix=f"bench-goodput-{side}-", ignore_cleanup_errors=True) as tmp,
        local_cluster(workers=cfg["world"], head_num_cpus=0) as cluster,
    ):
        workdir = Path(tmp)
        t0 = time.time()
        losses = NodeLosses(cluster, workdir)
        if side in ("ray", "ray_tuned"):
            _bare_ray(workdir, side, cfg, kills, losses)
            kill_ts = [_fired(workdir, i, k["kind"]) for i, k in enumerate(kills)]
        else:
            kill_ts = run_ours(workdir, cfg, side, kills, losses)
        end_to_end = time.time() - t0
        steps = {r: read_steps(workdir / f"steps-{r}.txt") for r in range(cfg["world"])}
        starts = {r: read_starts(workdir / f"marks-{r}.jsonl") for r in range(cfg["world"])}
        cadence = (
            json.loads((workdir / "cadence.json").read_text()) if (workdir / "cadence.json").exists() else []
        )
    if None in kill_ts:
        raise RuntimeError(f"{side}: failures {[i for i, t in enumerate(kill_ts) if t is None]} never came")
    out = analyse(
        steps,
        starts,
        [(float(t or 0), k["rank"]) for t, k in zip(kill_ts, kills, strict=True)],
        cfg["epochs"] * TRAIN // (cfg["world"] * cfg["batch"]),
    )
    return {"end_to_end_s": end_to_end, **out, "cadence": cadence}


def read_steps(path: Path) -> list[tuple[float, int, list[int]]]:
    out = []
    for line in path.read_text().splitlines():
        t, pid, idx = line.split()
        out.append((float(t), int(pid), [int(i) for i in idx.split(",")]))
    return out


def read_starts(path: Path) -> list[float]:
    return [json.loads(line)["t"] for line in path.read_text().splitlines()]


# -- the arithmetic -----------------------------------------------------------------------
def analyse(
    steps: dict[int, list[tuple[float, int, list[int]]]],
    starts: dict[int, list[float]],
    kills: list[tuple[float, int]],
    job_steps: int,
) -> dict[str, Any]:
    """One run's figures from its marks. `steps`: per rank, (start time, pid, sample indices)
    of every step in the order written; `starts`: per rank, when its function started;
    `kills`: (time, rank) of each kill, in order; `job_steps`: the job's steps."""
    every = sorted(t for rows in steps.values() for t, _, _ in rows)
    rank0 = steps[0]
    # A step's time: the gaps between one process's consecutive steps on rank 0.
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(rank0) if a[1] == b[1]]
    failures = []
    for i, (kill, victim) in enumerate(kills):
        until = kills[i + 1][0] if i + 1 < len(kills) else float("inf")
        restart = next((t for t in starts[victim] if t > kill), None)
        resumed = None if restart is None else next((t for t, _, _ in steps[victim] if t > restart), None)
        stood, _ = stood_still(every, kill, until)
        others = [t for r, rows in steps.items() if r != victim for t, _, _ in rows]
        failures.append(
            {
                "rank": victim,
                "restart_s": None if restart is None else restart - kill,
                "restore_s": None if restart is None or resumed is None else resumed - restart,
                "stood_still_s": stood,
                # steps the other ranks started while the victim was away (replicas keep training)
                "degraded_steps": sum(kill < t < (resumed or until) for t in others),
            }
        )
    return {
        "wall_s": every[-1] - every[0],
        "step_s": statistics.median(gaps) if gaps else 0.0,
        "steps_rank0": len(rank0),
        "redone_steps": max(0, len(rank0) - job_steps),
        "failures": failures,
        "samples": dict(Counter(i for rows in steps.values() for _, _, idx in rows for i in idx)),
    }


def skipped(clean: dict[Any, int], failed: dict[Any, int]) -> int:
    """Samples trained fewer times than in the failure-free run (a redone step trains its own
    samples again; it does not make up for others)."""
    return sum(max(0, n - failed.get(i, 0)) for i, n in clean.items())


def split(clean: dict[str, Any], failed: dict[str, Any], ref_clean_s: float) -> dict[str, float]:
    """Where a side's time lost went: `clean`/`failed` are its two runs' analyses, `ref_clean_s`
    tuned bare Ray's failure-free wall."""
    fs = failed["failures"]
    lost = failed["wall_s"] - ref_clean_s
    overhead = clean["wall_s"] - ref_clean_s
    stood = sum(f["stood_still_s"] for f in fs)
    redone = failed["redone_steps"] * clean["step_s"]
    return {
        "wall_s": failed["wall_s"],
        "clean_s": clean["wall_s"],
        "goodput": ref_clean_s / failed["wall_s"],
        "lost_s": lost,
        "overhead_s": overhead,
        "stood_still_s": stood,
        "restart_s": sum(f["restart_s"] or 0.0 for f in fs),
        "restore_s": sum(f["restore_s"] or 0.0 for f in fs),
        "redone_steps": failed["redone_steps"],
        "redone_s": redone,
        "other_s": lost - overhead - stood - redone,
        "degraded_steps": sum(f["degraded_steps"] for f in fs),
        "samples_skipped": skipped(clean["samples"], failed["samples"]),
        "step_s": clean["step_s"],
    }


# -- the sitting ----------------------------------------------------------------------------
def run(cfg: dict[str, Any], say: Any = print, sides: tuple[str, ...] = SIDES) -> dict[str, Any]:
    per_epoch = TRAIN // (cfg["world"] * cfg["batch"])
    steps = cfg["epochs"] * per_epoch
    kills = schedule(cfg["seed"], steps, per_epoch, cfg["failures"], cfg["world"], cfg.get("node_losses", 0))
    say(f"goodput: {steps} steps, {described(kills)}")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s: {"clean": [], "failed": []} for s in sides}
    not_run: dict[str, str] = {}
    for r in range(cfg["rounds"]):
        for kind, sched in (("clean", []), ("failed", kills)):
            for side in sides:  # interleaved
                if side in not_run:
                    continue
                try:
                    runs[side][kind].append(run_side(side, cfg, sched))
                except Exception as e:  # a side that cannot run the job is reported, not faked
                    not_run[side] = f"{type(e).__name__}: {str(e)[-400:]}"
                    say(f"goodput {side} {kind}: not run ({not_run[side]})")
                    continue
                x = runs[side][kind][-1]
                say(
                    f"goodput {side} {kind} round {r + 1}: wall {x['wall_s']:.1f}s, "
                    f"{x['redone_steps']} steps redone, step {x['step_s'] * 1e3:.0f} ms"
                )
    return summarize(runs, not_run, kills, cfg, steps)


def _median_run(xs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(xs, key=lambda x: x["wall_s"])[len(xs) // 2]


def summarize(
    runs: dict[str, Any],
    not_run: dict[str, str],
    kills: list[dict[str, int]],
    cfg: dict[str, Any],
    steps: int,
) -> dict[str, Any]:
    ok = {s: r for s, r in runs.items() if s not in not_run and r["clean"] and r["failed"]}
    if "ray_tuned" not in ok:
        return {
            "config": cfg,
            "kills": kills,
            "steps": steps,
            "not_run": not_run,
            "sides": {},
            "ratios": dict.fromkeys(KEYS),
            "runs": runs,
        }
    ref = _median_run(ok["ray_tuned"]["clean"])["wall_s"]
    sides = {s: split(_median_run(r["clean"]), _median_run(r["failed"]), ref) for s, r in ok.items()}
    ratios: dict[str, float | None] = {
        f"goodput_{s}": sides[s]["goodput"] if s in sides else None for s in SIDES
    }
    ours = [s for s in ("restart", "replicas", "auto") if s in sides]
    best: str | None = min(ours, key=lambda s: sides[s]["lost_s"]) if ours else None
    for key, base in (("lost_vs_ray_tuned", "ray_tuned"), ("lost_vs_ray", "ray")):
        ratios[key] = None  # also where the baseline lost nothing: the noise outweighed the failures
        if best is not None and base in sides and sides[base]["lost_s"] > 0:
            ratios[key] = sides[best]["lost_s"] / sides[base]["lost_s"]
    ratios["clean_vs_ray_tuned"] = sides["restart"]["clean_s"] / ref if "restart" in sides else None
    ratios["auto_clean_vs_restart"] = (
        sides["auto"]["clean_s"] / sides["restart"]["clean_s"]
        if {"auto", "restart"} <= sides.keys()
        else None
    )
    ratios["auto_redone_per_failure"] = (
        sides["auto"]["redone_steps"] / len(kills) if "auto" in sides and kills else None
    )
    ratios["step_time_replicas_vs_restart"] = (
        sides["replicas"]["step_s"] / sides["restart"]["step_s"]
        if {"replicas", "restart"} <= sides.keys()
        else None
    )
    # Recovery alone, two workers on every side, the same kills, the poll matched: how long
    # training stood still, ours over tuned bare Ray's (docs/benchmarks.md leads with these).
    beside: dict[str, float] = {}
    if "ray_tuned" in sides:
        by_rank = {
            r: sum(
                f["stood_still_s"]
                for f in _median_run(ok["ray_tuned"]["failed"])["failures"]
                if f["rank"] == r
            )
            for r in range(cfg["world"])
        }
        for s in ours:
            fs = _median_run(ok[s]["failed"])["failures"]
            stood = sides[s]["stood_still_s"] / sides["ray_tuned"]["stood_still_s"]
            beside[f"stood_still_{s}_vs_ray_tuned"] = stood
            for r in range(cfg["world"]) if s == "replicas" else ():
                if by_rank[r] > 0:
                    beside[f"replicas_rank{r}_stood_vs_ray_tuned"] = (
                        sum(f["stood_still_s"] for f in fs if f["rank"] == r) / by_rank[r]
                    )
    for side in runs:  # the per-sample counts served their purpose
        for kind in runs[side].values():
            for x in kind:
                x.pop("samples", None)
    return {
        "config": cfg,
        "kills": kills,
        "steps": steps,
        "best_of_ours": best,
        "not_run": not_run,
        "sides": sides,
        "ratios": {k: None if v is None else round(v, 3) for k, v in ratios.items()},
        "ratios_beside": {k: round(v, 3) for k, v in beside.items()},
        "runs": runs,
    }


LABELS = {
    "ray": "bare Ray Train, defaults (2 s poll, SYNC upload)",
    "ray_tuned": "bare Ray Train, tuned (0.25 s poll, ASYNC upload)",
    "restart": "this project, failure.mode restart",
    "replicas": "this project, failure.mode replicas (indexable dataset)",
    "auto": "this project, failure.mode restart, checkpoint.every_n_steps: auto",
}


def cadence_line(g: dict[str, Any]) -> list[str]:
    """What every_n_steps: auto chose in its failure-free run, and the overhead it measured."""
    runs = g.get("runs", {}).get("auto", {}).get("clean", [])
    chosen = [c for c in (runs[0].get("cadence", []) if runs else []) if c.get("bound") != "first"]
    if not chosen:
        return []
    c = chosen[-1]
    per = c["stall_ms"] / c["every_n_steps"] / c["step_ms"] if c["step_ms"] else 0.0
    return [
        "",
        f"`every_n_steps: auto` chose a save every {c['every_n_steps']} steps ({c['bound']} bound: "
        f"a save stalled the step {c['stall_ms']:.1f} ms, the writer drained one in {c['drain_ms']:.0f} ms, "
        f"a step took {c['step_ms']:.1f} ms): {per:.2%} of step time against its {c['budget']:.0%} budget; "
        f"{len(chosen)} choice(s) in the run.",
    ]


def table(g: dict[str, Any]) -> str:
    """The markdown docs/benchmarks.md shows."""
    c, kills = g["config"], g["kills"]
    lines = [
        f"{g['steps']} steps on {c['world']} workers, a save every {c['every']} steps, "
        f"{described(kills)}; {c['rounds']} round(s), medians.",
        "",
        "| side | goodput | wall with failures, s | failure-free, s | time lost, s | per-step overhead, s "
        "| stood still, s (detection+restart / restore) | steps redone (s) | other, s "
        "| steps with a rank missing | samples skipped | step, ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side, label in LABELS.items():
        if side in g.get("not_run", {}):
            lines.append(f"| {label} | not run: {g['not_run'][side][:200]} |" + " |" * 10)
            continue
        if (x := g["sides"].get(side)) is None:
            continue
        lines.append(
            f"| {label} | {x['goodput']:.3f} | {x['wall_s']:.1f} | {x['clean_s']:.1f} | {x['lost_s']:.1f} | "
            f"{x['overhead_s']:.1f} | {x['stood_still_s']:.1f} ({x['restart_s']:.1f} / {x['restore_s']:.1f}) "
            f"| {x['redone_steps']} ({x['redone_s']:.1f}) | {x['other_s']:.1f} | {x['degraded_steps']} "
            f"| {x['samples_skipped']} | {x['step_s'] * 1e3:.0f} |"
        )
    lines += cadence_line(g)
    if any(x["lost_s"] <= 0 for x in g["sides"].values()):
        lines += [
            "",
            "A time lost <= 0: that side's run with failures was faster than the reference's "
            "without; the machine's noise outweighed the failures (a ratio over it is not given).",
        ]
    lines += ["", "| goodput ratio | value |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in g["ratios"].items()]
    lines += [f"| `{k}` (beside) | {v} |" for k, v in g.get("ratios_beside", {}).items()]
    return "\n".join(lines)


def _ray_driver(config_path: str, address: str) -> None:
    """`python -m bench.goodput --ray-driver CONFIG ADDRESS`: bare Ray Train's side, run by
    run_side in its own process, as a user's script joins a cluster."""
    cfg = json.loads(Path(config_path).read_text())
    workdir = Path(cfg["workdir"])
    poll = 0.25 if cfg["tuned"] else None
    ray_fit(ray_train, cfg, workdir, "bench-goodput", cfg["world"], max(len(cfg["kills"]), 1), poll, address)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--ray-driver"]:
        sys.exit("usage: python -m bench.goodput --ray-driver CONFIG ADDRESS (python -m bench runs it)")
    _ray_driver(sys.argv[2], sys.argv[3])

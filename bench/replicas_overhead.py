"""What failure.mode replicas costs a training step, failure-free, against failure.mode restart
(docs/benchmarks.md, "What replicas mode costs a step").

    python -m bench.replicas_overhead                        # both models, 3 rounds each
    python -m bench.replicas_overhead --model mlp --rounds 5 --json out.json

Two jobs, each run by `orchestrator run` on 2 workers in both modes, without faults, the modes
interleaved round by round in one sitting:

    mlp   goodput's job (bench/goodput.py): digits upscaled to 2048 features, an MLP of three
          2048-wide layers with Adam (12.6M parameters), batches of 32, a save every 12 steps;
          restart mode reads a DataLoader, replicas the same samples indexable (they refuse a
          DataLoader); 3 epochs of 24 steps
    cnn   the built-in digits task (its small CNN, SGD, batches of 32, a save every epoch) with
          a mark per step; 15 epochs of 22 steps

Every worker appends the time of each step's start; a step's time is the gap between two
consecutive steps of rank 0 (one process). `step_ms` is the median gap (the steps of an
epoch); `mean_ms` the first step's start to the last's over the steps (an epoch's end, its
evaluation and save included). The ratio is replicas over restart, per round and the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import goodput
from bench.recovery import _orchestrator_run

MLP = {**goodput.QUICK, "epochs": 3}
CNN_EPOCHS = 15


def build_cnn(options: dict[str, Any], ctx: Any) -> Any:
    """The built-in digits task, each step marked (time and pid) in the run's workdir."""
    from workers.tasks.digits import build

    task = build({}, ctx)
    marks = open(os.path.join(options["workdir"], f"steps-{ctx.rank}.txt"), "a", buffering=1)  # noqa: SIM115
    inner = task.train_step

    def step(model: Any, batch: Any) -> Any:
        marks.write(f"{time.time():.6f} {os.getpid()}\n")
        return inner(model, batch)

    return replace(task, train_step=step)


def run_cnn(mode: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"bench-overhead-{mode}-") as tmp:
        workdir = Path(tmp)
        spec = {
            "name": "overhead",
            "storage": {"root": str(workdir / "storage")},
            "task": {
                "name": f"{Path(__file__).resolve()}:build_cnn",
                "options": {"workdir": tmp},
            },
            "scaling": {"num_workers": 2},
            "checkpoint": {"monitor": "val_loss", "mode": "min", "top_k": 1, "keep_latest": 1},
            "epochs": CNN_EPOCHS,
            "seed": 0,
            "failure": {"mode": mode},
        }
        (workdir / "spec.json").write_text(json.dumps(spec))
        _orchestrator_run(workdir / "spec.json")
        rows = [line.split() for line in (workdir / "steps-0.txt").read_text().splitlines()]
    return figures([(float(t), int(pid)) for t, pid in rows])


def run_mlp(mode: str) -> dict[str, float]:
    out = goodput.run_side(mode, MLP, [])
    return {"step_ms": out["step_s"] * 1e3, "mean_ms": out["wall_s"] / max(1, out["steps_rank0"] - 1) * 1e3}


def figures(rows: list[tuple[float, int]]) -> dict[str, float]:
    gaps = [b[0] - a[0] for a, b in zip(rows, rows[1:], strict=False) if a[1] == b[1]]
    return {"step_ms": statistics.median(gaps) * 1e3, "mean_ms": (rows[-1][0] - rows[0][0]) / len(gaps) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["mlp", "cnn", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="restart,replicas", help="one alone: its figures, no ratio")
    ap.add_argument("--json", default=None)
    ap.add_argument("--micro", action="store_true", help="the gradient averaging alone, in 2 processes")
    args = ap.parse_args()
    if args.micro:
        print(json.dumps(micro(), indent=1))
        return
    models = ["mlp", "cnn"] if args.model == "both" else [args.model]
    modes = args.modes.split(",")
    runs: dict[str, dict[str, list[dict[str, float]]]] = {m: {mode: [] for mode in modes} for m in models}
    for r in range(args.rounds):
        for m in models:
            for mode in modes:  # interleaved
                x = (run_mlp if m == "mlp" else run_cnn)(mode)
                runs[m][mode].append(x)
                print(
                    f"{m} {mode} round {r + 1}: step {x['step_ms']:.1f} ms, mean {x['mean_ms']:.1f} ms",
                    flush=True,
                )
    out: dict[str, Any] = {"load_average": os.getloadavg(), "runs": runs, "ratios": {}}
    for m in models if len(modes) == 2 else ():
        for key in ("step_ms", "mean_ms"):
            pairs = [a[key] / b[key] for a, b in zip(runs[m]["replicas"], runs[m]["restart"], strict=True)]
            out["ratios"][f"{m}_{key}_replicas_vs_restart"] = {
                "median": round(statistics.median(pairs), 3),
                "each": [round(p, 3) for p in pairs],
                "restart_median": round(statistics.median(x[key] for x in runs[m]["restart"]), 1),
                "replicas_median": round(statistics.median(x[key] for x in runs[m]["replicas"]), 1),
            }
    print(json.dumps(out["ratios"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


# -- the mechanism alone, in one pair of processes ------------------------------------------
MICRO_STEPS = 30


class _DistWork:
    def __init__(self, work: Any, t: Any, world: int) -> None:
        self.work, self.t, self.world = work, t, world

    def wait(self) -> bool:
        self.work.wait()
        self.t /= self.world  # Manager.allreduce's average
        return True


class _DistManager:
    """torch.distributed's gloo in the shape of the torchft Manager calls GradBuckets makes."""

    def __init__(self, world: int) -> None:
        self.world = world

    def allreduce(self, t: Any) -> _DistWork:
        import torch.distributed as dist

        return _DistWork(dist.all_reduce(t, async_op=True), t, self.world)

    def errored(self) -> None:
        return None

    def num_participants(self) -> int:
        return self.world


def _micro_worker(rank: int, world: int, store: str, out: str) -> None:
    """Four ways to average an MLP step's gradients, step by step in turn (A B C D A B C D ...,
    so the machine's load hits each alike): DDP (restart mode), one flat all-reduce after
    backward plus the word's own (replicas mode before), buckets overlapped with backward and
    the word on the last (now), and the same buckets with the word apart. Rank 0 writes every
    step's time."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from bench.recovery import make
    from workers.replica_grads import GradBuckets
    from workers.replicas import WORD

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    (m_flat, o_flat), (m_ddp, o_ddp) = make(2048), make(2048)
    ddp = nn.parallel.DistributedDataParallel(m_ddp)
    buckets = GradBuckets(m_flat, _DistManager(world), WORD)
    x, y = torch.randn(32, 2048), torch.randint(0, 10, (32,))

    def flat() -> None:
        word = torch.zeros(WORD, dtype=torch.float64)
        dist.all_reduce(word)
        nn.functional.cross_entropy(m_flat(x), y).backward()
        grads = [p.grad for p in m_flat.parameters() if p.grad is not None]
        t = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(t)
        t /= world
        offset = 0
        for g in grads:
            g.copy_(t[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        o_flat.step()

    def bucketed() -> None:
        buckets.reduce(nn.functional.cross_entropy(m_flat(x), y), [0.0] * WORD)
        o_flat.step()

    def word_apart() -> None:  # the buckets, the word in an all-reduce of its own
        dist.all_reduce(torch.zeros(WORD, dtype=torch.float64))
        buckets.reduce(nn.functional.cross_entropy(m_flat(x), y), None)
        o_flat.step()

    def restart() -> None:
        nn.functional.cross_entropy(ddp(x), y).backward()
        o_ddp.step()

    ways = {
        "restart_ddp": (restart, o_ddp),
        "replicas_flat": (flat, o_flat),
        "replicas_buckets": (bucketed, o_flat),
        "replicas_buckets_word_apart": (word_apart, o_flat),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for i in range(MICRO_STEPS + 3):
        for name, (fn, opt) in ways.items():
            opt.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if i >= 3:  # warm-up steps not counted
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def micro() -> dict[str, Any]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bench-overhead-micro-") as tmp:
        out = os.path.join(tmp, "times.json")
        mp.spawn(_micro_worker, args=(2, os.path.join(tmp, "store"), out), nprocs=2)
        times = json.loads(Path(out).read_text())
    ms = {k: round(statistics.median(v) * 1e3, 1) for k, v in times.items()}
    return {
        "step_ms": ms,
        "flat_vs_restart": round(ms["replicas_flat"] / ms["restart_ddp"], 3),
        "buckets_vs_restart": round(ms["replicas_buckets"] / ms["restart_ddp"], 3),
        "buckets_word_apart_vs_restart": round(ms["replicas_buckets_word_apart"] / ms["restart_ddp"], 3),
        "load_average": os.getloadavg(),
    }


if __name__ == "__main__":
    main()

"""How much checkpointing slows training: no checkpoints vs synchronous vs background saves.

    python bench/checkpoint_overhead.py                  # defaults: ~21M-param MLP + Adam, local disk
    python bench/checkpoint_overhead.py --uri memory://bench --json

All three variants train the same model on the same batches in this one process,
interleaved over --repeats rounds, and save through the project's own CheckpointWriter
into real storage (a temp dir by default). Reported: seconds per step, the ratio to
the no-checkpoint baseline, and how long the training thread was blocked per save.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from torch import nn

from orchestrator.core.storage import Storage
from workers.writer import CheckpointWriter


def make(width: int, depth: int, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def train(mode: str, args: argparse.Namespace, uri: str) -> dict[str, float]:
    model, opt = make(args.width, args.depth)
    x = torch.randn(args.batch, args.width)
    y = torch.randint(0, 10, (args.batch,))
    commits = []
    writer = None
    if mode != "none":
        writer = CheckpointWriter(Storage(uri), commit=commits.append, async_save=(mode == "async"))
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if writer is not None and step % args.every == 0:
            meta = {
                "id": f"{mode}-{step}",
                "epoch": 1,
                "step_in_epoch": step,
                "global_step": step,
                "end_of_epoch": False,
                "world_size": 1,
                "attempt": 1,
            }
            writer.save(
                meta, {"model.pt": model.state_dict(), "train_state.pt": {"optimizer": opt.state_dict()}}
            )
    train_s = time.perf_counter() - t0
    if writer is not None:
        writer.close()  # the last upload finishes outside the timed loop, as at the end of a run
    saves = len(commits)
    return {
        "s_per_step": train_s / args.steps,
        "blocked_s_per_save": (writer.blocked_s / saves) if writer and saves else 0.0,
        "saves": saves,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10, help="Save every n steps.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--uri", default=None, help="Storage to save into (default: a temp dir).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as each training worker runs; the writer thread gets the other core

    with tempfile.TemporaryDirectory() as tmp:
        uri = args.uri or tmp
        results: dict[str, list[dict[str, float]]] = {"none": [], "sync": [], "async": []}
        for r in range(args.repeats):
            for mode in results:  # interleaved, so drift in machine load hits all three alike
                results[mode].append(train(mode, args, f"{uri}/r{r}-{mode}"))
                if not args.json:
                    print(
                        f"round {r + 1} {mode:>5}: {results[mode][-1]['s_per_step'] * 1e3:.1f} ms/step",
                        flush=True,
                    )

    params = sum(p.numel() for p in make(args.width, args.depth)[0].parameters())
    med = {m: statistics.median(x["s_per_step"] for x in rs) for m, rs in results.items()}
    report = {
        "params": params,
        "checkpoint_mb": round(params * 4 * 3 / 2**20, 1),  # weights + Adam's two moments, fp32
        "save_every_steps": args.every,
        "ms_per_step": {m: round(v * 1e3, 2) for m, v in med.items()},
        "ratio_to_no_checkpoint": {m: round(v / med["none"], 3) for m, v in med.items()},
        "blocked_ms_per_save": {
            m: round(statistics.median(x["blocked_s_per_save"] for x in rs) * 1e3, 1)
            for m, rs in results.items()
            if m != "none"
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

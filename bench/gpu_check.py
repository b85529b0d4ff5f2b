"""What a checkpoint costs a training step on a GPU, and whether a restore to the GPU is exact.

    python bench/gpu_check.py [--params-m 64] [--repeats 5] [--json PATH]

Needs only torch and a CUDA device (a GPU machine may lack Ray and the control plane's
packages, so this imports nothing but `workers.host_buffers`, the module a worker uses
for the same copy). It checks, on one process group of every visible GPU:

1. DDP on `cuda` (NCCL) trains: the loss falls over the first steps.
2. The training thread's stall per checkpoint, three ways, each the median of
   `--repeats` saves of the model's and Adam's state:
   - `.cpu()` of every tensor, what a plain `torch.save(model.state_dict())` path pays;
   - a blocking copy into reused pinned buffers;
   - the project's copy (`HostBuffers`): `non_blocking` into reused pinned buffers, the
     thread returns once the copies are queued; also the time until they have landed.
3. The step time around a save: steps with a save every N steps (the copy, then a
   background thread that serializes the host copy, one save in flight) against steps
   with none, interleaved round by round.
4. A restore to the GPU is bitwise equal: the saved bytes, loaded with
   `weights_only=True` to host memory and put into a fresh model and optimizer on `cuda`
   (as a resuming worker does), equal the live state tensor for tensor, and the next
   steps from the restored and the original state give the same losses.
5. The RNG streams a checkpoint holds (`workers.rng`, CPU and CUDA) come back on a GPU
   machine, so the next random draws equal those after the save.

Prints a table and writes the figures as JSON (`--json`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.host_buffers import HostBuffers  # noqa: E402
from workers.rng import capture_rng, restore_rng  # noqa: E402


def mlp(params_m: int, width: int = 4096) -> nn.Module:
    per_layer = width * width + width
    layers = max(1, round(params_m * 1_000_000 / per_layer))
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods[:-1])


def state_of(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    inner = model.module if isinstance(model, DDP) else model
    return {"model": inner.state_dict(), "optim": opt.state_dict()}


def tensors(tree: Any) -> list[torch.Tensor]:
    if torch.is_tensor(tree):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tensors(v)]
    return []


def nbytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(tree))


def timed(fn: Any) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def cpu_copy(tree: Any) -> Any:
    if torch.is_tensor(tree):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(cpu_copy(v) for v in tree)
    return tree


class PinnedBlocking:
    """Reused pinned buffers, copied with a blocking copy: the middle baseline."""

    def __init__(self) -> None:
        self.bufs: dict[int, torch.Tensor] = {}

    def copy(self, tree: Any) -> None:
        for i, t in enumerate(tensors(tree)):
            buf = self.bufs.get(i)
            if buf is None:
                buf = self.bufs[i] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buf.copy_(t)


def setup_group() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # one process: a group of one, still through NCCL
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    dist.init_process_group("nccl")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params-m", type=int, default=64, help="model size in millions of parameters")
    ap.add_argument("--repeats", type=int, default=5, help="saves timed per variant (median reported)")
    ap.add_argument(
        "--every",
        type=int,
        default=0,
        help="a save every this many steps (default: the fewest steps that take twice "
        "as long as serializing one checkpoint, the fastest cadence a writer keeps up with)",
    )
    ap.add_argument("--saves", type=int, default=4, help="saves per step-time round")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; run this on a machine with a GPU", file=sys.stderr)
        return 2

    rank, world, device = setup_group()
    torch.manual_seed(0)
    model = DDP(mlp(args.params_m).to(device), device_ids=[device.index])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    width = model.module[0].in_features
    gen = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randn(256, width, device=device, generator=gen) for _ in range(8)]
    targets = [torch.zeros(256, width, device=device) for _ in range(8)]  # learnable at any depth

    def step(i: int, m: nn.Module = model, o: torch.optim.Optimizer = opt) -> torch.Tensor:
        o.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(m(batches[i % 8]), targets[i % 8])
        loss.backward()
        o.step()
        return loss.detach()

    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device),
        "world_size": world,
        "torch": torch.__version__,
        "params_m": args.params_m,
    }

    # 1. DDP trains
    losses = [step(i).item() for i in range(10)]
    out["ddp_loss_first_last"] = [losses[0], losses[-1]]
    assert losses[-1] < losses[0], f"DDP on cuda did not train: {losses}"
    state = state_of(model, opt)
    mb = nbytes(state) / 2**20
    out["state_mb"] = round(mb, 1)

    # 2. stall per save
    host = HostBuffers()
    pinned = PinnedBlocking()
    host.copy(state)  # allocate the buffers once, as a run does
    host.wait()
    pinned.copy(state)
    rounds: dict[str, list[float]] = {
        "cpu": [],
        "pinned_blocking": [],
        "project_enqueue": [],
        "project_landed": [],
    }
    for _ in range(args.repeats):  # interleaved, so machine noise hits every variant alike
        rounds["cpu"].append(timed(lambda: cpu_copy(state)))
        rounds["pinned_blocking"].append(timed(lambda: pinned.copy(state)))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        host.copy(state)
        rounds["project_enqueue"].append((time.perf_counter() - t0) * 1000)
        host.wait()
        rounds["project_landed"].append((time.perf_counter() - t0) * 1000)
    stall = {k: statistics.median(v) for k, v in rounds.items()}
    out["stall_ms"] = {k: round(v, 3) for k, v in stall.items()}
    out["stall_ms_min_max"] = {k: [round(min(v), 3), round(max(v), 3)] for k, v in rounds.items()}
    out["stall_ms_per_mb"] = {k: round(v / mb, 5) for k, v in stall.items()}
    out["copy_gb_per_s"] = round(mb / 1024 / (stall["project_landed"] / 1000), 2)

    # 3. step time with a save every `every` steps vs none
    def serialize(tree: Any) -> None:
        host.wait()
        torch.save(tree, io.BytesIO())

    t0 = time.perf_counter()
    serialize(host.copy(state))
    out["serialize_ms"] = round((time.perf_counter() - t0) * 1000, 1)

    def ten_steps() -> None:
        for i in range(10):
            step(i)
        torch.cuda.synchronize()

    every = args.every or int(2 * out["serialize_ms"] / (timed(ten_steps) / 10)) + 1
    steps = every * args.saves
    out["save_every_steps"] = every

    def round_ms(save: bool) -> float:
        worker: threading.Thread | None = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
            if save and i % every == every - 1:
                if worker is not None:
                    worker.join()  # one save in flight, as in the writer
                tree = host.copy(state_of(model, opt))
                worker = threading.Thread(target=serialize, args=(tree,))
                worker.start()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1000 / steps
        if worker is not None:
            worker.join()
        return ms

    plain, saving = [], []
    for _ in range(args.repeats):
        plain.append(round_ms(False))
        saving.append(round_ms(True))
    out["step_ms_no_ckpt"] = round(statistics.median(plain), 3)
    out["step_ms_with_ckpt"] = round(statistics.median(saving), 3)
    out["step_time_vs_no_ckpt"] = round(statistics.median(saving) / statistics.median(plain), 4)

    # 4. restore to the GPU, bitwise
    tree = host.copy(state_of(model, opt))  # the project's path: pinned copy, wait, serialize
    host.wait()
    buf = io.BytesIO()
    torch.save(tree, buf)
    buf.seek(0)
    loaded = torch.load(buf, map_location="cpu", weights_only=True)  # as workers/resume.py does
    torch.manual_seed(0)
    model2 = DDP(mlp(args.params_m).to(device), device_ids=[device.index])
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-4)
    model2.module.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optim"])
    live, back = tensors(state_of(model, opt)), tensors(state_of(model2, opt2))
    out["restore_tensors"] = len(live)
    out["restore_bitwise_equal"] = len(live) == len(back) and all(
        a.device == b.device and torch.equal(a, b) for a, b in zip(live, back, strict=True)
    )
    torch.backends.cudnn.deterministic = True
    nxt = [step(100 + i).item() for i in range(3)]
    nxt2 = [step(100 + i, model2, opt2).item() for i in range(3)]
    out["next_losses_equal"] = nxt == nxt2

    # 5. the RNG streams a checkpoint holds, put back on a GPU machine
    rng_file = io.BytesIO()
    torch.save(capture_rng(), rng_file)
    expect = torch.randn(4, device=device)

    def load_rng(where: Any) -> Any:
        rng_file.seek(0)
        return torch.load(rng_file, map_location=where, weights_only=True)

    restore_rng(load_rng("cpu"))
    out["rng_restore_equal"] = torch.equal(expect, torch.randn(4, device=device))
    try:  # what a cuda map_location for the state file did before
        restore_rng(load_rng(device))
        out["rng_restore_with_cuda_map_location"] = "ok"
    except Exception as e:  # noqa: BLE001 - reported, not raised
        out["rng_restore_with_cuda_map_location"] = f"{type(e).__name__}: {e}"[:200]

    if rank == 0:
        print(
            f"device {out['device']} x{world}, torch {out['torch']}, state {out['state_mb']} MB "
            f"({args.params_m}M params + Adam)"
        )
        print(f"DDP loss {losses[0]:.4f} -> {losses[-1]:.4f} over 10 steps")
        print(f"{'stall per save':32} {'median ms':>10} {'ms/MB':>9} {'min..max ms':>18}")
        for k, v in stall.items():
            lo, hi = out["stall_ms_min_max"][k]
            print(f"{k:32} {v:10.2f} {v / mb:9.4f} {lo:8.2f}..{hi:8.2f}")
        print(f"device-to-host copy {out['copy_gb_per_s']} GB/s into pinned buffers")
        print(f"serializing one checkpoint (torch.save of the host copy): {out['serialize_ms']} ms")
        print(
            f"step {out['step_ms_no_ckpt']} ms without saves, {out['step_ms_with_ckpt']} ms with a save "
            f"every {every} steps: {out['step_time_vs_no_ckpt']}x"
        )
        print(
            f"restore to cuda: {out['restore_tensors']} tensors bitwise equal: "
            f"{out['restore_bitwise_equal']}; next 3 losses equal: {out['next_losses_equal']}"
        )
        print(
            f"RNG streams restored (state file loaded to cpu): {out['rng_restore_equal']}; "
            f"with map_location=cuda: {out['rng_restore_with_cuda_map_location']}"
        )
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    dist.destroy_process_group()
    return 0 if out["restore_bitwise_equal"] and out["rng_restore_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""What a checkpoint costs a training step on a GPU, whether a restore to the GPU is exact, and
whether failure.mode replicas heals exactly on a GPU.

    python bench/gpu_check.py [--params-m 64] [--repeats 5] [--json PATH]
    python bench/gpu_check.py --only replicas [--device cpu] [--heal pg]

Needs only torch and a CUDA device, and torchft for the replicas check (a GPU machine may
lack Ray and the control plane's packages, so this imports nothing of the project but
`workers.host_buffers`, `workers.rng` and `workers.replica_comms`, which need torch alone).
torchft's wheel is 2.4 MB; with what it imports (opentelemetry, protobuf, requests) 4.3 MB,
torch aside. To carry it to a GPU machine that has torch but no index, here:

    pip download 'torchft==0.2.0' opentelemetry-api opentelemetry-sdk \
        opentelemetry-exporter-otlp-proto-http --only-binary=:all: --python-version 3.11 -d wheels
    # (torchft's wheel is built per Python version: match the GPU machine's)

and there: `pip install --no-index --find-links wheels torchft` (pip skips torch when it is
installed). The checkpoint checks run on one process group of every visible GPU:

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
6. Replicas (`--only replicas`, also run by the default `--only all`): two torchft replica
   groups, two processes, with torchft's lighthouse started in this process, built as a
   worker builds them (`workers.replica_comms`: its process group, heal transport, timeouts
   and NCCL environment for the device). A few steps, replica 1 SIGKILLed mid-step, replica
   0 trains on alone while a replacement starts, the replacement heals from it, then both
   train 5 steps. Exact: the healed model and Adam equal, tensor for tensor, what the
   survivor held when it sent them, and both end at the same step with equal state. A word
   of CPU float64 goes through the Manager each step (on cuda: gloo, beside NCCL) and must
   come back as the quorum's sum. With two GPUs the replicas run on cuda:0 and cuda:1 over
   NCCL and heal device to device (torchft's PGTransport). NCCL refuses two ranks of one
   communicator on one GPU ("Duplicate GPU detected"), so with one GPU the project's NCCL
   group runs alone first (4 steps: the gradients over NCCL, the word over gloo), then the
   kill and heal run on that GPU over gloo with HTTP heals. `--device cpu` runs the check
   without a GPU (gloo, HTTP heals as on cpu; `--heal pg`: torchft's PGTransport over gloo).

Prints a table and writes the figures as JSON (`--json`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
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
    args = parse_args()
    if args.replica_worker:  # one replica group of the replicas check, in its own process
        return replica_worker(json.loads(args.replica_worker))
    status = 0
    if args.only in ("all", "checkpoint"):
        if args.device != "cuda":
            print(
                "gpu_check: the checkpoint checks need cuda; --only replicas --device cpu runs without",
                file=sys.stderr,
            )
            return 2
        status = checkpoint_checks(args)
    if args.only in ("all", "replicas") and status == 0 and os.environ.get("RANK", "0") == "0":
        status = replicas_check(args)
    return status


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--only", choices=("all", "checkpoint", "replicas"), default="all", help="which checks (default: all)"
    )
    ap.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="the replicas check on cpu (gloo, HTTP heals) runs without a GPU",
    )
    ap.add_argument(
        "--heal",
        choices=("auto", "http", "pg"),
        default="auto",
        help="the replicas check's heal transport: auto, as a worker picks it (cpu: http, cuda: pg); pg on "
        "cpu runs torchft's PGTransport over gloo",
    )
    ap.add_argument("--replica-worker", help=argparse.SUPPRESS)  # internal: one replica's process
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
    return ap.parse_args()


def checkpoint_checks(args: argparse.Namespace) -> int:
    """Checks 1-5 (the module's docstring)."""
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


# -- 6. replicas: two torchft replica groups, a kill and a heal ----------------------------

KILL_AFTER = 5  # the replica killed once it has committed this many steps
TAIL = 5  # steps both train after the heal, then compare


def replicas_check(args: argparse.Namespace) -> int:
    """Two replica groups (two processes) with torchft's lighthouse started here: a few steps,
    replica 1 SIGKILLed, its replacement heals from replica 0, then both train TAIL steps.
    Exact: the healed model and Adam equal, tensor for tensor, what the survivor held when it
    sent them, and both end with equal state. The process group, heal transport, timeouts and
    NCCL environment are the project's (workers.replica_comms), as a worker builds them."""
    os.environ.setdefault("RUST_LOG", "warn")  # the lighthouse logs every quorum at info (read at import)
    from torchft.coordination import LighthouseServer

    devices = ["cpu", "cpu"]
    one_gpu = False
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print(
                "gpu_check: no CUDA device visible; --device cpu runs the replicas check without one",
                file=sys.stderr,
            )
            return 2
        n = torch.cuda.device_count()
        devices, one_gpu = [f"cuda:{i % n}" for i in (0, 1)], n < 2
    out: dict[str, Any] = {"devices": devices, "torch": torch.__version__}
    lighthouse = LighthouseServer(
        bind="[::]:0", min_replicas=1, join_timeout_ms=1000, heartbeat_timeout_ms=1000
    )
    work = Path(tempfile.mkdtemp(prefix="gpu_check_replicas_"))
    base = {"lighthouse": lighthouse.address(), "dir": str(work), "timeout_s": 10.0, "quorum_timeout_s": 60.0}
    base["heal"] = args.heal
    procs: list[Replica] = []
    try:
        if one_gpu:
            # NCCL refuses two ranks of one communicator on one GPU ("Duplicate GPU detected"): the
            # project's NCCL group is checked by one replica alone (NCCL for the gradients, gloo for
            # the word), then the kill and heal run on the GPU over gloo with HTTP heals.
            solo = Replica({**base, "replica": 0, "device": devices[0], "role": "solo", "end_step": 4})
            procs.append(solo)
            out["nccl_alone"] = solo.wait(120) == 0 and "ended at step 4" in solo.text()
            out["nccl_alone_comms"] = solo.comms
            print(f"replicas: one GPU; the NCCL group alone ({solo.comms}), 4 steps: {out['nccl_alone']}")
            base = {**base, "comms": "gloo", "heal": "http"}
        out.update(kill_and_heal(base, devices, procs, work))
    except TimeoutError as e:
        out["error"] = str(e)
    finally:
        for r in procs:
            r.stop()
        lighthouse.shutdown()
    for key in (
        "error",
        "comms",
        "healed_at_step",
        "healed_tensors",
        "healed_bitwise_equal",
        "final_step",
        "final_bitwise_equal",
    ):
        if key in out:
            print(f"replicas: {key} {out[key]}")
    ok = bool(
        out.get("healed_bitwise_equal") and out.get("final_bitwise_equal") and out.get("nccl_alone", True)
    )
    if not ok:
        for r in procs:
            print(
                f"--- replica {r.cfg['replica']} ({r.cfg['role']}), last lines:\n" + "\n".join(r.lines[-30:])
            )
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.exists() and args.only == "all" else {}
        args.json.write_text(json.dumps({**old, "replicas": out}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def kill_and_heal(
    base: dict[str, Any], devices: list[str], procs: list[Replica], work: Path
) -> dict[str, Any]:
    a = Replica({**base, "replica": 0, "device": devices[0], "role": "first"})
    b = Replica({**base, "replica": 1, "device": devices[1], "role": "first"})
    procs += [a, b]
    b.until(lambda line: line.startswith(f"committed {KILL_AFTER}"), 120)
    os.kill(b.proc.pid, signal.SIGKILL)  # a real kill, mid-step
    b.wait(30)
    print(f"replicas: replica 1 SIGKILLed after it committed step {KILL_AFTER}")
    b2 = Replica({**base, "replica": 1, "device": devices[1], "role": "replacement"})
    procs.append(b2)
    deadline = time.monotonic() + 240
    codes = [a.wait(deadline - time.monotonic()), b2.wait(max(1.0, deadline - time.monotonic()))]
    return replica_results(work, a, b2, codes)


def replica_results(work: Path, a: Replica, b2: Replica, codes: list[int | None]) -> dict[str, Any]:
    out: dict[str, Any] = {"exit_codes": codes, "comms": a.comms}
    sent, healed = work / "sent_0.pt", work / "healed_1.pt"
    if sent.exists() and healed.exists():
        s, h = torch.load(sent, weights_only=True), torch.load(healed, weights_only=True)
        ts, th = tensors(s["state"]), tensors(h["state"])
        out["healed_at_step"] = [s["step"], h["step"]]
        out["healed_tensors"] = len(th)
        out["healed_bitwise_equal"] = (
            s["step"] == h["step"] and len(ts) == len(th) and all(map(torch.equal, ts, th))
        )
    f0, f1 = work / "final_0.pt", work / "final_1.pt"
    if f0.exists() and f1.exists():
        x, y = torch.load(f0, weights_only=True), torch.load(f1, weights_only=True)
        tx, ty = tensors(x["state"]), tensors(y["state"])
        out["final_step"] = [x["step"], y["step"]]
        out["final_bitwise_equal"] = (
            x["step"] == y["step"] and len(tx) == len(ty) and all(map(torch.equal, tx, ty))
        )
    return out


class Replica:
    """One replica group's process (this script with --replica-worker), its lines kept."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg, self.lines, self.comms = cfg, [], ""
        self.cond = threading.Condition()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--replica-worker", json.dumps(cfg)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip())
                if line.startswith("comms "):
                    self.comms = line.split(" ", 1)[1].strip()
                self.cond.notify_all()

    def text(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def until(self, seen: Any, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(
                lambda: any(seen(x) for x in self.lines) or self.proc.poll() is not None, timeout
            ):
                raise TimeoutError(f"replica {self.cfg['replica']}: nothing after {timeout} s")

    def wait(self, timeout: float) -> int | None:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.reader.join(10)  # its last lines read
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def replica_worker(cfg: dict[str, Any]) -> int:
    """One replica group of one rank: a torchft Manager built as workers/replicas.py builds
    it (workers.replica_comms), a small MLP and Adam, the gradients averaged over the quorum
    through the Manager and a CPU word through it each step (on cuda: gloo, beside NCCL)."""
    from dataclasses import replace

    from torchft import Manager

    from workers.replica_comms import GLOO, process_group, replica_comms, transport

    r, device, work = cfg["replica"], torch.device(cfg["device"]), Path(cfg["dir"])
    comms = replica_comms(device.type, cfg["timeout_s"], cfg["quorum_timeout_s"])
    if cfg.get("comms") == "gloo":
        comms = replace(comms, pg=GLOO)
    if cfg.get("heal", "auto") != "auto":
        comms = replace(comms, transport=cfg["heal"])
    os.environ.update(comms.env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    healed: list[bool] = []

    def load_state_dict(sd: dict[str, Any]) -> None:
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
        healed.append(True)

    def host_state() -> dict[str, Any]:
        return cpu_copy({"model": model.state_dict(), "optim": opt.state_dict()})

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # this group's own
    pg, timeout = process_group(comms), timedelta(seconds=comms.timeout_s)
    manager = Manager(
        pg=pg,
        load_state_dict=load_state_dict,
        state_dict=lambda: {"model": model.state_dict(), "optim": opt.state_dict()},
        min_replica_size=1,
        use_async_quorum=False,
        timeout=timeout,
        quorum_timeout=timedelta(seconds=cfg["quorum_timeout_s"]),
        connect_timeout=timeout,
        rank=0,
        world_size=1,
        store_addr="127.0.0.1",
        store_port=store.port,
        lighthouse_addr=cfg["lighthouse"],
        replica_id=f"replica_{r}",
        checkpoint_transport=transport(comms, pg, device),
        init_sync=False,
    )
    print(
        f"comms {pg.getBackendName()} pg, {comms.transport} heals, timeout {comms.timeout_s:g} s", flush=True
    )
    if r == 0:  # the state the others heal from (replicas.py's rank 0 does the same)
        manager.load_state_dict({"step": 1, "batches_committed": 0})
    end, announce = int(cfg.get("end_step", 0)), 0.0
    while True:
        opt.zero_grad(set_to_none=True)
        manager.start_quorum()
        step = manager.current_step()
        if healed:
            healed.clear()
            print(f"healed at step {step}", flush=True)
            if cfg["role"] == "replacement":
                torch.save({"step": step, "state": host_state()}, work / f"healed_{r}.pt")
                announce = float(step + TAIL)  # the end, told to the survivor by the word
        if step == 0:  # no state yet: train nothing until healed
            time.sleep(0.1)
            continue
        word = torch.tensor([1.0, announce], dtype=torch.float64)  # on cpu: gloo, never NCCL
        manager.allreduce(word).wait()
        if manager.errored():
            manager.should_commit()
            continue
        n = manager.num_participants()
        said = round(float(word[1]) * n)
        assert round(float(word[0]) * n) == n, f"the word's presence sum {float(word[0]) * n} != {n}"
        if said and not end:
            end = said
            if r == 0:  # what it sent in this step's heal: nothing has changed it since
                torch.save({"step": step, "state": host_state()}, work / f"sent_{r}.pt")
        gen = torch.Generator().manual_seed(step * 10 + (manager.participating_rank() or 0))
        x = torch.randn(32, 64, generator=gen).to(device)
        loss = nn.functional.mse_loss(model(x), x.flip(1))
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])  # on the device: NCCL on cuda
        manager.allreduce(flat).wait()
        if not manager.should_commit():
            continue
        at = 0
        for g in grads:  # the averaged gradients, in place
            g.copy_(flat[at : at + g.numel()].view_as(g))
            at += g.numel()
        opt.step()
        done = manager.current_step()
        print(f"committed {done} (quorum of {n})", flush=True)
        if end and done >= end:
            torch.save({"step": done, "state": host_state()}, work / f"final_{r}.pt")
            print(f"ended at step {done}", flush=True)
            break
        time.sleep(0.05)  # a survivor alone trains a few dozen steps while the replacement starts
    manager.shutdown(wait=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stall per save and step time, this project vs bare Ray Train, in one Ray Train worker.

Every variant runs in the same worker process of one TorchTrainer, interleaved round by round,
so a change in the machine's load hits all alike:

- stall: the time the training thread is blocked by one save of a state of `mb` MB
  (weights + two Adam-like moments):
    floor      a copy into preallocated host buffers (what a background save cannot avoid);
    ours       `CheckpointWriter.save` (the copy; serialization and upload run behind);
    ray_sync   `torch.save` into a directory + `ray.train.report(checkpoint=...)`, SYNC upload;
    ray_async  the same with `checkpoint_upload_mode=ASYNC`.
  Saves are spaced so that each starts with the previous one's background work done.
- step time: an MLP trained for `steps` steps with no checkpoints, with ours every `every`
  steps, and with Ray's ASYNC report every `every` steps (none at the last step, so no
  variant leaves a save's work past the timer; a pause between variants); seconds per step.
  Twice: a save every 10 steps (the background work never rests: the worst case) and one
  save an epoch (`epoch_steps`). The training thread is pinned to one CPU and every other
  thread to the other (`pin_threads`), so a save's background work competes for the
  second CPU only.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import threading
import time
from typing import Any

import torch

from bench.recovery import make, one_step

MB = 1 << 20


def make_state(mb: int) -> dict[str, Any]:
    """model.pt (a third) and train_state.pt (two thirds), in tensors of at most 8 MB."""
    per = mb * MB // 4 // 3
    chunk = 2 * MB

    def tensors(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        n, out, i = per, {}, 0
        while n > 0:
            out[f"t{i}"], n, i = torch.randn(min(n, chunk), generator=g), n - chunk, i + 1
        return out

    return {"model.pt": tensors(1), "train_state.pt": {"exp_avg": tensors(2), "exp_avg_sq": tensors(3)}}


def _meta(i: int) -> dict[str, Any]:
    return {
        "id": f"epoch0001-step{i:07d}-a1",
        "epoch": 1,
        "step_in_epoch": i,
        "global_step": i,
        "end_of_epoch": False,
        "world_size": 1,
        "attempt": 1,
    }


def _ray_save(state: dict[str, Any], mode: Any, i: int) -> None:
    import ray.train

    d = tempfile.mkdtemp(prefix="ray-ckpt-")
    for name, tree in state.items():
        torch.save(tree, os.path.join(d, name))
    ray.train.report(
        {"i": i},
        checkpoint=ray.train.Checkpoint.from_directory(d),
        checkpoint_upload_mode=mode,
        delete_local_checkpoint_after_upload=True,
    )


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def stall(mb: int, repeats: int, workdir: str) -> dict[str, list[float]]:
    from ray.train import CheckpointUploadMode

    from orchestrator.core.storage import Storage
    from workers.host_buffers import HostBuffers
    from workers.writer import CheckpointWriter

    state = make_state(mb)
    buffers = HostBuffers()
    buffers.copy(state)  # allocated once, as a writer's are from its second save on
    writer = CheckpointWriter(Storage(os.path.join(workdir, f"ours-{mb}")), commit=lambda record: None)
    writer.save(_meta(0), state)  # the writer's buffers are allocated by its first save
    gap = 0.5 + mb / 100  # seconds: the previous save's background work is done by then
    out: dict[str, list[float]] = {"floor": [], "ours": [], "ray_sync": [], "ray_async": []}
    for r in range(repeats):
        for first in ("floor", "ours") if r % 2 == 0 else ("ours", "floor"):  # alternate the order
            time.sleep(gap)
            if first == "floor":
                out["floor"].append(_timed(lambda: buffers.copy(state)))
            else:
                before = writer.blocked_s
                writer.save(_meta(r + 1), state)
                out["ours"].append(writer.blocked_s - before)
        for name, mode in (
            ("ray_sync", CheckpointUploadMode.SYNC),
            ("ray_async", CheckpointUploadMode.ASYNC),
        ):
            time.sleep(gap)
            t0 = time.perf_counter()
            _ray_save(state, mode, r)
            out[name].append(time.perf_counter() - t0)
    writer.close()
    return out


def pin_threads(cpus: set[int], pin: bool = True) -> bool:
    """The calling (training) thread on the first of `cpus`, every other thread of this
    process on the second: whatever a save leaves running (our writer thread, Ray's upload
    thread, Ray's own threads) competes for the second CPU only, so its cost shows up in the
    step time the same way in every round instead of wherever the scheduler happened to put
    it. Called again after each save to catch the threads it started (a new thread inherits
    its creator's CPU). `pin=False` gives every thread all of `cpus` again. False where there
    are fewer than 2 CPUs. `cpus` is taken once by the caller: after the first call, this
    thread's own affinity is one CPU."""
    ordered = sorted(cpus)
    if len(ordered) < 2 or not os.path.isdir("/proc/self/task"):
        return False
    mine, others = ({ordered[0]}, {ordered[1]}) if pin else (cpus, cpus)
    me = threading.get_native_id()
    os.sched_setaffinity(0, mine)  # pid 0: the calling thread (Linux)
    for tid in map(int, os.listdir("/proc/self/task")):
        if tid != me:
            with contextlib.suppress(OSError):  # it ended meanwhile
                os.sched_setaffinity(tid, others)
    return True


def step_time(width: int, steps: int, every: int, rounds: int, workdir: str) -> dict[str, list[float]]:
    from ray.train import CheckpointUploadMode

    from orchestrator.core.storage import Storage
    from workers.writer import CheckpointWriter

    out: dict[str, list[float]] = {"none": [], "ours": [], "ray_async": []}
    cpus = os.sched_getaffinity(0)  # once: pinning narrows this thread's own affinity
    # One writer for every round, as a run has one per attempt: its host buffers are
    # allocated at its first save and reused after.
    ours = CheckpointWriter(Storage(os.path.join(workdir, f"steps-{every}")), commit=lambda record: None)
    try:
        for r in range(rounds):
            for variant in out:  # interleaved
                model, opt = make(width)
                writer = ours if variant == "ours" else None
                pin_threads(cpus)
                t0 = time.perf_counter()
                for step in range(1, steps + 1):
                    one_step(model, opt, width)
                    if step % every or step == steps:  # no save's work left over past the timer
                        continue
                    sd = {"optimizer": opt.state_dict()}
                    state = {"model.pt": model.state_dict(), "train_state.pt": sd}
                    if writer is not None:
                        writer.save(_meta(r * steps + step), state)
                    elif variant == "ray_async":
                        _ray_save(state, CheckpointUploadMode.ASYNC, step)
                    pin_threads(cpus)  # the threads the save started
                out[variant].append((time.perf_counter() - t0) / steps)
                time.sleep(2.0)  # what a variant left in the background (Ray's upload) ends before the next
    finally:
        ours.close()
        pin_threads(cpus, pin=False)
    return out


def worker(config: dict[str, Any]) -> None:
    import json

    torch.set_num_threads(1)  # as each training worker runs; the background work gets the other core
    results: dict[str, Any] = {"stall": {}, "step_time": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for mb in config["sizes_mb"]:
            results["stall"][str(mb)] = stall(mb, config["repeats"], workdir)
        results["step_time"] = step_time(
            config["width"], config["steps"], config["every"], config["rounds"], workdir
        )
        # One save an epoch: rounds of two epochs, the save at the end of the first.
        results["step_time_epoch"] = step_time(
            config["width"], 2 * config["epoch_steps"], config["epoch_steps"], config["epoch_rounds"], workdir
        )
    with open(config["out"], "w") as f:
        json.dump(results, f)


def run(config: dict[str, Any], workdir: str) -> dict[str, Any]:
    """Runs `worker` in a one-worker TorchTrainer on an embedded Ray; returns its results."""
    import json

    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = os.path.join(workdir, "side_by_side.json")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        TorchTrainer(
            worker,
            train_loop_config={**config, "out": out},
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(
                name="bench-side-by-side",
                storage_path=os.path.join(workdir, "ray-storage"),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        ).fit()
    finally:
        ray.shutdown()
    with open(out) as f:
        return dict(json.load(f))


def median(xs: list[float]) -> float:
    return statistics.median(xs)

"""Recovery after a worker SIGKILL, this project vs bare Ray Train, with the same training.

Both sides run the same loop (an MLP, Adam, a checkpoint every `every` steps): bare Ray Train
through `ray.train.report(checkpoint=...)` and `ray.train.get_checkpoint()`, this project
through a train function on the session API (`session.report(state=...)`,
`session.restore()`), run by `orchestrator run`. At step `kill_at` of the first attempt the
worker writes the time and SIGKILLs itself; the restarted worker writes when its train
function started (the worker group is back), and the time of its first training step after
the restore and the step it restored. Recovery = that last time minus the kill's, in two
phases: kill to the restarted function (failure detection, worker-group teardown and
restart, process-group set-up) and from there to the first step (restore and one step).
Steps lost = kill_at minus the restored step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def make(width: int, depth: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def one_step(model: nn.Module, opt: torch.optim.Optimizer, width: int) -> float:
    x, y = torch.randn(32, width), torch.randint(0, 10, (32,))
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return float(loss)


def _mark(opts: dict[str, Any], name: str, **fields: Any) -> None:
    with open(os.path.join(opts["workdir"], name), "w") as f:
        json.dump({"t": time.time(), **fields}, f)


def _started(opts: dict[str, Any]) -> None:
    if os.path.exists(os.path.join(opts["workdir"], "killed.json")):
        _mark(opts, "restarted.json")


def _after_step(opts: dict[str, Any], step: int, restored: int | None, first: bool) -> None:
    """The marks both sides write: the first step after a restore, and the kill."""
    if restored is not None and first:
        _mark(opts, "resumed.json", restored=restored)
    if restored is None and step == opts["kill_at"]:
        _mark(opts, "killed.json", step=step)
        os.kill(os.getpid(), signal.SIGKILL)


# -- the loop both sides run --------------------------------------------------------------
def loop(
    opts: dict[str, Any], state: dict[str, Any] | None, save: Callable[[int, float, dict[str, Any]], None]
) -> None:
    """Train from `state` (None: from the start), saving every `every` steps through `save`."""
    torch.set_num_threads(1)
    model, opt = make(opts["width"])
    start, restored = 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = restored = int(state["step"])
    for step in range(start + 1, opts["steps"] + 1):
        loss = one_step(model, opt, opts["width"])
        _after_step(opts, step, restored, step == start + 1)
        if step % opts["every"] == 0:
            save(step, loss, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step})


# -- bare Ray Train -----------------------------------------------------------------------
def ray_train(opts: dict[str, Any]) -> None:
    import ray.train

    _started(opts)
    state = None
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=True)

    def save(step: int, loss: float, tree: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as d:
            torch.save(tree, os.path.join(d, "state.pt"))
            ray.train.report({"loss": loss, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(d))

    loop(opts, state, save)


def run_ray(workdir: Path, opts: dict[str, Any], poll_s: float | None = None) -> None:
    """`poll_s`: the controller's poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) instead of Ray's 2 s."""
    ray_fit(ray_train, {**opts, "workdir": str(workdir)}, workdir, "bench-recovery", 1, 2, poll_s)


def ray_fit(
    fn: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    workdir: Path,
    name: str,
    num_workers: int,
    max_failures: int,
    poll_s: float | None = None,
    address: str | None = None,
) -> None:
    """`fn` in a TorchTrainer on an embedded 2-CPU Ray (or the cluster at `address`), as a
    user's script runs it; `poll_s`: the controller's poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S)
    instead of Ray's 2 s."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.ray_compat import controller_poll_env

    env = controller_poll_env(poll_s) if poll_s is not None else {}
    # fit() hands the driver's environment to the controller; patch.dict restores it after.
    with mock.patch.dict(os.environ, env):
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            TorchTrainer(
                fn,
                train_loop_config=config,
                scaling_config=ScalingConfig(num_workers=num_workers),
                run_config=RunConfig(
                    name=name,
                    storage_path=str(workdir / "ray-storage"),
                    failure_config=FailureConfig(max_failures=max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=2),
                ),
            ).fit()
        finally:
            ray.shutdown()


# -- this project ---------------------------------------------------------------------------
def ours_train(session: Any) -> None:
    _started(session.cfg.task_options)  # before session.context, which plans the restore
    opts = session.context.options

    def save(step: int, loss: float, tree: dict[str, Any]) -> None:
        session.report({"loss": loss}, epoch=1, step=step, end_of_epoch=step == opts["steps"], state=tree)

    loop(opts, session.restore(), save)


def run_ours(workdir: Path, opts: dict[str, Any]) -> None:
    spec = {
        "name": "bench-recovery",
        "storage": {"root": str(workdir / "ours-storage")},
        "task": {
            "name": f"{ROOT / 'bench' / 'recovery.py'}:ours_train",
            "options": {**opts, "workdir": str(workdir)},
        },
        "scaling": {"num_workers": 1},
        "checkpoint": {"monitor": "loss", "mode": "min", "top_k": 1, "keep_latest": 1},
        "epochs": 1,
        "failure": {"max_failures": 2},
    }
    path = workdir / "spec.json"  # JSON is YAML
    path.write_text(json.dumps(spec))
    _orchestrator_run(path)


# -- this project, failure.mode replicas ----------------------------------------------------
def replicas_task(options: dict[str, Any], ctx: Any) -> Any:
    """The same MLP and Adam as a Task (replicas run the built-in loop), on random data; every
    train step's start is appended to a file per rank, so the pause after a kill can be read
    off the merged starts."""
    from torch.utils.data import TensorDataset

    from workers.task import Task, classification_step

    torch.set_num_threads(1)
    model, opt = make(options["width"])
    g = torch.Generator().manual_seed(0)
    n = 32 * options["steps"] * ctx.world_size
    x, y = torch.randn(n, options["width"], generator=g), torch.randint(0, 10, (n,), generator=g)
    data = TensorDataset(x, y)
    log = open(os.path.join(options["workdir"], f"steps-{ctx.rank}.txt"), "a", buffering=1)

    def train_step(model: nn.Module, batch: Any) -> torch.Tensor:
        log.write(f"{time.time()}\n")
        return classification_step(model, batch)

    val = TensorDataset(x[:64], y[:64])
    return Task(
        model=model, optimizer=opt, train_data=data, val_data=val, batch_size=32, train_step=train_step
    )


def run_replicas(workdir: Path, opts: dict[str, Any], rank: int) -> dict[str, float]:
    """Two replica groups of one worker each; rank `rank` is SIGKILLed at step kill_at."""
    spec = {
        "name": "bench-replicas",
        "storage": {"root": str(workdir / "ours-storage")},
        "task": {
            "name": f"{ROOT / 'bench' / 'recovery.py'}:replicas_task",
            "options": {**opts, "workdir": str(workdir)},
        },
        "scaling": {"num_workers": 2},
        "checkpoint": {
            "monitor": "val_loss",
            "mode": "min",
            "top_k": 1,
            "keep_latest": 1,
            "every_n_steps": opts["every"],
        },
        "epochs": 1,
        "failure": {"max_failures": 2, "mode": "replicas"},
        "chaos": {"kills": [{"rank": rank, "epoch": 1, "step": opts["kill_at"]}]},
    }
    path = workdir / "spec.json"
    path.write_text(json.dumps(spec))
    _orchestrator_run(path)
    events = (workdir / "ours-storage" / "bench-replicas" / "events.jsonl").read_text().splitlines()
    kill = next(e["ts"] for e in map(json.loads, events) if e["kind"] == "chaos_kill")
    starts = sorted(float(t) for f in workdir.glob("steps-*.txt") for t in f.read_text().split())
    return {"pause_s": stood_still(starts, kill)[1] - kill}


def stood_still(starts: list[float], kill: float, until: float = float("inf")) -> tuple[float, float]:
    """The longest stretch without a step starting on any rank, from the last start before the
    kill to `until` (the step the kill broke is not committed and is tried again after it):
    (its length, the start that ended it). `starts`: every rank's step starts, sorted."""
    window = [max((t for t in starts if t <= kill), default=kill), *(t for t in starts if kill < t < until)]
    return max(((b - a, b) for a, b in zip(window, window[1:], strict=False)), default=(0.0, kill))


def measure_replicas(opts: dict[str, Any], rank: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"bench-replicas-{rank}-") as tmp:
        return run_replicas(Path(tmp), opts, rank)


def _orchestrator_run(path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", str(path), "--address", "local", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if p.returncode != 0:
        raise RuntimeError(f"orchestrator run exited {p.returncode}: {p.stderr[-3000:]}")


# Bare Ray Train as users get it (a poll every 2 s), and with this project's poll.
RAY_SIDES: dict[str, float | None] = {"ray": None, "ray_poll_0.25": 0.25}


def measure(side: str, opts: dict[str, Any]) -> dict[str, float]:
    """One run with one kill: recovery seconds and steps lost. side: "ours" or a RAY_SIDES key."""
    with tempfile.TemporaryDirectory(prefix=f"bench-recovery-{side}-") as tmp:
        workdir = Path(tmp)
        if side == "ours":
            run_ours(workdir, opts)
        else:
            run_ray(workdir, opts, poll_s=RAY_SIDES[side])
        killed, restarted, resumed = (
            json.loads((workdir / f"{name}.json").read_text()) for name in ("killed", "restarted", "resumed")
        )
    return {
        "recovery_s": resumed["t"] - killed["t"],
        "to_restarted_function_s": restarted["t"] - killed["t"],
        "restore_and_first_step_s": resumed["t"] - restarted["t"],
        "steps_lost": killed["step"] - resumed["restored"],
    }

"""Ray Train's torchft replica groups on this machine: does a SIGKILLed replica get replaced
while the other keeps training? (docs/benchmarks.md, "Replacing only the failed replica")

    pip install -e '.[replicas]'                           # torchft, an optional dependency
    python bench/torchft_replicas.py                       # no ray.train.report in the loop
    python bench/torchft_replicas.py --report-every 10     # report every 10 steps, as Ray's example
    python bench/torchft_replicas.py --heartbeat-ms 2000   # the lighthouse drops a dead replica sooner

Two replica groups of one worker each (gloo on CPU) train a 1x1 linear model, each from its
own seed, so a replacement that ends with its peer's weights healed from the peer. Replica 1
SIGKILLs itself once, at `--kill-step`. Every step, kill and heal is logged; the
summary printed at the end gives the survivor's pause (its longest wait between two committed
steps from the kill on), when the replacement healed from it, and both ranks' final weights.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any


def train(cfg: dict[str, Any]) -> None:
    import ray.train
    import torch
    from torch import nn
    from torchft import DistributedDataParallel, Manager, Optimizer, ProcessGroupGloo
    from torchft.checkpointing.pg_transport import PGTransport

    out = Path(cfg["out"])
    rank = ray.train.get_context().get_world_rank()

    def log(event: str, **fields: Any) -> None:
        with open(out / "events.jsonl", "a") as f:
            row = {"t": time.time(), "pid": os.getpid(), "rank": rank, "ev": event, **fields}
            f.write(json.dumps(row) + "\n")

    torch.manual_seed(rank)  # each replica starts elsewhere: only healing makes them equal
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    timeout = timedelta(seconds=cfg["pg_timeout_s"])
    pg = ProcessGroupGloo(timeout=timeout)

    def load(sd: dict[str, Any]) -> None:
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
        log("HEALED", w=model.weight.item())

    manager = Manager(
        pg=pg,
        min_replica_size=1,
        load_state_dict=load,
        state_dict=lambda: {"model": model.state_dict(), "optim": opt.state_dict()},
        world_size=1,
        rank=0,
        replica_id=f"rg_{rank}",
        checkpoint_transport=PGTransport(pg, timeout=timeout, device=torch.device("cpu")),
        timeout=timedelta(seconds=60),
        quorum_timeout=timedelta(seconds=60),
        connect_timeout=timedelta(seconds=60),
    )
    ddp, fopt = DistributedDataParallel(manager, model), Optimizer(manager, opt)
    x = torch.linspace(0, 10, 64)[:, None]
    y = 2 * x + 5
    while manager.current_step() < cfg["steps"]:
        before = manager.current_step()
        fopt.zero_grad()  # starts the quorum
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()  # the all-reduce across replicas
        fopt.step()  # commits the step if every participant got this far
        step = manager.current_step()
        log("STEP", step=step, committed=step > before, w=model.weight.item())
        if rank == 1 and step >= cfg["kill_step"] and not (out / "killed").exists():
            (out / "killed").touch()
            log("KILL", step=step)
            os.kill(os.getpid(), signal.SIGKILL)
        if cfg["report_every"] and step % cfg["report_every"] == 0:
            ray.train.report({"step": step, "loss": loss.item()})
        time.sleep(cfg["step_sleep_s"])
    log("DONE", step=manager.current_step(), w=model.weight.item())
    manager.shutdown()


def summary(events: list[dict[str, Any]]) -> dict[str, Any]:
    kill = next((e for e in events if e["ev"] == "KILL"), None)
    done = {e["rank"]: round(e["w"], 6) for e in events if e["ev"] == "DONE"}
    if kill is None:
        return {"killed": False, "final_weight": done}
    # The survivor's longest wait between two committed steps from its last one before the
    # kill on (a step is about --step-sleep-s apart otherwise).
    times = [e["t"] for e in events if e["rank"] == 0 and e["ev"] == "STEP" and e["committed"]]
    after = [t for t in times if t > kill["t"]]
    window = [max((t for t in times if t <= kill["t"]), default=kill["t"]), *after]
    pause = max((b - a for a, b in itertools.pairwise(window)), default=None)
    healed = next((e for e in events if e["ev"] == "HEALED" and e["t"] > kill["t"]), None)
    return {
        "killed_at_step": kill["step"],
        "survivor_pause_s": None if pause is None else round(pause, 2),
        "survivor_steps_after_kill": len(after),
        "replacement_healed_after_s": None if healed is None else round(healed["t"] - kill["t"], 2),
        "final_weight": done,  # equal on both ranks: the replacement took its peer's weights
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--kill-step", type=int, default=40)
    ap.add_argument("--step-sleep-s", type=float, default=0.2)
    ap.add_argument("--report-every", type=int, default=0, help="ray.train.report every N steps (0: never)")
    ap.add_argument("--heartbeat-ms", type=int, default=None, help="the lighthouse's heartbeat_timeout_ms")
    ap.add_argument("--pg-timeout-s", type=float, default=30.0)
    args = ap.parse_args()

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.torch.torchft_config import TorchftConfig

    with tempfile.TemporaryDirectory(prefix="torchft-") as tmp:
        cfg = {
            "out": tmp,
            "steps": args.steps,
            "kill_step": args.kill_step,
            "step_sleep_s": args.step_sleep_s,
            "report_every": args.report_every,
            "pg_timeout_s": args.pg_timeout_s,
        }
        lighthouse: dict[str, Any] = {"min_replicas": 1}
        if args.heartbeat_ms is not None:
            lighthouse["heartbeat_timeout_ms"] = args.heartbeat_ms
        ray.init(num_cpus=3, include_dashboard=False)
        t0 = time.time()
        error = None
        try:
            TorchTrainer(
                train,
                train_loop_config=cfg,
                scaling_config=ScalingConfig(num_workers=2),
                torch_config=TorchftConfig(lighthouse_kwargs=lighthouse, backend="gloo"),
                run_config=RunConfig(
                    storage_path=os.path.join(tmp, "ray"),
                    name="torchft-replicas",
                    failure_config=FailureConfig(max_failures=3),
                ),
            ).fit()
        except Exception as e:  # the outcome being measured: print it, not a traceback
            error = f"{type(e).__name__}: {str(e)[:500]}"
        finally:
            ray.shutdown()
        events = [json.loads(line) for line in open(os.path.join(tmp, "events.jsonl"))]
        print(json.dumps({"fit_s": round(time.time() - t0, 1), "error": error, **summary(events)}, indent=1))


if __name__ == "__main__":
    main()

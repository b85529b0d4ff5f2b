"""The benchmark suite: this project side by side with bare Ray Train, in one sitting.

    python -m bench                          # the full suite (about 18 minutes on 2 cores, plus goodput's
                                             #   and scale's 20)
    python -m bench --quick --json out.json  # a reduced one (about 5 minutes on 2 cores, plus goodput's
                                             #   and scale's 5)
    python -m bench --only goodput --quick   # one benchmark of the suite (goodput, or scale)
    make bench

Each benchmark runs its baselines in the same process or the same sitting, interleaved round
by round, and every figure is a ratio of medians from this one run (absolute times on a shared
2-core machine move with its load; ratios from one sitting move much less):

    stall_vs_floor         our training-thread stall per save / a copy into preallocated buffers
    stall_vs_ray_async     our stall / bare Ray Train's (torch.save + report, ASYNC upload)
    stall_vs_ray_sync      our stall / bare Ray Train's with SYNC upload
    step_time_vs_no_ckpt   seconds per step with our save once an epoch (100 steps) / without
    step_time_vs_ray_async the same / with Ray's ASYNC report once an epoch
                           (the tables also show a save every 10 steps, the worst case)
    recovery_vs_ray        worker SIGKILL to the first step after the restore: ours / Ray's
    steps_lost_per_failure steps redone after that kill (ours; Ray's is in the details)
    upload_vs_raw_s3fs     our upload throughput to S3 (moto) / a raw s3fs put_file's
    restore_local_vs_s3    a restore's time from S3 / from the node-local tier
    peak_host_mem_vs_state peak host memory a save adds / the state's size

Beside the ten (ratios_beside): recovery_vs_ray_poll_0.25 (bare Ray Train given this project's
poll too), and replicas_rank1_pause_vs_ray / replicas_rank0_pause_vs_ray: with failure.mode
replicas (two replica groups), how long training stood still after a replica's or rank 0's
kill, over bare Ray Train's recovery (one worker, its 2 s poll); the same over bare Ray Train
with the 0.25 s poll (..._vs_ray_poll_0.25, still one worker against two). The goodput
benchmark's own, two workers on every side: stood_still_{restart,replicas}_vs_ray_tuned and,
per victim, replicas_rank{0,1}_stood_vs_ray_tuned.

Goodput (bench/goodput.py): one training job under a seeded failure schedule, bare Ray Train
(defaults and tuned) and this project (failure.mode restart and replicas), each also without
failures; its keys (goodput.KEYS) join the ten in --json:

    goodput_<side>                 tuned bare Ray's failure-free time / the side's time with failures
    lost_vs_ray_tuned, lost_vs_ray our best side's time lost / bare Ray Train's (tuned, defaults)
    clean_vs_ray_tuned             restart mode's failure-free time / tuned bare Ray's
    step_time_replicas_vs_restart  replicas mode's step time / restart mode's
    auto_clean_vs_restart          checkpoint.every_n_steps: auto's failure-free time / restart
                                   mode's with a save every 12 steps
    auto_redone_per_failure        steps every_n_steps: auto redid per failure

The schedule has SIGKILLs of workers (rank 0's among them) and a node loss; every run has a
fresh local multi-node cluster (ray.cluster_utils.Cluster). Goodput's ten runs took about 14
minutes in --quick on this machine when quiet, without the node loss and the auto side (more
in the full suite: 960 steps against 288).

Beside them, not a ratio: commit_s_at_4096_ranks, seconds from the last of 4,096 simulated
ranks' records to a durable manifest on moto S3 (bench/scale.py: the control plane alone, no
torch, no Ray; its tables say what grows with the world size and the run's length).

Stall and restore ratios take the largest state size measured. --json writes those ten keys
(and goodput's, and commit_s_at_4096_ranks);
bench/results.json (the full run, or --results) also keeps every sample, the machine and the
commit. The markdown tables printed at the end are what docs/benchmarks.md shows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

MB = 1 << 20
KEYS = (
    "stall_vs_floor",
    "stall_vs_ray_async",
    "stall_vs_ray_sync",
    "step_time_vs_no_ckpt",
    "step_time_vs_ray_async",
    "recovery_vs_ray",
    "steps_lost_per_failure",
    "upload_vs_raw_s3fs",
    "restore_local_vs_s3",
    "peak_host_mem_vs_state",
)
QUICK = {
    "sizes_mb": [64, 256],
    "repeats": 3,
    "width": 1024,
    "steps": 40,
    "every": 10,
    "rounds": 3,
    "epoch_steps": 100,
    "epoch_rounds": 3,
    "recovery_runs": 1,
    "storage_mb": 64,
    "storage_repeats": 2,
}
FULL = {
    "sizes_mb": [64, 256, 1024],
    "repeats": 5,
    "width": 1024,
    "steps": 60,
    "every": 10,
    "rounds": 7,
    "epoch_steps": 100,
    "epoch_rounds": 9,
    "recovery_runs": 3,
    "storage_mb": 256,
    "storage_repeats": 3,
}
SIDE_BY_SIDE_KEYS = (
    *("sizes_mb", "repeats", "width", "steps", "every", "rounds"),
    *("epoch_steps", "epoch_rounds"),
)
RECOVERY = {"width": 512, "steps": 80, "every": 10, "kill_at": 35}
BENCHMARKS = ("goodput", "scale", "replicas")  # what --only runs alone


VICTIMS = {"rank1": "rank 1 (a replica) killed", "rank0": "rank 0 (the writer) killed"}


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    return f"{med(xs) * 1e3:.1f} ms ({min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f})"


def storage_bench(mb: int, repeats: int, work: Path) -> dict[str, Any]:
    """Upload/download through the storage layer vs raw s3fs, restore tier vs S3, peak memory."""
    import s3fs
    import torch

    from bench import storage_tiers as tiers
    from orchestrator.core.storage import Storage

    out: dict[str, Any] = {
        "mb": mb,
        "upload_s": {"ours": [], "raw_s3fs": []},
        "download_s": {"ours": [], "raw_s3fs": []},
        "restore_s": {"tier": [], "s3": []},
    }
    with tiers.moto_s3(work) as s3_uri:
        blob = work / "blob"
        blob.write_bytes(os.urandom(mb * MB))
        ours = Storage(s3_uri)
        raw = s3fs.S3FileSystem(
            skip_instance_cache=True, client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
        )
        bucket = s3_uri.removeprefix("s3://").split("/")[0]
        for r in range(repeats):
            t0 = time.perf_counter()
            ours.put_file(str(blob), f"up/ours-{r}")
            t1 = time.perf_counter()
            raw.put_file(str(blob), f"{bucket}/raw/raw-{r}")
            t2 = time.perf_counter()
            ours.read_bytes(f"up/ours-{r}")
            t3 = time.perf_counter()
            raw.cat_file(f"{bucket}/raw/raw-{r}")
            t4 = time.perf_counter()
            out["upload_s"]["ours"].append(t1 - t0)
            out["upload_s"]["raw_s3fs"].append(t2 - t1)
            out["download_s"]["ours"].append(t3 - t2)
            out["download_s"]["raw_s3fs"].append(t4 - t3)
        up = out["upload_s"]
        say(f"storage: upload {med(up['ours']):.2f}s ours, {med(up['raw_s3fs']):.2f}s raw s3fs")
        torch.set_num_threads(1)
        state = tiers.make_state(mb)
        s3 = tiers.open_storage(s3_uri + "/restore", str(work / "tier"))
        record = tiers.save(s3, state)
        del state
        for _ in range(repeats):
            out["restore_s"]["tier"].append(tiers.timed_restore(s3, record))  # the node's verified copy
            out["restore_s"]["s3"].append(tiers.timed_restore(Storage(s3.uri), record))
        rs = out["restore_s"]
        say(f"storage: restore {med(rs['tier']):.2f}s tier, {med(rs['s3']):.2f}s S3")
    out["memory"] = tiers.memory_in_subprocess("tier", mb, str(work / "mem"), str(work / "mem-tier"))
    say(f"storage: a save adds {out['memory']['ratio']:.2f}x the state's size at peak")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="the reduced suite (fewer rounds, steps and kills)")
    ap.add_argument("--json", dest="json_path", help="write the ten ratios and goodput's here")
    ap.add_argument("--only", choices=BENCHMARKS, help="run this benchmark alone (its keys only)")
    ap.add_argument(
        "--results",
        default=None,
        help="write every sample here (default: bench/results.json for the full suite)",
    )
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    from bench import goodput, recovery, scale, side_by_side

    if args.only == "scale":
        scale.main(
            [
                *(["--quick"] if args.quick else []),
                *(["--json", args.json_path] if args.json_path else []),
                *(["--results", args.results] if args.results else []),
            ]
        )
        return
    t_start = time.time()
    if args.only == "replicas":
        replicas_pauses(args, cfg["recovery_runs"], t_start)
        return
    gp_cfg = goodput.QUICK if args.quick else goodput.FULL
    if args.only == "goodput":
        gp = goodput.run(gp_cfg, say)
        gp["machine"] = machine_info(args.quick, t_start)
        write(args, gp, gp["ratios"], default_results=None)
        print(goodput.table(gp))
        print(json.dumps(gp["ratios"], indent=2))
        return
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        say(f"stall ({cfg['sizes_mb']} MB) and step time, in one Ray Train worker")
        sbs = side_by_side.run(
            {k: v for k, v in cfg.items() if k in SIDE_BY_SIDE_KEYS},
            str(work),
        )
        for mb, s in sbs["stall"].items():
            say(f"stall {mb} MB: " + ", ".join(f"{k} {spread(v)}" for k, v in s.items()))
        for key, what in (("step_time", f"every {cfg['every']} steps"), ("step_time_epoch", "once an epoch")):
            say(f"step time, a save {what}: " + ", ".join(f"{k} {spread(v)}" for k, v in sbs[key].items()))
        rec: dict[str, list[dict[str, float]]] = {"ours": [], **{side: [] for side in recovery.RAY_SIDES}}
        pauses: dict[str, list[dict[str, float]]] = {"rank1": [], "rank0": []}
        for r in range(cfg["recovery_runs"]):
            for side in rec:  # interleaved
                rec[side].append(recovery.measure(side, RECOVERY))
                say(
                    f"recovery {side} run {r + 1}: {rec[side][-1]['recovery_s']:.1f}s, "
                    f"{rec[side][-1]['steps_lost']} steps redone"
                )
            for victim in pauses:  # failure.mode replicas: the kill of a replica, then of rank 0
                pauses[victim].append(recovery.measure_replicas(RECOVERY, int(victim[-1])))
                paused = pauses[victim][-1]["pause_s"]
                say(f"replicas, {victim} killed, run {r + 1}: training paused {paused:.1f}s")
        store = storage_bench(cfg["storage_mb"], cfg["storage_repeats"], work)
        say("scale: the control plane with simulated ranks (bench/scale.py)")
        scaled = scale.run(scale.QUICK if args.quick else scale.FULL, work / "scale")
    say("goodput: one job, a seeded failure schedule, four sides")
    gp = goodput.run(gp_cfg, say)

    big = sbs["stall"][str(max(cfg["sizes_mb"]))]
    steps = sbs["step_time_epoch"]
    recovery_s = {side: med([x["recovery_s"] for x in runs]) for side, runs in rec.items()}
    ratios = {
        "stall_vs_floor": med(big["ours"]) / med(big["floor"]),
        "stall_vs_ray_async": med(big["ours"]) / med(big["ray_async"]),
        "stall_vs_ray_sync": med(big["ours"]) / med(big["ray_sync"]),
        "step_time_vs_no_ckpt": med(steps["ours"]) / med(steps["none"]),
        "step_time_vs_ray_async": med(steps["ours"]) / med(steps["ray_async"]),
        "recovery_vs_ray": recovery_s["ours"] / recovery_s["ray"],
        "steps_lost_per_failure": med([x["steps_lost"] for x in rec["ours"]]),
        "upload_vs_raw_s3fs": med(store["upload_s"]["raw_s3fs"]) / med(store["upload_s"]["ours"]),
        "restore_local_vs_s3": med(store["restore_s"]["s3"]) / med(store["restore_s"]["tier"]),
        "peak_host_mem_vs_state": store["memory"]["ratio"],
    }
    ratios = {k: round(ratios[k], 3) for k in KEYS}
    # Beside the ten: bare Ray Train given this project's poll too (its default is 2 s).
    beside = {"recovery_vs_ray_poll_0.25": round(recovery_s["ours"] / recovery_s["ray_poll_0.25"], 3)}
    # failure.mode replicas: how long training stood still after the kill, over Ray's recovery
    # (its 2 s poll), and over Ray's with the same 0.25 s poll (one worker against two, still).
    for victim, runs in pauses.items():
        pause = med([x["pause_s"] for x in runs])
        beside[f"replicas_{victim}_pause_vs_ray"] = round(pause / recovery_s["ray"], 3)
        beside[f"replicas_{victim}_pause_vs_ray_poll_0.25"] = round(pause / recovery_s["ray_poll_0.25"], 3)
    beside |= gp.get("ratios_beside", {})  # two workers on every side, the poll matched
    machine = machine_info(args.quick, t_start)
    details = {
        "ratios": {**ratios, **gp["ratios"], "commit_s_at_4096_ranks": scaled["commit_s_at_4096_ranks"]},
        "ratios_beside": beside,
        "machine": machine,
        "config": cfg,
        "recovery_config": RECOVERY,
        "side_by_side": sbs,
        "recovery": rec,
        "replicas_pause": pauses,
        "storage": store,
        "goodput": gp,
        "scale": scaled,
    }
    full_results = None if args.quick else ROOT / "bench" / "results.json"
    write(args, details, details["ratios"], default_results=full_results)
    print(tables(details))
    print(goodput.table(gp))
    print(scale.tables(scaled))
    print(json.dumps(details["ratios"], indent=2))


def replicas_pauses(args: argparse.Namespace, runs: int, t_start: float) -> None:
    """failure.mode replicas alone: how long training stood still after the kill of a replica
    and after the kill of the writer (rank 0), interleaved, and the second over the first."""
    from bench import recovery

    pauses: dict[str, list[dict[str, float]]] = {"rank1": [], "rank0": []}
    for r in range(runs):
        for victim in pauses:
            got = recovery.measure_replicas(RECOVERY, int(victim[-1]))
            pauses[victim].append(got)
            say(f"replicas, {VICTIMS[victim]}, run {r + 1}: training paused {got['pause_s']:.2f}s")
    pause = {victim: med([x["pause_s"] for x in got]) for victim, got in pauses.items()}
    ratios = {"replicas_rank0_pause_vs_rank1": round(pause["rank0"] / pause["rank1"], 3)}
    details = {
        "ratios": ratios,
        "pause_s": pauses,
        "config": RECOVERY,
        "machine": machine_info(args.quick, t_start),
    }
    write(args, details, ratios, default_results=None)
    for victim, got in pauses.items():
        say(f"{VICTIMS[victim]}: paused {spread([x['pause_s'] for x in got])} over {len(got)} runs")
    print(json.dumps(ratios, indent=2))


def machine_info(quick: bool, t_start: float) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "commit": commit or None,
        "minutes": round((time.time() - t_start) / 60, 1),
        "suite": "quick" if quick else "full",
    }
    with contextlib.suppress(ImportError):
        import ray
        import torch

        machine |= {"torch": torch.__version__, "ray": ray.__version__}
    return machine


def write(
    args: argparse.Namespace, details: dict[str, Any], ratios: dict[str, Any], default_results: Path | None
) -> None:
    """--results (default: bench/results.json for the full suite) gets every sample, --json the ratios."""
    results = args.results or default_results
    if results:
        Path(results).write_text(json.dumps(details, indent=1) + "\n")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(ratios, indent=2) + "\n")


def tables(d: dict[str, Any]) -> str:
    """The markdown docs/benchmarks.md shows: medians (min-max) and the ratios."""
    sbs, rec, store, m = d["side_by_side"], d["recovery"], d["storage"], d["machine"]
    lines = [
        f"Run: {m['suite']} suite, commit {m['commit']}, {m['cpus']} CPUs, torch {m.get('torch')}, "
        f"Ray {m.get('ray')}, {m['minutes']} min, load average {m['load_avg_1m_at_end']} at the end.",
        "",
        "| training thread blocked per save | floor (copy) | this project | Ray ASYNC | Ray SYNC |",
        "|---|---|---|---|---|",
    ]
    for mb, s in sbs["stall"].items():
        lines.append(
            f"| {mb} MB | {spread(s['floor'])} | {spread(s['ours'])} | {spread(s['ray_async'])} | "
            f"{spread(s['ray_sync'])} |"
        )
    c = d["config"]
    lines += [
        "",
        "| step time, s/step, median (min-max) | rounds | no saves | this project | Ray ASYNC | ours/none |",
        "|---|---|---|---|---|---|",
    ]
    for key, what in (
        ("step_time_epoch", f"once an epoch ({c['epoch_steps']} steps)"),
        ("step_time", f"every {c['every']} steps"),
    ):
        st = sbs[key]
        lines.append(
            f"| a save {what} | {len(st['none'])} | {spread(st['none'])} | {spread(st['ours'])} | "
            f"{spread(st['ray_async'])} | {med(st['ours']) / med(st['none']):.3f} |"
        )
    r = d["recovery_config"]
    lines += [
        "",
        f"| worker SIGKILL at step {r['kill_at']}, a save every {r['every']} steps | this project | "
        "bare Ray Train | bare Ray Train, a 0.25 s poll |",
        "|---|---|---|---|",
        *(
            f"| {label} | " + " | ".join(", ".join(f"{x[key]:.1f}" for x in rec[k]) for k in rec) + " |"
            for label, key in (
                ("kill to the first step after the restore, s", "recovery_s"),
                (
                    "of which: kill to the restarted train function (detection, group restart)",
                    "to_restarted_function_s",
                ),
                ("of which: restore and the first step", "restore_and_first_step_s"),
            )
        ),
        "| steps redone | " + " | ".join(", ".join(str(x["steps_lost"]) for x in rec[k]) for k in rec) + " |",
    ]
    if pauses := d.get("replicas_pause"):
        lines += [
            "",
            "| failure.mode replicas (2 replica groups), the same kill | training stood still, s |",
            "|---|---|",
            *(
                f"| {VICTIMS[v]} | " + ", ".join(f"{x['pause_s']:.1f}" for x in runs) + " |"
                for v, runs in pauses.items()
            ),
        ]
    up, down, rs = store["upload_s"], store["download_s"], store["restore_s"]
    lines += [
        "",
        f"| {store['mb']} MB on moto S3 | this project | raw s3fs |",
        "|---|---|---|",
        f"| upload, s | {med(up['ours']):.2f} | {med(up['raw_s3fs']):.2f} |",
        f"| download, s | {med(down['ours']):.2f} | {med(down['raw_s3fs']):.2f} |",
        "",
        f"Restore of a {store['mb']} MB checkpoint: {med(rs['tier']):.2f} s from the node-local tier, "
        f"{med(rs['s3']):.2f} s from S3. A save adds {store['memory']['ratio']:.2f}x the state's size "
        "to host memory at its peak.",
        "",
        "| ratio | value |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | {v} |" for k, v in d["ratios"].items()]
    lines += [f"| `{k}` (beside the ten) | {v} |" for k, v in d.get("ratios_beside", {}).items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

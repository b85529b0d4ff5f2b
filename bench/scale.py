"""Scale, by simulation: what grows with the cluster on the control plane alone.

    python -m bench.scale                         # 8, 64, 512, 4096 ranks on moto S3; 10,000 commits
    python -m bench.scale --quick --json out.json
    python -m bench --only scale                  # the same, through the suite's entry point

No torch, no Ray, no training: the coordinator is a plain class (`Coordinator`, which Ray
hosts as is; `RunLedger` is the same class outside an actor) over the one storage layer
(`Storage`), so this drives them directly, the way the coordinator actor runs, with
simulated ranks.

Commit, per world size N (moto's S3 server on loopback, the project's `MotoServer`):
  every rank writes its shard file of a sharded checkpoint (`__<rank>_0.distcp`, rank 0 also
  DCP's `.metadata` and `train_state.pt`; a few hundred bytes each: the control plane's cost
  is per file, not per byte) into checkpoints/<id>/, all at once through s3fs's bulk upload.
  Then, timed: rank 0, holding every rank's file list (the gather of workers/sharded.py),
  builds the record and writes checkpoint.json; the record goes to the coordinator as a dict
  (as over Ray) and is validated there; `RunLedger.commit` reads checkpoint.json back, lists
  the checkpoint's prefix (`Storage.list_sizes`, the fencing issue's `Commits._check_files`), applies
  retention and replaces manifest.json by compare-and-swap. **commit_s** is that span: the
  last rank's record in rank 0's hands -> the manifest PUT answered (durable). The call goes
  on (manifest.backup.json, the commit event, deleting what retention dropped); its whole
  time is **call_s**. Each size commits `commits` checkpoints under an owned lease (fencing
  on, as in a real run), retention top_k 2 + keep_latest 1, so the later commits delete a
  dropped checkpoint of N ranks too. S3 requests per commit are counted on the s3fs client
  (botocore's before-call event), by operation.

Run length: 10,000 commits (1,000 in --quick) of an 8-rank run on a local directory, with
the shard data simulated (the checkpoint's listing is answered from its checkpoint.json;
checkpoint.json, manifest, backup and journals are real files), 10 commits per epoch, with
retention as the spec's default (top_k 3, keep_latest 1) and with milestones
(keep_every_n_epochs 10). Reported: manifest.json's and events.jsonl's sizes as they grow.

Coordinator calls per step: the real `workers.calls.StepTicker` of every simulated rank
(rank 0 has a sender, the others none, as in workers/session.py), 0.2 s steps on a fake
clock. Calls per commit are from the code (workers/session.py, workers/writer.py).

Where the time goes: cProfile of one commit at the largest world size (top entries by
cumulative time), and the commit's storage operations by kind.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from orchestrator.coordinator import RunLedger
from orchestrator.core.lease import Lease
from orchestrator.core.manifest import (
    BACKUP,
    CHECKPOINTS,
    EVENTS,
    MANIFEST,
    METRICS,
    RECORD,
    CheckpointRecord,
    FileEntry,
)
from orchestrator.core.names import checkpoint_id
from orchestrator.core.retention import RetentionConfig
from orchestrator.core.storage import Storage, sha256_hex

QUICK = {"sizes": [8, 64, 512, 4096], "commits": 3, "long_commits": 1_000, "wide_commits": 20}
FULL = {"sizes": [8, 64, 512, 4096, 8192], "commits": 3, "long_commits": 10_000, "wide_commits": 100}
UPLOADS = 64  # shard uploads in flight from the simulation's one process
SHARD = 256  # bytes per simulated shard file
RETENTION = RetentionConfig(monitor="val_loss", mode="min", top_k=2, keep_latest=1)
TARGET_S = 0.5  # the target for a 4,096-rank commit


def say(msg: str) -> None:
    print(f"[bench.scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextlib.contextmanager
def moto_s3(work: Path) -> Iterator[str]:
    """moto's S3 server on loopback (harness/s3.py), a bucket, the environment s3fs reads."""
    import s3fs

    from harness.s3 import CREDS, MotoServer

    server = MotoServer.start(work / "moto.log")
    try:
        server.client().create_bucket(Bucket="scale")
        # fsspec caches filesystems by their options, and the endpoint comes from the
        # environment: without this, a Storage here reuses the client of an earlier moto server
        # in the same process (the suite's storage benchmark), long stopped.
        s3fs.S3FileSystem.clear_instance_cache()
        with mock.patch.dict(os.environ, {**CREDS, "AWS_ENDPOINT_URL": server.endpoint}):
            yield "s3://scale/runs"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


class Ops:
    """Every storage call of one Storage object: count and seconds by (method, what it touched),
    and when the manifest's compare-and-swap last returned (the commit's durable point)."""

    def __init__(self, storage: Storage) -> None:
        self.count: Counter[str] = Counter()
        self.secs: Counter[str] = Counter()
        self.manifest_durable_at = 0.0
        for name in (
            "read_bytes",
            "read_versioned",
            "write_if",
            "write_bytes",
            "list_sizes",
            "list_dirs",
            "delete",
            "exists",
            "append",
        ):
            setattr(storage, name, self._wrap(name, getattr(storage, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(rel: str, *args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(rel, *args, **kw)
            finally:
                t1 = time.perf_counter()
                key = f"{name} {_kind(rel)}"
                self.count[key] += 1
                self.secs[key] += t1 - t0
                if name == "write_if" and rel == MANIFEST:
                    self.manifest_durable_at = t1

        return timed

    def reset(self) -> None:
        self.count.clear()
        self.secs.clear()


def _kind(rel: str) -> str:
    if rel.startswith(CHECKPOINTS + "/"):
        return "checkpoints/<id>/" + RECORD if rel.endswith(RECORD) else "checkpoints/<id>"
    return rel or "<run>"


class Requests:
    """S3 requests made through an s3fs filesystem, by operation (botocore's before-call)."""

    def __init__(self, fs: Any) -> None:
        self.count: Counter[str] = Counter()
        if getattr(fs, "_s3", None) is None:
            fs.connect()
        fs.s3.meta.events.register("before-call.s3", self._seen)

    def _seen(self, model: Any = None, **_: Any) -> None:
        self.count[getattr(model, "name", "?")] += 1


def owned_ledger(storage: Storage, cfg: RetentionConfig = RETENTION) -> tuple[Lease, RunLedger]:
    lease = Lease(storage, ttl_s=3600, heartbeat_s=3600)
    lease.acquire()
    lease.stop_heartbeat()  # one process, no heartbeat thread: the simulation holds the lease
    return lease, RunLedger(storage, "scale", cfg, owner=lease.token)


def shard_files(world: int, attempt: int) -> list[tuple[str, bytes, int]]:
    """(name, bytes, rank) of every file a sharded checkpoint of `world` ranks holds."""
    out = [(f"__{r}_0.distcp", os.urandom(SHARD), r) for r in range(world)]
    out += [(".metadata", os.urandom(SHARD * 4), 0), ("train_state.pt", os.urandom(SHARD), 0)]
    return out


def meta(epoch: int, world: int, attempt: int, loss: float) -> dict[str, Any]:
    return {
        "id": checkpoint_id(epoch, epoch * 100, attempt),
        "epoch": epoch,
        "step_in_epoch": 0,
        "global_step": epoch * 100,
        "end_of_epoch": True,
        "metrics": {"val_loss": loss},
        "world_size": world,
        "attempt": attempt,
        "sharded": True,
    }


def one_commit(
    storage: Storage,
    ledger: RunLedger,
    ops: Ops,
    m: dict[str, Any],
    files: list[FileEntry],
    profile: cProfile.Profile | None = None,
) -> dict[str, float]:
    """Rank 0 holds every rank's file list: record -> checkpoint.json -> the coordinator's commit."""
    ledger.report_metrics({"epoch": m["epoch"], "global_step": m["global_step"], **m["metrics"]})
    ops.reset()
    if profile is not None:
        profile.enable()
    t0 = time.perf_counter()
    record = CheckpointRecord(files=files, **m)
    body = json.dumps(record.model_dump(), indent=1).encode()  # as workers/writer.py writes it
    storage.write_bytes(f"{CHECKPOINTS}/{m['id']}/{RECORD}", body)
    t_record = time.perf_counter()
    sent = record.model_dump()  # what crosses Ray to the actor
    ledger.commit(CheckpointRecord.model_validate(sent))
    t_end = time.perf_counter()
    if profile is not None:
        profile.disable()
    return {
        "record_s": t_record - t0,
        "commit_s": ops.manifest_durable_at - t0,
        "call_s": t_end - t_record,
        "record_bytes": len(body),
    }


def commit_at(root: str, world: int, commits: int, profile: bool) -> dict[str, Any]:
    """`commits` sharded checkpoints of `world` simulated ranks, committed one after the other."""
    storage = Storage(f"{root}/w{world}")
    lease, ledger = owned_ledger(storage)
    ops, requests = Ops(storage), Requests(storage.fs)
    attempt = ledger.start_attempt(world)["attempt"]
    out: dict[str, Any] = {"world": world, "commits": []}
    rng = random.Random(world)
    prof = cProfile.Profile() if profile else None
    for c in range(1, commits + 1):
        m = meta(c, world, attempt, loss=1.0 / c + rng.random() * 0.5)
        blobs = shard_files(world, attempt)
        t0 = time.perf_counter()
        base = storage.path(f"{CHECKPOINTS}/{m['id']}")
        # Every rank at once, at most UPLOADS requests in flight: more made moto's server on
        # loopback refuse connections (a limit of this simulation's one client, not of S3).
        storage.fs.pipe({f"{base}/{name}": data for name, data, _ in blobs}, batch_size=UPLOADS)
        write_s = time.perf_counter() - t0
        files = [FileEntry(path=n, size=len(d), sha256=sha256_hex(d), rank=r) for n, d, r in blobs]
        requests.count.clear()
        last = c == commits
        row = one_commit(storage, ledger, ops, m, files, prof if last else None)
        row |= {
            "ranks_write_s": write_s,
            "s3_requests": dict(requests.count),
            "storage_ops": dict(ops.count),
            "storage_s": {k: round(v, 4) for k, v in ops.secs.items()},
            "manifest_bytes": len(storage.read_bytes(MANIFEST)),
            "kept": len(ledger.manifest.checkpoints),
        }
        out["commits"].append(row)
        say(
            f"{world} ranks, commit {c}: {row['commit_s'] * 1e3:.0f} ms to a durable manifest "
            f"({row['call_s'] * 1e3:.0f} ms the whole call), manifest {row['manifest_bytes'] / 1e3:.0f} kB, "
            f"{sum(row['s3_requests'].values())} S3 requests; ranks' upload {write_s:.1f}s"
        )
    steady = out["commits"][1:] or out["commits"]  # the first has nothing to drop yet
    out["commit_s"] = statistics.median(r["commit_s"] for r in steady)
    out["call_s"] = statistics.median(r["call_s"] for r in steady)
    out["manifest_bytes"] = out["commits"][-1]["manifest_bytes"]
    out["record_bytes"] = out["commits"][-1]["record_bytes"]
    if prof is not None:
        out["profile"] = top_entries(prof)
    out["listing"] = listing(storage, f"{CHECKPOINTS}/{m['id']}")
    lease.release()
    return out


def listing(storage: Storage, rel: str) -> dict[str, float]:
    """The commit's listing check alone, and the first page's server time (a bare HTTP GET to the
    server, no XML parsing): how much of a listing is the server's and how much the client's."""
    import urllib.request

    bucket, key, _ = storage.fs.split_path(storage.path(rel))
    t0 = time.perf_counter()
    n = len(storage.list_sizes(rel))
    t1 = time.perf_counter()
    url = f"{os.environ['AWS_ENDPOINT_URL']}/{bucket}?list-type=2&prefix={key}/"
    with urllib.request.urlopen(url) as r:  # moto takes any credentials; an unsigned GET too
        r.read()
    t2 = time.perf_counter()
    return {"files": n, "pages": -(-n // 1000), "list_sizes_s": t1 - t0, "server_first_page_s": t2 - t1}


def top_entries(prof: cProfile.Profile, n: int = 15) -> list[str]:
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("cumulative").print_stats(n)
    lines = [ln.rstrip() for ln in buf.getvalue().splitlines()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return [ln for ln in lines[start:] if ln.strip()]


class _SimulatedData(Storage):
    """A local run directory whose checkpoints' shard files are not written: the listing of a
    checkpoint is answered from its checkpoint.json (real, as are the manifest and journals)."""

    def list_sizes(self, rel: str) -> dict[str, int]:
        real = super().list_sizes(rel)
        if RECORD not in real:
            return real
        rec = json.loads(self.read_bytes(f"{rel}/{RECORD}"))
        return {f["path"]: f["size"] for f in rec["files"]} | real


def long_run(work: Path, world: int, commits: int, milestones: int | None) -> dict[str, Any]:
    """`commits` commits of a `world`-rank run, 10 per epoch; the manifest's size as it grows."""
    cfg = RetentionConfig(
        monitor="val_loss", mode="min", top_k=3, keep_latest=1, keep_every_n_epochs=milestones
    )
    storage = _SimulatedData(str(work / f"long-w{world}-m{milestones}"))
    lease, ledger = owned_ledger(storage, cfg)
    attempt = ledger.start_attempt(world)["attempt"]
    rng = random.Random(0)
    files = [FileEntry(path=f"__{r}_0.distcp", size=SHARD, sha256="0" * 64, rank=r) for r in range(world)]
    files += [FileEntry(path=".metadata", size=SHARD * 4, sha256="1" * 64, rank=0)]
    samples: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    per_epoch = 10
    for c in range(1, commits + 1):
        epoch, step = (c - 1) // per_epoch + 1, c
        end = c % per_epoch == 0
        loss = 1.0 / epoch + rng.random() * 0.1
        m = {
            "id": checkpoint_id(epoch, step, attempt),
            "epoch": epoch,
            "step_in_epoch": 0 if end else step,
            "global_step": step,
            "end_of_epoch": end,
            "metrics": {"val_loss": loss},
            "metrics_fresh": end,
            "world_size": world,
            "attempt": attempt,
            "sharded": True,
        }
        record = CheckpointRecord(files=files, **m)
        storage.write_bytes(f"{CHECKPOINTS}/{m['id']}/{RECORD}", json.dumps(record.model_dump()).encode())
        ledger.report_metrics({"epoch": epoch, "global_step": step, "val_loss": loss})
        t0 = time.perf_counter()
        ledger.commit(record)
        dt = time.perf_counter() - t0
        if c in (1, 10, 100, 1_000, 10_000) or c == commits:
            samples.append(
                {
                    "commits": c,
                    "call_s": dt,
                    "kept": len(ledger.manifest.checkpoints),
                    "manifest_bytes": os.path.getsize(storage.path(MANIFEST)),
                    "backup_bytes": os.path.getsize(storage.path(BACKUP)),
                    "events_bytes": os.path.getsize(storage.path(EVENTS)),
                    "metrics_bytes": os.path.getsize(storage.path(METRICS)),
                }
            )
    out = {
        "world": world,
        "commits": commits,
        "keep_every_n_epochs": milestones,
        "samples": samples,
        "seconds": time.perf_counter() - t_start,
    }
    s = samples[-1]
    say(
        f"{commits} commits of {world} ranks, milestones {milestones}: manifest "
        f"{s['manifest_bytes'] / 1e3:.1f} kB "
        f"({s['kept']} kept), events.jsonl {s['events_bytes'] / 1e6:.2f} MB, metrics.jsonl "
        f"{s['metrics_bytes'] / 1e3:.0f} kB, {out['seconds']:.0f}s"
    )
    return out


def calls_per_step(world: int, steps: int = 500, step_s: float = 0.2) -> dict[str, Any]:
    """Coordinator calls of `world` ranks over `steps` steps, through the real StepTicker."""
    from workers.calls import StepTicker

    sent: Counter[int] = Counter()
    now = [1000.0]
    tickers = [StepTicker((lambda at, r=r: sent.update([r])) if r == 0 else None) for r in range(world)]
    with mock.patch("workers.calls.time.time", lambda: now[0]):
        for step in range(1, steps + 1):
            for t in tickers:
                t(1, step, steps, step)
            now[0] += step_s
    total = sum(sent.values())
    return {
        "world": world,
        "steps": steps,
        "step_s": step_s,
        "calls": total,
        "per_step": total / steps,
        "ranks_calling": len(sent),
    }


# Calls to the coordinator per checkpoint, read from the code: rank 0's report_metrics
# (workers/session.py report_metrics), commit (workers/writer.py, after checkpoint.json) and
# stop_asked (Session.report, a save without step() ticks); every other rank makes none (its
# file list reaches rank 0 by a collective, workers/sharded.py save_shards).
CALLS_PER_COMMIT = {"rank 0": ["report_metrics", "commit", "stop_asked"], "other ranks": []}


def run(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "config": cfg,
        "commit": [],
        "long": [],
        "per_step": [],
        "calls_per_commit": CALLS_PER_COMMIT,
    }
    with moto_s3(work) as root:
        for world in cfg["sizes"]:
            try:
                out["commit"].append(commit_at(root, world, cfg["commits"], profile=world == 4096))
            except Exception as e:  # noqa: BLE001  # what broke, and at what size
                out["broke"] = {"world": world, "error": f"{type(e).__name__}: {e}"[:2000]}
                say(f"{world} ranks: broke: {out['broke']['error']}")
                break
    for milestones in (None, 10):
        out["long"].append(long_run(work, 8, cfg["long_commits"], milestones))
    # The same retention at 4,096 ranks, until the kept set is full: past that the manifest holds
    # the same number of records whatever the number of commits, each as wide as the world.
    out["long"].append(long_run(work, 4096, cfg["wide_commits"], None))
    out["per_step"] = [calls_per_step(w) for w in cfg["sizes"]]
    at = {r["world"]: r for r in out["commit"]}
    out["commit_s_at_4096_ranks"] = round(at[4096]["commit_s"], 4) if 4096 in at else None
    return out


def tables(d: dict[str, Any]) -> str:
    lines = [
        "| ranks | commit: last record -> manifest durable, ms | whole commit call, ms | S3 requests per "
        "commit | checkpoint.json | manifest.json | ranks' upload (s3fs bulk), s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in d["commit"]:
        last = r["commits"][-1]
        each = ", ".join(f"{c['commit_s'] * 1e3:.0f}" for c in r["commits"])
        upload = statistics.median(c["ranks_write_s"] for c in r["commits"])
        lines.append(
            f"| {r['world']} | {r['commit_s'] * 1e3:.0f} ({each}) | {r['call_s'] * 1e3:.0f} "
            f"| {sum(last['s3_requests'].values())} | {r['record_bytes'] / 1e3:.0f} kB "
            f"| {r['manifest_bytes'] / 1e3:.0f} kB | {upload:.1f} |"
        )
    if b := d.get("broke"):
        lines.append(f"| {b['world']} | broke: {b['error'][:200]} | | | | | |")
    lines += [
        "",
        "| ranks | commits (10 per epoch) | retention | kept | manifest.json | events.jsonl "
        "| metrics.jsonl | whole commit call, ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lr in d["long"]:
        every = lr["keep_every_n_epochs"]
        ret = "top_k 3, keep_latest 1" + (f", every {every} epochs" if every else "")
        for s in lr["samples"]:
            lines.append(
                f"| {lr['world']} | {s['commits']:,} | {ret} | {s['kept']} "
                f"| {s['manifest_bytes'] / 1e3:.1f} kB "
                f"| {s['events_bytes'] / 1e3:.0f} kB | {s['metrics_bytes'] / 1e3:.0f} kB "
                f"| {s['call_s'] * 1e3:.1f} |"
            )
    lines += [
        "",
        "| ranks | coordinator calls per step (0.2 s steps, 500 steps) | ranks that call |",
        "|---|---|---|",
    ]
    lines += [f"| {p['world']} | {p['per_step']:.2f} | {p['ranks_calling']} |" for p in d["per_step"]]
    lines += [
        "",
        "| ranks | the listing check alone (list_sizes), ms | pages of 1,000 | moto's server time "
        "for the first page, ms |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['world']} | {r['listing']['list_sizes_s'] * 1e3:.0f} | {r['listing']['pages']} | "
        f"{r['listing']['server_first_page_s'] * 1e3:.0f} |"
        for r in d["commit"]
    ]
    big = next((r for r in d["commit"] if "profile" in r), None)
    if big:
        last = big["commits"][-1]
        lines += ["", f"Storage operations of one {big['world']}-rank commit (count, seconds):", ""]
        lines += [
            f"- {k}: {n}, {last['storage_s'].get(k, 0):.3f}s" for k, n in sorted(last["storage_ops"].items())
        ]
        lines += [f"- S3 requests: {', '.join(f'{k} {v}' for k, v in sorted(last['s3_requests'].items()))}"]
        lines += ["", "cProfile, the same commit, by cumulative time:", "", "```", *big["profile"], "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick", action="store_true", help=f"sizes {QUICK['sizes']}, {QUICK['long_commits']} commits"
    )
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], help="world sizes, e.g. 8,4096")
    ap.add_argument("--long-commits", type=int, help="commits of the run-length simulation")
    ap.add_argument("--json", dest="json_path", help="write commit_s_at_4096_ranks here")
    ap.add_argument("--results", help="write every sample here")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.sizes:
        cfg["sizes"] = args.sizes
    if args.long_commits:
        cfg["long_commits"] = args.long_commits
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        d = run(cfg, Path(tmp))
    if args.results:
        Path(args.results).write_text(json.dumps(d, indent=1) + "\n")
    keys = {"commit_s_at_4096_ranks": d["commit_s_at_4096_ranks"]}
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(keys, indent=2) + "\n")
    print(tables(d))
    print(json.dumps(keys, indent=2))
    return d


if __name__ == "__main__":
    main()

"""Restore from the node-local tier vs from shared storage, and the host memory a save adds.

    python -m bench.storage_tiers                       # 128 MB state, local dir and moto S3
    python -m bench.storage_tiers --mb 64 --repeats 3 --no-s3 --json out.json

Restore: one checkpoint (model.pt + train_state.pt, --mb in all) is saved through the
project's CheckpointWriter, then read back the way a resuming rank reads it
(`read_verified`: every byte hashed against the record), from three places, interleaved
round by round: this node's copy (the node-local tier), shared storage in a local directory
(no tier), and shared storage on moto's S3 server on loopback (no tier). Reported: the
median seconds of each and the ratios shared / tier.

Memory: each variant saves the same state once, in a fresh process, while a thread samples
the process's RSS (psutil, every millisecond; the kernel's ru_maxrss as a check). Reported:
(peak RSS during the save - RSS before it) / the state's bytes. The save's host buffers are
a copy of the state, so 1.0 is the floor of a background save. Variants: the writer with the
node-local tier (the default), the writer straight into shared storage (no tier), and the
serialization this project used before (torch.save into a BytesIO, .getvalue(), then one
write), for comparison.

Absolute times depend on the machine and its load; compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import psutil
import torch

from orchestrator.core.manifest import CHECKPOINTS, RECORD, CheckpointRecord, FileEntry
from orchestrator.core.node_cache import NodeCache
from orchestrator.core.storage import Storage, sha256_hex
from orchestrator.core.verify import read_verified
from workers.writer import CheckpointWriter, SaveJob

ROOT = Path(__file__).resolve().parent.parent

MB = 1 << 20
META = {
    "id": "epoch0001-step0000010-a1",
    "epoch": 1,
    "step_in_epoch": 0,
    "global_step": 10,
    "end_of_epoch": True,
    "world_size": 1,
    "attempt": 1,
}


def make_state(mb: int) -> dict[str, Any]:
    """Weights (a third) and two Adam-like moments (two thirds), in 8 MB tensors."""
    n = mb * MB // 4 // 3 // (2 * MB) or 1

    def tensors() -> list[torch.Tensor]:
        return [torch.randn(2 * MB) for _ in range(n)]

    return {
        "model.pt": {f"w{i}": t for i, t in enumerate(tensors())},
        "train_state.pt": {"exp_avg": tensors(), "exp_avg_sq": tensors(), "step": 10},
    }


def state_bytes(tree: Any) -> int:
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(state_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(state_bytes(v) for v in tree)
    return 0


class InMemoryWriter(CheckpointWriter):
    """The serialization this project used before streaming: each file built in memory."""

    def _write(self, job: SaveJob) -> None:
        self._buffers.wait()
        blobs = {}
        for name, tree in job.payload.items():
            buf = io.BytesIO()
            torch.save(tree, buf)
            blobs[name] = buf.getvalue()
        self._free.set()
        cid, files = job.meta["id"], []
        for name, data in blobs.items():
            self.storage.write_bytes(f"{CHECKPOINTS}/{cid}/{name}", data)
            files.append(FileEntry(path=name, size=len(data), sha256=sha256_hex(data)))
        record = CheckpointRecord(files=files, **job.meta)
        self.storage.write_bytes(f"{CHECKPOINTS}/{cid}/{RECORD}", record.model_dump_json().encode())
        self.commit(record)


def open_storage(uri: str, tier_dir: str | None) -> Storage:
    s = Storage(uri)
    if tier_dir:
        s.node_cache = NodeCache(tier_dir, uri)
    return s


def save(storage: Storage, state: dict[str, Any], legacy: bool = False) -> CheckpointRecord:
    commits: list[CheckpointRecord] = []
    writer = (InMemoryWriter if legacy else CheckpointWriter)(storage, commits.append)
    writer.save(META, state)
    writer.close()
    return commits[0]


# -- memory: one variant per fresh process -------------------------------------------------
def measure_memory(variant: str, mb: int, uri: str, tier_dir: str) -> dict[str, float]:
    state = make_state(mb)
    storage = open_storage(uri, tier_dir if variant == "tier" else None)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, done = [rss0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    save(storage, state, legacy=variant == "in_memory")
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    added = max(peak[0] - rss0, maxrss - max(maxrss0, rss0))
    size = state_bytes(state)
    return {"state_mb": size / MB, "added_mb": added / MB, "ratio": added / size, "save_s": seconds}


def memory_in_subprocess(variant: str, mb: int, uri: str, tier_dir: str) -> dict[str, float]:
    code = (
        "import json; from bench import storage_tiers as b; "
        f"print(json.dumps(b.measure_memory({variant!r}, {mb}, {uri!r}, {tier_dir!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- restore ------------------------------------------------------------------------------
def timed_restore(storage: Storage, record: CheckpointRecord) -> float:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # read_verified says where it read from
        blobs = read_verified(storage, record)
    elapsed = time.perf_counter() - t0
    assert sum(len(b) for b in blobs.values()) == sum(f.size for f in record.files)
    return elapsed


@contextlib.contextmanager
def moto_s3(workdir: Path) -> Any:
    from harness.s3 import CREDS, MotoServer

    server = MotoServer.start(workdir / "moto.log")
    try:
        server.client().create_bucket(Bucket="bench")
        with mock.patch.dict(os.environ, {**CREDS, "AWS_ENDPOINT_URL": server.endpoint}):
            yield "s3://bench/runs/tiers"
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=128, help="State size in MB (weights + two moments).")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true", help="Skip moto S3.")
    ap.add_argument("--json", default=None, help="Also write the results to this file.")
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        s3_uri = None if args.no_s3 else stack.enter_context(moto_s3(work))
        state = make_state(args.mb)
        size = state_bytes(state)
        print(f"state: {size / MB:.0f} MB in {sum(1 for _ in state['model.pt'])} + 2x tensors", flush=True)

        # Restore: one save with the tier into each shared storage, then interleaved reads.
        sources: dict[str, tuple[Storage, CheckpointRecord]] = {}
        local = open_storage(str(work / "shared" / "tiers"), str(work / "tier-local"))
        record = save(local, state)
        sources["node_local_tier"] = (local, record)
        sources["shared_local_dir"] = (Storage(local.uri), record)
        if s3_uri:
            s3 = open_storage(s3_uri, str(work / "tier-s3"))
            sources["shared_s3"] = (Storage(s3_uri), save(s3, state))
        del state
        times: dict[str, list[float]] = {k: [] for k in sources}
        for r in range(args.repeats):
            for name, (storage, rec) in sources.items():
                times[name].append(timed_restore(storage, rec))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}

        memory = {}
        for variant in ("tier", "straight", "in_memory"):
            memory[variant] = memory_in_subprocess(
                variant, args.mb, str(work / f"mem-{variant}"), str(work / "mem-tier")
            )
            m = memory[variant]
            print(
                f"memory {variant}: +{m['added_mb']:.0f} MB over a {m['state_mb']:.0f} MB state "
                f"({m['ratio']:.2f}x)",
                flush=True,
            )

    report: dict[str, Any] = {
        "state_mb": round(size / MB, 1),
        "repeats": args.repeats,
        "restore_s_median": {k: round(v, 3) for k, v in med.items()},
        "restore_shared_dir_vs_local": round(med["shared_local_dir"] / med["node_local_tier"], 2),
        "peak_host_mem_vs_state": round(memory["tier"]["ratio"], 2),
        "peak_host_mem_vs_state_no_tier": round(memory["straight"]["ratio"], 2),
        "peak_host_mem_vs_state_in_memory_serialization": round(memory["in_memory"]["ratio"], 2),
        "memory": memory,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if "shared_s3" in med:
        report["restore_local_vs_s3"] = round(med["shared_s3"] / med["node_local_tier"], 2)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

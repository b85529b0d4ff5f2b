"""Replicas mode's process group, heal transport, timeouts and NCCL environment by device
(workers/replica_comms.py): the pure choice as a table, the gloo backend for CPU tensors on a
real process group, and bench/gpu_check.py's replicas check (two torchft replica groups, a
real SIGKILL, a heal) run on CPU. The NCCL half needs a GPU: `python bench/gpu_check.py
--only replicas` on a machine that has one."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from workers.replica_comms import GLOO, HTTP, NCCL_GLOO, PG, Comms, add_gloo_for_cpu, replica_comms

ROOT = Path(__file__).resolve().parents[1]

NCCL_DEFAULT = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
    "TORCH_NCCL_NONBLOCKING_TIMEOUT": "30",
    "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "75",
    "TORCH_NCCL_BLOCKING_WAIT": "0",
}


@pytest.mark.parametrize(
    ("device", "timeout", "quorum", "expect"),
    [
        # cpu: exactly what replicas mode ran before GPUs (gloo, torchft's default HTTP heals)
        ("cpu", 30.0, 120.0, Comms(GLOO, HTTP, 30.0, {})),
        ("cpu", 300.0, 120.0, Comms(GLOO, HTTP, 300.0, {})),  # gloo's dead peer fails at once
        # cuda: NCCL + gloo, PGTransport; the spec's defaults keep their 30 s
        ("cuda", 30.0, 120.0, Comms(NCCL_GLOO, PG, 30.0, NCCL_DEFAULT)),
        # a collective timeout past half the quorum's is cut to half
        (
            "cuda",
            100.0,
            120.0,
            Comms(
                NCCL_GLOO,
                PG,
                60.0,
                {
                    **NCCL_DEFAULT,
                    "TORCH_NCCL_NONBLOCKING_TIMEOUT": "60",
                    "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "90",
                },
            ),
        ),
        (
            "cuda",
            2.5,
            10.0,
            Comms(
                NCCL_GLOO,
                PG,
                2.5,
                {
                    **NCCL_DEFAULT,
                    "TORCH_NCCL_NONBLOCKING_TIMEOUT": "3",
                    "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "6",
                },
            ),
        ),
    ],
)
def test_the_comms_of_a_replica_by_device(device, timeout, quorum, expect):
    assert replica_comms(device, timeout, quorum) == expect


@pytest.mark.parametrize("timeout", [1.0, 5.0, 30.0, 59.0, 60.0, 61.0, 600.0, 3600.0])
@pytest.mark.parametrize("quorum", [2.0, 10.0, 120.0, 3600.0])
def test_on_cuda_every_nccl_timeout_is_below_the_quorum_timeout(timeout, quorum):
    c = replica_comms("cuda", timeout, quorum)
    assert c.timeout_s <= quorum / 2 and c.timeout_s <= timeout
    assert c.timeout_s <= int(c.env["TORCH_NCCL_NONBLOCKING_TIMEOUT"]) < quorum  # whole seconds, rounded up
    # the watchdog's backstop: past an abort at the collective timeout, before the quorum's
    assert c.timeout_s <= int(c.env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) < quorum


def test_a_device_neither_cpu_nor_cuda_is_refused():
    with pytest.raises(ValueError, match="no process group for device 'mps'"):
        replica_comms("mps", 30.0, 120.0)


def test_cpu_tensors_go_through_the_gloo_backend_added_beside_the_device_one():
    """The NCCL group's companion, on CPU: a process group of two ranks, gloo registered for
    CPU tensors under its own prefix of the store, all-reduces the word (float64) exactly."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    out: dict[int, list[float]] = {}

    def rank(r: int) -> None:
        client = dist.TCPStore("127.0.0.1", store.port, is_master=False)
        pg = add_gloo_for_cpu(dist.ProcessGroup(client, r, 2), client, r, 2, timedelta(seconds=20))
        word = torch.tensor([1.0, 7.0 * r, 0.5], dtype=torch.float64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        pg.allreduce([word], opts).wait()
        out[r] = word.tolist()
        pg.abort()  # what torchft's reconfigure does to the old group at each new quorum

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == {0: [2.0, 7.0, 1.0], 1: [2.0, 7.0, 1.0]}


def test_gpu_check_replicas_heal_exactly_on_cpu(tmp_path):
    """bench/gpu_check.py's replicas check as a GPU session runs it, here with --device cpu.
    It waits about 20 s: a lighthouse, two replica processes, one SIGKILLed, the survivor
    training alone while a replacement process imports torch and torchft, then the heal."""
    pytest.importorskip("torchft")
    out = tmp_path / "r.json"
    cmd = [sys.executable, "bench/gpu_check.py", "--only", "replicas", "--device", "cpu", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "healed_bitwise_equal True" in done.stdout and "final_bitwise_equal True" in done.stdout
    got = json.loads(out.read_text())["replicas"]
    assert got["comms"].startswith("torchft-gloo pg, http heals")
    assert got["healed_at_step"][0] == got["healed_at_step"][1] > 5  # after the kill
    assert got["exit_codes"] == [0, 0]

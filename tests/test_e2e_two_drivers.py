"""Two drivers on one run, against the moto S3 server, with real processes: two started in
the same second (one is refused), then a takeover after the owner stalls (SIGSTOP past its
lease TTL). Afterwards every checkpoint the final manifest names exists and verifies,
nothing the winner committed was deleted, and the stalled driver exits with the takeover
error."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from harness.cli import cli_env, start_cli, wait_until
from orchestrator.core.manifest import read_manifest
from orchestrator.core.storage import Storage
from orchestrator.core.verify import read_verified

pytestmark = pytest.mark.e2e


def test_two_drivers_then_a_takeover_after_a_stall(s3_env, bucket, tmp_path, kill_group):
    env = cli_env(**s3_env)
    uri = f"s3://{bucket}/runs/duel"
    args = (
        "configs/digits.yaml",
        "--address",
        "local",
        "--set",
        f"storage.root=s3://{bucket}/runs",
        "--set",
        "name=duel",
        "--set",
        "chaos.kills=[]",
        "--set",
        "scaling.num_workers=1",
        "--set",
        "epochs=14",
        "--set",
        "failure.lease_ttl_s=3",
        "--set",
        "failure.max_failures=1",
    )
    first = [start_cli("run", *args, log=tmp_path / f"d{i}.log", env=env) for i in range(2)]
    for p in first:
        kill_group(p)
    # Within seconds one of the two is refused: the lease is created with If-None-Match: *.
    wait_until(lambda: any(p.poll() is not None for p in first), 120, "one driver refused")
    loser = next(p for p in first if p.poll() is not None)
    a = next(p for p in first if p is not loser)
    lost_log = (tmp_path / f"d{first.index(loser)}.log").read_text()
    assert loser.returncode == 3, lost_log[-3000:]
    assert "in use by driver" in lost_log or "was just taken by" in lost_log

    direct = Storage(uri)
    wait_until(lambda: (m := read_manifest(direct)) is not None and len(m.checkpoints) >= 2, 300, "2 commits")
    os.kill(a.pid, signal.SIGSTOP)  # A stalls: its heartbeat stops, its workers go on
    time.sleep(6)  # past the 3 s TTL by the storage's clock
    b = start_cli("resume", uri, "--address", "local", "--json", log=tmp_path / "b.log", env=env)
    kill_group(b)
    wait_until(
        lambda: (
            b"attempt" in (tmp_path / "b.log").read_bytes()
            or b.poll() is not None
            or _events(direct, "lease_taken_over")
        ),
        180,
        "B took over",
    )
    wait_until(
        lambda: (
            b.poll() is not None or any(e.get("attempt", 0) > 1 for e in _events(direct, "attempt_started"))
        ),
        240,
        "B's first attempt",
    )
    os.kill(a.pid, signal.SIGCONT)  # A wakes up to a run that is no longer its own
    assert a.wait(timeout=300) == 3, (tmp_path / f"d{first.index(a)}.log").read_text()[-4000:]
    a_log = (tmp_path / f"d{first.index(a)}.log").read_text()
    assert "taken over by driver" in a_log, a_log[-4000:]
    assert b.wait(timeout=600) == 0, (tmp_path / "b.log").read_text()[-4000:]

    final = read_manifest(direct)
    assert final.status == "finished"
    assert _events(direct, "lease_taken_over"), "B did not take the lease over"
    for c in final.checkpoints:
        read_verified(direct, c)  # exists and verifies
    b_attempts = {e["attempt"] for e in _events(direct, "attempt_started") if e["ts"] >= _started(direct)}
    b_commits = {e["id"] for e in _events(direct, "commit") if int(e["id"].rsplit("-a", 1)[1]) in b_attempts}
    deleted = {e["id"]: e["why"] for e in _events(direct, "delete")}
    kept = {c.id for c in final.checkpoints}
    for cid in b_commits:
        assert cid in kept or deleted.get(cid) == "retention", (cid, deleted.get(cid))
    metrics = [json.loads(x) for x in direct.read_bytes("metrics.jsonl").decode().splitlines()]
    assert [r["epoch"] for r in metrics] == list(range(1, 15))


def _events(storage: Storage, kind: str) -> list[dict]:
    try:
        lines = storage.read_bytes("events.jsonl").decode().splitlines()
    except FileNotFoundError:
        return []
    return [e for e in (json.loads(x) for x in lines if x.strip()) if e["kind"] == kind]


def _started(storage: Storage) -> float:
    """When the takeover driver (B) started: the driver_started event with resume=True."""
    return next(e["ts"] for e in _events(storage, "driver_started") if e["resume"])

"""One driver per run: the lease refuses a second live owner and takes over a stale one."""

import json
import os
import subprocess
import sys
import time

import pytest

from orchestrator.core.lease import LEASE, Lease, LeaseHeld
from orchestrator.core.storage import Storage


def test_second_owner_is_refused_with_who_and_since(tmp_path):
    s = Storage(str(tmp_path))
    first = Lease(s, ttl_s=30, heartbeat_s=0.1)
    first.acquire()
    try:
        with pytest.raises(LeaseHeld) as e:
            Lease(Storage(str(tmp_path)), ttl_s=30).acquire()
        msg = str(e.value)
        assert f"driver pid {first.pid} on {first.host}" in msg and "since " in msg
        beat = json.loads(s.read_bytes(LEASE))["heartbeat"]
        time.sleep(0.35)
        assert json.loads(s.read_bytes(LEASE))["heartbeat"] > beat  # the heartbeat runs
    finally:
        first.release()
    assert not s.exists(LEASE)


def test_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    s = Storage(str(tmp_path))
    p = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(p.stdout)
    held = Lease(s)
    # As a driver of this version writes it: with its pid namespace (a lease that does not
    # say whose namespace its pid is in waits for its TTL: tests/test_fencing.py).
    s.write_bytes(
        LEASE,
        json.dumps(
            {
                "host": held.host,
                "pid": dead,
                "pid_ns": held.pid_ns,
                "token": "x",
                "since": time.time(),
                "heartbeat": time.time(),
            }
        ).encode(),
    )
    held.acquire()
    try:
        assert held.events[0]["kind"] == "lease_taken_over"
        assert held.events[0]["previous_pid"] == dead and "is gone" in held.events[0]["why"]
    finally:
        held.release()


def test_lease_without_heartbeat_past_ttl_is_taken_over(tmp_path):
    s = Storage(str(tmp_path))
    s.write_bytes(
        LEASE,
        json.dumps(
            {"host": "other-host", "pid": 1, "token": "x", "since": 0, "heartbeat": time.time() - 120}
        ).encode(),
    )
    old = time.time() - 120  # staleness is the object's age by the storage's clock
    os.utime(tmp_path / LEASE, (old, old))
    lease = Lease(s, ttl_s=30)
    lease.acquire()
    try:
        assert "no heartbeat for 120s" in lease.events[0]["why"]
        assert json.loads(s.read_bytes(LEASE))["token"] == lease.token
    finally:
        lease.release()


def test_live_lease_on_another_host_is_respected(tmp_path):
    s = Storage(str(tmp_path))
    s.write_bytes(
        LEASE,
        json.dumps(
            {"host": "other-host", "pid": 1, "token": "x", "since": 0, "heartbeat": time.time()}
        ).encode(),
    )
    with pytest.raises(LeaseHeld, match="on other-host"):
        Lease(s, ttl_s=30).acquire()


def test_a_lease_deleted_under_its_owner_is_written_again_not_lost(tmp_path):
    s = Storage(str(tmp_path))
    lease = Lease(s, heartbeat_s=60)
    lease.acquire()
    s.delete(LEASE)  # a stale previous owner's release, racing the takeover
    lease.beat()
    assert lease.lost is None and json.loads(s.read_bytes(LEASE))["token"] == lease.token
    lease.release()

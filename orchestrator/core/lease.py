"""One driver per run: a lease object in RUN_URI with a heartbeat.

A second driver on a run whose owner is alive is refused, told who holds it and
since when. A lease whose heartbeat is older than its TTL, or whose owner is a
process on this host that no longer exists, is stale and is taken over (and the
takeover is logged as an event). Object stores give no compare-and-swap here, so
two drivers starting within the same instant can both win; the lease guards
against the common case (a second `run`/`resume` on a live run), not that race.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from orchestrator.core.procs import pid_alive
from orchestrator.core.storage import Storage

LEASE = "lease.json"


class LeaseHeld(RuntimeError):
    """Another live driver owns this run."""


class Lease:
    def __init__(self, storage: Storage, ttl_s: float = 30.0, heartbeat_s: float = 5.0) -> None:
        self.storage = storage
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.token = uuid.uuid4().hex
        self.since = time.time()
        self.events: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        if not self.storage.exists(LEASE):
            return None
        try:
            return dict(json.loads(self.storage.read_bytes(LEASE)))
        except (json.JSONDecodeError, TypeError):
            return None

    def is_stale(self, held: dict[str, Any], now: float) -> str | None:
        """Why held is stale, or None while its owner is alive."""
        age = now - float(held.get("heartbeat", 0))
        if age > self.ttl_s:
            return f"no heartbeat for {age:.0f}s (ttl {self.ttl_s:.0f}s)"
        if held.get("host") == self.host and not pid_alive(int(held.get("pid", -1))):
            return f"owner pid {held.get('pid')} on this host is gone"
        return None

    def acquire(self) -> None:
        now = time.time()
        held = self.read()
        if held and held.get("token") != self.token:
            why = self.is_stale(held, now)
            if why is None:
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("since", 0)))
                raise LeaseHeld(
                    f"{self.storage.uri} is in use by driver pid {held.get('pid')} on "
                    f"{held.get('host')} since {since} (heartbeat {now - held['heartbeat']:.0f}s ago). "
                    "Stop it first, or wait for its lease to expire "
                    f"({self.ttl_s:.0f}s after its last heartbeat)."
                )
            self.events.append(
                {
                    "kind": "lease_taken_over",
                    "previous_pid": held.get("pid"),
                    "previous_host": held.get("host"),
                    "why": why,
                }
            )
        self._write()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        body = {
            "host": self.host,
            "pid": self.pid,
            "token": self.token,
            "since": self.since,
            "heartbeat": time.time(),
            "ttl_s": self.ttl_s,
        }
        self.storage.write_bytes(LEASE, json.dumps(body).encode())

    def _beat(self) -> None:
        failing = False
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write()
                if failing:
                    print("[lease] heartbeat restored", flush=True)
                failing = False
            except Exception as e:  # storage trouble: the next beat tries again
                if not failing:
                    print(f"[lease] heartbeat failing ({type(e).__name__}); retrying", flush=True)
                failing = True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 1)
        try:
            held = self.read()
            if held and held.get("token") == self.token:
                self.storage.delete(LEASE)
        except Exception:
            pass  # a stale lease is taken over by the next driver anyway

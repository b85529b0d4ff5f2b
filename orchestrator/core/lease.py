"""One driver per run: a lease object in RUN_URI, replaced only by compare-and-swap.

A second driver on a run whose owner is alive is refused, told who holds it and since
when. A lease that has not been renewed for its TTL (judged by the storage's clock: the
object's age against the store's "now", never one host's clock against another's; on a
local or shared filesystem "now" is the mtime of a probe file written beside the lease), or
whose owner is a process this one can see is gone (same host and pid namespace, the pid not
running or recycled: its start time differs), is stale and may be taken over (logged as an
event). An owner in another pid namespace under the same host name waits out its TTL.

Every write is conditional (docs/storage.md): creating the lease succeeds only if none
exists, and each heartbeat or takeover replaces exactly the version last read. So of two
drivers starting in the same instant one wins, and a driver that stalled past its TTL
finds out at its next beat that it lost the run (`lost` says to whom) instead of
overwriting the new owner's lease.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from orchestrator.core.errors import OwnedElsewhere
from orchestrator.core.procs import pid_alive, pid_namespace, start_time
from orchestrator.core.storage import Conflict, Storage

log = logging.getLogger(__name__)

LEASE = "lease.json"


class LeaseHeld(OwnedElsewhere, RuntimeError):
    """Another live driver owns this run."""


class LeaseLost(LeaseHeld):
    """This driver (or its coordinator) lost the run to another driver: it stops, deleting nothing."""


def describe(held: dict[str, Any] | None) -> str:
    if not held:
        return "another driver (its lease is gone)"
    return f"driver pid {held.get('pid')} on {held.get('host')}"


def holder(storage: Storage) -> dict[str, Any] | None:
    """The lease as stored now, or None."""
    v = storage.read_versioned(LEASE)
    return _parse(v.data) if v else None


class Lease:
    def __init__(
        self,
        storage: Storage,
        ttl_s: float = 30.0,
        heartbeat_s: float = 5.0,
        on_lost: Callable[[str], Any] | None = None,
    ) -> None:
        self.storage = storage
        self.on_lost = on_lost
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.pid_ns = pid_namespace()
        self.pid_start = start_time(self.pid)
        self.token = uuid.uuid4().hex
        self.since = time.time()
        self.events: list[dict[str, Any]] = []
        self.lost: str | None = None  # set when a heartbeat finds the lease taken over
        self._version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        return holder(self.storage)

    def is_stale(self, held: dict[str, Any], age_s: float) -> str | None:
        """Why held is stale, or None while its owner is alive."""
        ttl = float(held.get("ttl_s", self.ttl_s))
        if age_s > ttl:
            return f"no heartbeat for {age_s:.0f}s (ttl {ttl:.0f}s, by the storage's clock)"
        if self._visibly_gone(held):
            return f"owner pid {held.get('pid')} on this host is gone"
        return None

    def _visibly_gone(self, held: dict[str, Any]) -> bool:
        """The holder is a process this one can see is gone: same host, same pid namespace, and
        its pid is not running or now belongs to a process started at another time (recycled).
        A lease from another namespace (or one that does not say, where this host has
        namespaces) is judged by its TTL alone; on a host without /proc (no namespaces to tell
        apart) the host and pid decide, as before."""
        if held.get("host") != self.host:
            return False
        if held.get("pid_ns") != self.pid_ns or ("pid_ns" not in held and self.pid_ns is not None):
            return False  # another namespace, or a lease that does not say (an older version)
        start = held.get("pid_start")
        return not pid_alive(int(held.get("pid", -1)), float(start) if start is not None else None)

    def acquire(self) -> None:
        current = self.storage.read_versioned(LEASE, aged=True)
        held = _parse(current.data) if current else None
        if current is not None and held is not None:
            why = self.is_stale(held, current.age_s)
            if why is None:
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("since", 0)))
                raise LeaseHeld(
                    f"{self.storage.uri} is in use by {describe(held)} since {since} (renewed "
                    f"{current.age_s:.0f}s ago). Stop it first, or wait for its lease to expire "
                    f"({held.get('ttl_s', self.ttl_s):.0f}s after its last heartbeat)."
                )
            self.events.append(
                {
                    "kind": "lease_taken_over",
                    "previous_pid": held.get("pid"),
                    "previous_host": held.get("host"),
                    "why": why,
                }
            )
        try:
            self._version = self.storage.write_if(LEASE, self._body(), current.version if current else None)
        except Conflict:  # another driver created or took it in the same instant
            now = self.read() or {}
            raise LeaseHeld(f"{self.storage.uri} was just taken by {describe(now)}") from None
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _body(self) -> bytes:
        body = {
            "host": self.host,
            "pid": self.pid,
            "pid_ns": self.pid_ns,
            "pid_start": self.pid_start,
            "token": self.token,
            "since": self.since,
            "heartbeat": time.time(),
            "ttl_s": self.ttl_s,
        }
        return json.dumps(body).encode()

    def beat(self) -> None:
        """Renew the lease; raises LeaseLost when another driver has taken it over."""
        try:
            self._version = self.storage.write_if(LEASE, self._body(), self._version)
        except Conflict:
            current = self.storage.read_versioned(LEASE)
            held = _parse(current.data) if current else None
            if current is None:  # deleted under us (a stale owner's release): create it again
                try:
                    self._version = self.storage.write_if(LEASE, self._body(), None)
                    return
                except Conflict:
                    current = self.storage.read_versioned(LEASE)
                    held = _parse(current.data) if current else None
            if current is not None and held is not None and held.get("token") == self.token:
                # Our own earlier beat landed though it was reported failed: still ours.
                self._version = current.version
                return self.beat()
            self.lost = f"run taken over by {describe(held)}"
            raise LeaseLost(f"{self.storage.uri}: {self.lost}") from None

    def _beat(self) -> None:
        failing = False
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.beat()
                if failing:
                    log.info("[lease] heartbeat restored")
                failing = False
            except LeaseLost as e:
                log.info(f"[lease] {e}; this driver no longer owns the run")
                if self.on_lost is not None:
                    self.on_lost(str(e))
                return
            except Exception as e:  # storage trouble: the next beat tries again
                if not failing:
                    log.info(f"[lease] heartbeat failing ({type(e).__name__}); retrying")
                failing = True

    def stop_heartbeat(self) -> None:
        """Stop renewing (a driver that stalls, as far as the store can tell)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 1)

    def release(self) -> None:
        self.stop_heartbeat()
        if self.lost:
            return  # not ours any more: the new owner's lease stays
        try:
            current = self.storage.read_versioned(LEASE)
            if current and current.version == self._version:
                self.storage.delete(LEASE)
        except Exception:
            pass  # a stale lease is taken over by the next driver anyway


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        out = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return out if isinstance(out, dict) else None

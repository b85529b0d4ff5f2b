"""A run's state as a reader sees it, and removing a run that holds nothing worth keeping.

The manifest stores three statuses: running, finished, failed. Two more are derived when a
run is read, from what is already stored (no format change, nothing written):

- **interrupted**: stored `failed` with `manifest.stopped.kind == "interrupt"`: Ctrl-C or
  SIGTERM on the driver stopped the run cleanly, after the workers saved and committed a
  checkpoint. `orchestrator resume RUN_URI` continues it.
- **stale**: stored `running`, but the driver that owns it is gone: its lease
  (lease.json) was not renewed within its TTL (judged by the storage's clock, as a second
  driver judges it), names a process on this host that is gone, or is missing (a driver
  stopped at once, by a second Ctrl-C, releases it without recording the end). `orchestrator
  resume RUN_URI` continues it, taking the stale lease over.

A manifest without an owner (written without a lease: runs of older versions, tests of the
ledger alone) is shown as stored: there is no lease to judge it by.

`clear_run` empties a run directory through the Storage layer, keeping only the lease its
caller holds; `orchestrator delete` and `orchestrator run` (replacing a run that failed
before committing any checkpoint) use it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.core.lease import LEASE, Lease
from orchestrator.core.manifest import CHECKPOINTS, MANIFEST, SPEC, Manifest
from orchestrator.core.storage import Storage

STATES = ("running", "stale", "interrupted", "failed", "finished")


@dataclass(frozen=True)
class RunState:
    """What a run is now: `state` (one of STATES), the status its manifest stores, why (for
    stale, interrupted and stopped runs) and what to run next, if anything."""

    state: str
    stored: str
    detail: str | None = None
    next: str | None = None
    checkpoints: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One line for a table: `stale: driver gone (...); orchestrator resume RUN_URI`."""
        parts = [p for p in (self.detail, self.next) if p]
        return f"{self.state}: {'; '.join(parts)}" if parts else self.state


def run_state(storage: Storage, manifest: Manifest) -> RunState:
    """The run's state. Reads lease.json for a stored `running` run only."""
    n, uri = len(manifest.checkpoints), storage.uri
    resume = f"orchestrator resume {uri}"
    stopped = manifest.stopped or {}
    reason = str(stopped.get("reason") or "").strip().splitlines()
    why = reason[0][:300] if reason else None
    if manifest.status == "finished":
        return RunState("finished", "finished", None, None, n)
    if manifest.status == "failed":
        if stopped.get("kind") == "interrupt":
            return RunState("interrupted", "failed", why, resume, n)
        if n == 0:
            fix = (
                f"nothing committed: `orchestrator run` of the corrected spec replaces it, "
                f"or `orchestrator delete {uri}`"
            )
            return RunState("failed", "failed", why, fix, n)
        return RunState("failed", "failed", why, f"when the cause is fixed, {resume}", n)
    gone = driver_gone(storage, manifest)
    if gone is not None:
        return RunState("stale", "running", f"driver gone: {gone}", resume, n)
    return RunState("running", "running", None, None, n)


def driver_gone(storage: Storage, manifest: Manifest) -> str | None:
    """Why the driver of a stored `running` run is gone, or None while it may be alive.
    Judged as a second driver judges the lease (orchestrator.core.lease.Lease.is_stale),
    writing nothing but the storage's clock probe of a local directory (where that cannot be
    written, a read-only one, the lease's age is unknown and only a gone pid on this host tells)."""
    if manifest.owner is None:
        return None  # not written under a lease: nothing to judge it by
    try:
        current, aged = storage.read_versioned(LEASE, aged=True), True
    except OSError:  # the clock probe could not be written: judge without the age
        current, aged = storage.read_versioned(LEASE), False
    if current is None:
        return "no lease: its driver stopped without recording the end of the run"
    try:
        held = json.loads(current.data)
    except ValueError:
        held = None
    if not isinstance(held, dict):
        return f"{LEASE} is not a lease"
    age = current.age_s if aged else 0.0
    if Lease(storage).is_stale(held, age) is None:
        return None
    who = f"pid {held.get('pid')} on {held.get('host')}"
    ttl = float(held.get("ttl_s", 30.0))
    if age > ttl:
        return f"{who}, lease stale for {age:.0f}s, ttl {ttl:.0f}s by the storage's clock"
    return f"{who} (this host), and that process is gone"


def is_run(storage: Storage) -> bool:
    """RUN_URI holds a run (a manifest), or the spec of one whose driver died before it began."""
    return storage.exists(MANIFEST) or storage.exists(SPEC)


def replaceable(manifest: Manifest, force: bool = False) -> str | None:
    """Why `orchestrator run` may replace this run, or None when it must be resumed or deleted
    instead. Only a run with no committed checkpoint (nothing to resume from): one that failed
    (a wrong monitor, say) always; with force (`run --force`) a stale or interrupted one too.
    The caller holds the run's lease, so no live driver runs it."""
    if manifest.checkpoints or manifest.status == "finished":
        return None
    if manifest.status != "failed" and not force:
        return None
    stopped = manifest.stopped or {}
    reason = str(stopped.get("reason") or "").strip().splitlines()
    kind = "a failed run" if manifest.status == "failed" else f"a {manifest.status} run (--force)"
    return f"{kind} with no committed checkpoint" + (f" ({reason[0][:300]})" if reason else "")


def committed_count(storage: Storage, manifest: Manifest | None) -> int:
    """Committed checkpoints; for a manifest that cannot be read, the checkpoint directories."""
    if manifest is not None:
        return len(manifest.checkpoints)
    return len(storage.list_dirs(CHECKPOINTS))


def clear_run(storage: Storage) -> list[str]:
    """Delete everything under RUN_URI except the lease (which the caller holds), the
    manifest last: a clear cut short leaves a run `run` or `delete` can clear again, never
    old metrics or events beside no manifest (a new run's coordinator would read them).
    Returns the names deleted."""
    keep = {LEASE, f"{LEASE}.lock"}
    names = [n for n in storage.list_dirs("") if n not in keep]
    for name in sorted(names, key=lambda n: n == MANIFEST):
        storage.delete(name)
    return names


def delete_run(storage: Storage, lease: Lease) -> list[str]:
    """Delete the whole run directory, lease included; the caller holds `lease`. Its
    heartbeat stops first, so nothing writes the lease again once it is gone."""
    names = clear_run(storage)
    lease.stop_heartbeat()
    storage.delete("")
    return names

"""The run's log: events.jsonl, metrics.jsonl, and the trackers fed from the metrics.

The journals are replaced by compare-and-swap on the version this coordinator last wrote
(events: on object stores, where an append is a rewrite): a coordinator that lost the run
never rewrites the new owner's from its stale copy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from orchestrator.coordinator.ownership import REMEMBERED, Ownership
from orchestrator.core.manifest import EVENTS, METRICS, read_journal, write_journal_if
from orchestrator.core.storage import Conflict, Storage, StorageError
from orchestrator.tracking import Trackers

Merge = Callable[[list[dict[str, Any]], list[dict[str, Any]]], list[dict[str, Any]]]


class RunLog:
    """The events and metrics of the run, in memory and in storage, written only while
    `ownership` allows it."""

    def __init__(self, storage: Storage, ownership: Ownership) -> None:
        self.storage = storage
        self._ownership = ownership
        self._versions: dict[str, str | None] = {}
        self.events, self._versions[EVENTS] = read_journal(storage, EVENTS)
        self._events_stored = len(self.events)  # events up to here are in storage
        self.metrics, self._versions[METRICS] = read_journal(storage, METRICS)
        self.trackers: Trackers | None = None
        self.trackers_off: list[dict[str, Any]] = []  # this coordinator's `tracker_off` events
        storage.on_retry = self._on_retry

    def track(self, tracking: dict[str, Any] | None) -> None:
        """Feed the metrics to TensorBoard/MLflow as well (tracking settings; None: no)."""
        last = self.metrics[-1].get("epoch", 0) if self.metrics else 0  # a restarted coordinator's
        self.trackers = Trackers(self.storage, tracking, last) if tracking is not None else None

    def event(self, kind: str, rid: str | None = None, **fields: Any) -> None:
        """Log an event; with a request id, a retried call logs it once."""
        self._ownership.check()
        if rid and any(e.get("rid") == rid for e in self.events[-REMEMBERED:]):
            return
        row = {"ts": round(time.time(), 3), "kind": kind, **fields}
        self.events.append({**row, "rid": rid} if rid else row)
        if self.storage.is_local:  # only the new lines; on object stores append is a rewrite anyway
            new = self.events[self._events_stored :]
            self.storage.append(EVENTS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in new).encode())
        else:
            self.events = self._write_journal(EVENTS, self.events, _merge_events)
        self._events_stored = len(self.events)

    def logged(self, kind: str, cid: str) -> bool:
        """An event of this kind about checkpoint cid is in the log."""
        return any(e.get("kind") == kind and e.get("id") == cid for e in self.events)

    def newest(self, kind: str) -> dict[str, Any] | None:
        """The newest recent event of this kind (events are few; the newest is near the end)."""
        return next((e for e in reversed(self.events[-200:]) if e.get("kind") == kind), None)

    def metrics_row(self, row: dict[str, Any]) -> None:
        """One row per epoch; a redone epoch replaces its row (so a retried report changes
        nothing). The trackers get it too."""
        self._ownership.check()
        self.metrics = [m for m in self.metrics if m.get("epoch") != row.get("epoch")]
        self.metrics.append(row)
        self.metrics.sort(key=lambda m: m.get("epoch", 0))
        self.metrics = self._write_journal(METRICS, self.metrics, _merge_metrics)
        if self.trackers is not None:
            self.trackers.log(row)
            self._log_tracker_errors()

    def step_row(self, position: dict[str, Any]) -> None:
        """Rank 0's tick: its train loss at that step goes to the trackers (not to a journal:
        metrics.jsonl stays one row per epoch)."""
        loss = position.get("train_loss")
        if self.trackers is not None and isinstance(loss, (int, float)):
            self.trackers.log_step(
                {
                    "epoch": position.get("epoch"),
                    "global_step": position.get("global_step", 0),
                    "train_loss": loss,
                    **({"lr": position["lr"]} if isinstance(position.get("lr"), (int, float)) else {}),
                }
            )
            self._log_tracker_errors()

    def close_trackers(self, status: str) -> None:
        if self.trackers is not None:
            self.trackers.finish(status)
            self._log_tracker_errors()

    def _write_journal(self, rel: str, rows: list[dict[str, Any]], merge: Merge) -> list[dict[str, Any]]:
        """Replace a journal over the version this coordinator last wrote; returns what was
        written. When another writer replaced it: a new owner fences this coordinator
        (LeaseLost, nothing written); anyone else (repair's event, a lost answer) is merged in
        and written over."""
        self._ownership.confirm()  # a stale coordinator whose version still matches (the new
        # owner has not written this journal yet) must not add its rows either
        for _ in range(5):
            try:
                self._versions[rel] = write_journal_if(self.storage, rel, rows, self._versions.get(rel))
                return rows
            except Conflict:
                self._ownership.confirm()
                theirs, self._versions[rel] = read_journal(self.storage, rel)
                rows = merge(theirs, rows)
        raise StorageError(f"{self.storage.child_uri(rel)} kept changing; not written")

    def _log_tracker_errors(self) -> None:
        for name, exc, fix, epoch in self.trackers.take_errors() if self.trackers else []:
            error = self.storage.clean(exc).splitlines()[0][:500]  # one line: the console says it
            self.event("tracker_off", tracker=name, error=error, fix=fix, epoch=epoch)
            self.trackers_off.append(self.events[-1])

    def _on_retry(self, what: str, exc: BaseException, attempt: int, delay: float) -> None:
        # Recorded in memory only: writing events.jsonl here would recurse into the
        # storage that is failing. The next successful event write carries it.
        self.events.append(
            {
                "ts": round(time.time(), 3),
                "kind": "storage_retry",
                "op": what,
                "attempt": attempt,
                "delay_s": round(delay, 3),
                "error": type(exc).__name__,
            }
        )

    def backup_failed(self, error: str) -> None:
        # In memory, like _on_retry: the storage just failed; the next event write carries it.
        self.events.append({"ts": round(time.time(), 3), "kind": "backup_failed", "error": error[:500]})


def _merge_events(stored: list[dict[str, Any]], ours: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored rows, then ours that are not among them (a row is its whole content)."""
    seen = {json.dumps(r, sort_keys=True) for r in stored}
    return stored + [r for r in ours if json.dumps(r, sort_keys=True) not in seen]


def _merge_metrics(stored: list[dict[str, Any]], ours: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch, ours where both have it."""
    by_epoch = {r.get("epoch"): r for r in stored} | {r.get("epoch"): r for r in ours}
    return sorted(by_epoch.values(), key=lambda r: r.get("epoch") or 0)

"""What the coordinator holds in memory only: the driver's stop request, the end of training,
repeated user errors, rank 0's live position, and the console's story of the run.

In memory on purpose: a stop stored by an earlier driver must not end a resumed run's
workers at start, and the live position and the story belong to this driver's display.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.story import restart_cause


@dataclass
class Signals:
    stop_requested: str | None = None  # the driver's Ctrl-C/SIGTERM, read by rank 0's ticks
    # failure.mode replicas: rank 0 left its loop for good (the end, or a stop), so a replica
    # still waiting for it must not (workers/replicas.py).
    ended: bool = False
    # failure.mode replicas: the rank that writes the run's checkpoints in this group (rank 0
    # at its start; a survivor after take_writer); None until a group starts or after a whole
    # restart. In memory: a restarted coordinator forgets it, and a new rank 0 then writes
    # (its attempt fences the survivor's commits, which fail that worker; nothing is lost).
    writer: int | None = None
    writer_actor: Any = None  # its Ray actor handle, when it is a worker: is it alive? (take_writer)
    failures: dict[str, set[int]] = field(
        default_factory=dict
    )  # a user error's signature -> attempts it ended
    gave_up: str | None = None  # set when one signature ended two attempts
    live: dict[str, Any] | None = None  # rank 0's latest position in the epoch (display only)
    reported: list[dict[str, Any]] = field(default_factory=list)  # every report of this coordinator's life
    reported_rids: set[str | None] = field(default_factory=set)
    # The console's story: each restart (with its cause) and each attempt's start, placed by `at`
    # (how many reports came before it), so the driver prints the rows, the restart and the
    # resumed attempt in the order they happened.
    notes: list[dict[str, Any]] = field(default_factory=list)
    causes: list[tuple[int, str]] = field(default_factory=list)  # (attempt, cause) heard first hand

    def ask_stop(self, reason: str) -> bool:
        """Record the driver's stop request; True the first time only."""
        if self.stop_requested is not None:
            return False
        self.stop_requested = reason
        return True

    def add_report(self, row: dict[str, Any], rid: str | None) -> None:
        if rid is None or rid not in self.reported_rids:
            self.reported.append(row)
            self.reported_rids.add(rid)

    def note_attempt(self, attempt: int, resumed_from: str | None) -> None:
        self.notes.append(
            {"kind": "attempt", "at": len(self.reported), "attempt": attempt, "resumed_from": resumed_from}
        )

    def note_writer(self, rank: int, attempt: int) -> None:
        """failure.mode replicas: `rank` took the writer's place, starting `attempt`."""
        self.writer = rank
        self.notes.append({"kind": "writer", "at": len(self.reported), "rank": rank, "attempt": attempt})

    def note_restart(self, restarts: int, cause: str, whole: bool = False, alone: bool = False) -> None:
        note = {"kind": "restart", "at": len(self.reported), "restarts": restarts, "cause": cause}
        # alone: Ray Train replaced only the failed replicas (failure.mode replicas), said always
        self.notes.append({**note, "whole": True, "alone": False} if whole else {**note, "alone": alone})

    def heard(self, attempt: int, cause: str) -> None:
        """A cause heard first hand (a chaos kill, the user's exception) in that attempt."""
        self.causes.append((attempt, cause))

    def restart_cause(self, attempt: int, reason: str) -> str:
        """A cause heard first hand in the attempt that failed beats Ray's summary of it; a
        late one from an earlier attempt is not this restart's. Forgets them all."""
        heard = [cause for at, cause in self.causes if at == attempt]
        self.causes.clear()
        return heard[0] if heard else restart_cause(reason)

    def count_failure(self, sig: str, attempt: int, trace: str) -> bool:
        """Count a user error's signature for an attempt; True when this makes it deterministic
        (the same signature ended two attempts) for the first time."""
        attempts = self.failures.setdefault(sig, set())
        attempts.add(attempt)  # a set: a retried call (same rid) counts once
        if len(attempts) < 2 or self.gave_up is not None:
            return False
        self.gave_up = (
            f"the same error ended {len(attempts)} attempts at the same place, so a "
            f"restart cannot fix it; the worker's traceback:\n{trace.rstrip()}"
        )
        return True

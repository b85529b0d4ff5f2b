"""`RunLedger`: the coordinator's logic in this process, with no actor around it (the tests,
bench/scale.py). It is the Coordinator, less the line that says an actor (re)started, plus
the queries of its parts that in-process callers ask directly."""

from __future__ import annotations

from orchestrator.coordinator.api import Coordinator
from orchestrator.core.manifest import CheckpointRecord


class RunLedger(Coordinator):
    def _started(self) -> None:
        """Not an actor: no `coordinator_started` event."""

    def best(self) -> CheckpointRecord | None:
        return self.commits.best()

    def collect_orphans(self) -> list[str]:
        return self.commits.collect_orphans()

    def _delete(self, cid: str, why: str) -> None:
        self.commits.delete(cid, why)

    @property
    def _version(self) -> str | None:
        return self.ownership.version

"""The run's coordinator: the only writer of manifest.json and the only deleter.

One class per job, composed by `Coordinator` (api.py), whose public methods are the remote
API and which Ray hosts as is (`coordinator_actor_class`):

    ownership.py  Ownership  claiming and fencing the run: the manifest, written by compare-and-swap
    runlog.py     RunLog     the run's log: events.jsonl, metrics.jsonl, the trackers
    signals.py    Signals    in memory only: stop asked, training ended, gave up, live position, story
    commits.py    Commits    commits, retention, bad checkpoints, orphan collection
    ledger.py     RunLedger  the same logic in this process, without the actor (tests, bench)

Plain Python over a `Storage` (unit-tested on memory:// and a temp dir); Ray is imported only
to build the actor class.
"""

from orchestrator.coordinator.api import ACTOR_OPTIONS, Coordinator, coordinator_actor_class
from orchestrator.coordinator.commits import CommitError
from orchestrator.coordinator.ledger import RunLedger
from orchestrator.core.retention import RetentionConfig

__all__ = [
    "ACTOR_OPTIONS",
    "CommitError",
    "Coordinator",
    "RetentionConfig",
    "RunLedger",
    "coordinator_actor_class",
]

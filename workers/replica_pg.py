"""A replica's process group, keyed to the quorum that configured it, so a restarted lighthouse
never makes two process groups meet under one store prefix.

torchft configures a replica's process group under `<store>/torchft/<quorum id>/<rank>` and
assumes each prefix is used once (ProcessGroup.configure: "it must be provided with a unique
prefixed store address"). A lighthouse that Ray restarts (orchestrator/ray_compat.py) counts its
quorum ids from 1 again, so the survivors would rendezvous under prefixes their earlier process
groups used, read each other's stale addresses there, and fail (a 30 s gloo timeout) once per
reused id. Here every prefix also carries a key of the quorum that asked for it: its members'
ids (each manager's id ends in a uuid of its own) and its step, the same for every member of
one quorum, and within one lighthouse's life the quorum id alone is unique anyway.

Private torchft use, kept here: the manager's `_client` (whose `_quorum` answers are noted) and
its process group's `configure` (whose first argument is the prefixed store address)."""

from __future__ import annotations

import hashlib
from typing import Any


def quorum_key(quorum: Any) -> str:
    """The same for every member of one quorum (its members' ids and its step): two quorums
    of one id from two lifetimes of the lighthouse differ in it."""
    if quorum is None:
        return "q"
    ids = ",".join(sorted(str(i) for i in quorum.replica_ids))
    return hashlib.sha1(f"{ids}|{quorum.max_step}".encode()).hexdigest()[:16]


class QuorumSeen:
    """torchft's manager client, passed through, noting the last quorum it answered."""

    def __init__(self, client: Any) -> None:
        self.client, self.last = client, None

    def _quorum(self, *args: Any, **kwargs: Any) -> Any:
        self.last = self.client._quorum(*args, **kwargs)
        return self.last

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def key_to_quorums(manager: Any, pg: Any) -> None:
    """Make every configuration of `pg` (workers/replica_comms.py's, whichever device) use a
    store prefix keyed to the quorum `manager` was just given."""
    seen = QuorumSeen(manager._client)
    manager._client = seen
    configure = pg.configure

    def keyed(store_addr: str, *args: Any, **kwargs: Any) -> Any:
        return configure(f"{store_addr}/{quorum_key(seen.last)}", *args, **kwargs)

    pg.configure = keyed

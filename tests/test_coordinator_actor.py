"""Coordinator calls are idempotent under retry across a real actor restart.

Ray restarts the actor (max_restarts=-1) and re-sends a call that was in flight
(max_task_retries=-1) with the same arguments, request id included. The first answer was
made durable with the work, so the retried call counts nothing twice and logs nothing
twice, and an injected kill still fires."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from orchestrator.coordinator import coordinator_actor_class
from orchestrator.core.retention import RetentionConfig
from orchestrator.core.storage import Storage

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(
        num_cpus=1,
        include_dashboard=False,
        namespace="test-coordinator",
        logging_level="ERROR",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


def restart(ray, actor) -> None:
    """SIGKILL the actor's process through Ray and wait for Ray to bring it back."""
    pid = ray.get(actor.ping.remote(), timeout=60)
    ray.kill(actor, no_restart=False)
    end = time.time() + 60
    while time.time() < end:
        try:
            if ray.get(actor.ping.remote(), timeout=10) != pid:
                return
        except Exception:
            time.sleep(0.5)
    raise AssertionError("the coordinator actor did not come back")


def test_retried_calls_after_a_restart_count_once(ray_local, tmp_path):
    ray = ray_local
    storage = Storage(str(tmp_path / "run"))
    cfg = RetentionConfig("val_loss", "min", top_k=2, keep_latest=1)
    coord = coordinator_actor_class().remote(storage, "run", cfg, None)
    ids = {k: uuid.uuid4().hex for k in ("attempt", "restart", "chaos", "event")}

    first = ray.get(coord.start_attempt.remote(2, ids["attempt"]), timeout=60)
    ray.get(coord.note_restart.remote("WorkerGroupError: rank 1 died", ids["restart"]), timeout=60)
    assert ray.get(coord.claim_chaos.remote("kill-0", os.getpid(), ids["chaos"]), timeout=60) is True
    ray.get(coord.event.remote("early_stop", {"epoch": 3}, ids["event"]), timeout=60)

    restart(ray, coord)
    # What Ray does with a call in flight when the actor died: the same call again.
    again = ray.get(coord.start_attempt.remote(2, ids["attempt"]), timeout=60)
    ray.get(coord.note_restart.remote("WorkerGroupError: rank 1 died", ids["restart"]), timeout=60)
    assert ray.get(coord.claim_chaos.remote("kill-0", os.getpid(), ids["chaos"]), timeout=60) is True
    ray.get(coord.event.remote("early_stop", {"epoch": 3}, ids["event"]), timeout=60)
    # A new claim of the same kill (the next attempt) does not fire it again.
    assert ray.get(coord.claim_chaos.remote("kill-0", os.getpid(), uuid.uuid4().hex), timeout=60) is False

    assert again == first and first["attempt"] == 1
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert (m["attempts"], m["restarts"], m["chaos_fired"]) == (1, 1, ["kill-0"])
    kinds = [
        json.loads(line)["kind"] for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()
    ]
    for kind in ("attempt_started", "restart", "chaos_kill", "early_stop"):
        assert kinds.count(kind) == 1, (kind, kinds)
    assert kinds.count("coordinator_started") == 2  # it really restarted
    # A genuinely new attempt is still counted.
    assert ray.get(coord.start_attempt.remote(2, uuid.uuid4().hex), timeout=60)["attempt"] == 2


def test_a_survivor_takes_the_writers_place_only_once_the_writer_is_dead(ray_local, tmp_path):
    """failure.mode replicas: torchft's lighthouse forms a quorum about 100 ms after the first
    replica asks, so a live writer that is late (an epoch's end, a save) can miss one. Its
    place is taken only once Ray says its process is dead: a claim while it lives is refused.
    (This module's cluster: the actor coordinator and a stand-in writer actor, both real.)"""
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Writer:
        def pid(self) -> int:
            return os.getpid()

    writer = Writer.remote()
    ray.get(writer.pid.remote(), timeout=60)
    storage = Storage(str(tmp_path / "run"))
    cfg = RetentionConfig("val_loss", "min", top_k=2, keep_latest=1)
    coord = coordinator_actor_class().remote(storage, "run", cfg, None)
    ray.get(coord.start_attempt.remote(3, uuid.uuid4().hex, replica=True, writer=writer), timeout=60)

    late = ray.get(coord.take_writer.remote(1, 1, uuid.uuid4().hex), timeout=60)
    assert late == {"ok": False, "attempt": 1, "writer": 0, "alive": True}
    ray.kill(writer, no_restart=True)  # the writer's process is gone
    took = ray.get(coord.take_writer.remote(1, 1, uuid.uuid4().hex), timeout=60)
    assert took["ok"] and took["attempt"] == 2, took
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [(e["rank"], e["attempt"]) for e in events if e["kind"] == "writer_moved"] == [(1, 2)]

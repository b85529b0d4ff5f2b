"""Why a worker group restarted, as the console and `events` say it (pure logic: Ray Train's
error text as a real demo run recorded it, and the ledger that picks the cause)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.coordinator import RetentionConfig, RunLedger
from orchestrator.core.storage import Storage
from orchestrator.story import failure_cause, restart_cause

CFG = RetentionConfig(monitor="val_loss", mode="min", top_k=1, keep_latest=1)

# Ray Train 2.60's error after rank 1 was SIGKILLed (events.jsonl of a demo run, trimmed):
# rank 0's collective complains about its dead peer; rank 1's health check says it died.
KILLED = """WorkerGroupError: Training failed due to worker errors:
[Rank 0 Error Snippet]:
Traceback (most recent call last):
  File "/work/workers/loop.py", line 201, in train_step
    loss.backward()
RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:33680. This is typically caused by a remote worker crashing.

[Rank 1 Error Snippet]:
A worker health check failed.
Worker info: Worker(
  actor=Actor(RayTrainWorker, 09b5c4e95ceaa31749bb46cc01000000),
  metadata=ActorMetadata(
    hostname='vm',
    pid=25448,
  ),
  distributed_context=DistributedContext(world_rank=1, world_size=2, local_rank=1, local_world_size=2, node_rank=0),
)
The actor died unexpectedly before finishing this task.
	class_name: RayTrainWorker
"""

RAISED = """WorkerGroupError: Training failed due to worker errors:
[Rank 0 Error Snippet]:
Traceback (most recent call last):
  File "/work/workers/loop.py", line 201, in train_step
RuntimeError: [gloo] Connection closed by peer [127.0.0.1]:33680.

[Rank 1 Error Snippet]:
Traceback (most recent call last):
  File "/home/me/task.py", line 12, in step
    raise ValueError("training sample 123 is corrupt")
ValueError: training sample 123 is corrupt
"""


def test_a_dead_process_is_the_cause_not_its_peers_complaint():
    assert restart_cause(KILLED) == "rank 1 (pid 25448) died (killed from outside, out of memory, or crashed)"


def test_a_raised_exception_is_the_cause_not_a_collectives_complaint():
    assert restart_cause(RAISED) == "rank 1: ValueError: training sample 123 is corrupt"


def test_other_errors_give_their_last_exception_line_or_first_line():
    assert restart_cause("Traceback:\n  File x\nOSError: disk full") == "OSError: disk full"
    assert restart_cause("the node was lost\nmore") == "the node was lost"
    assert len(restart_cause("E" * 5000)) == 300


def test_a_user_failure_signature_is_one_line_with_its_place():
    assert (
        failure_cause("ValueError: bad at /t.py:3 (epoch 1 step 2)")
        == "ValueError: bad at /t.py:3 (epoch 1 step 2)"
    )
    two = "KeyError: 'a\nb' at /t.py:9 (epoch 2 step 0)"
    assert failure_cause(two) == "KeyError: 'a ... at /t.py:9 (epoch 2 step 0)"


def test_the_ledger_names_the_cause_it_heard_first_hand(tmp_path):
    """A chaos kill claimed in the failing attempt is the cause; a user error reported late by
    an earlier attempt's rank is not the next restart's cause; Ray's text is the fallback."""
    led = RunLedger(Storage(str(tmp_path)), "r", CFG)
    led.start_attempt(2)
    what = "rank 1 (pid 7) SIGKILLed by chaos.kills at epoch 5 step 0"
    assert led.claim_chaos("kill-0", 7, None, what) is True
    led.note_restart(KILLED, "r1")
    led.start_attempt(2)
    led.record_failure(
        "ValueError: late at /t.py:3 (epoch 5 step 1)", "tb", 1, "late"
    )  # attempt 1's rank, late
    led.note_restart(KILLED, "r2")
    led.record_failure("ValueError: bad at /t.py:3 (epoch 6 step 2)", "tb", 2, "mine")
    led.note_restart(RAISED, "r3")
    causes = [e["cause"] for e in led.events if e["kind"] == "restart"]
    assert causes == [what, restart_cause(KILLED), "ValueError: bad at /t.py:3 (epoch 6 step 2)"]
    notes = led.progress()["notes"]
    assert [(n["kind"], n.get("cause")) for n in notes] == [
        ("attempt", None),
        ("restart", what),
        ("attempt", None),
        ("restart", restart_cause(KILLED)),
        ("restart", "ValueError: bad at /t.py:3 (epoch 6 step 2)"),
    ]


def test_a_worker_ray_destroyed_with_its_placement_group_is_said_so():
    """Seen in the full suite under load: Ray Train's placement-group cleaner judged the
    controller dead and removed the live workers' group (the reason, as Ray Train wrote it)."""
    reason = (Path(__file__).parent / "data" / "pg_removed_reason.txt").read_text()
    assert restart_cause(reason) == (
        "rank 0 (pid 5054) was destroyed by Ray: the workers' placement group was removed (Ray Train's "
        "placement-group cleaner judged its controller dead)"
    )

"""A deterministic error in user code stops the run after its second occurrence; failures a
restart can fix keep the whole max_failures budget."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from harness.cli import ROOT, jsonl, run_cli
from orchestrator.coordinator import RetentionConfig, RunLedger
from orchestrator.core.storage import Storage, StorageError
from workers.calls import CoordinatorTimeout
from workers.failures import is_infrastructure, signature
from workers.stopping import Preempted


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001 - the traceback is what is under test
        return e


@pytest.mark.parametrize(
    "exc",
    [
        Preempted("notice"),
        CoordinatorTimeout("slow"),
        StorageError("s3 gone"),
        ConnectionResetError(),
        dist.DistBackendError("NCCL error"),
        RuntimeError("[gloo] Connection closed by peer [10.0.0.2]:4242"),
    ],
)
def test_infrastructure_failures_are_not_counted(exc):
    assert is_infrastructure(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad sample"),
        KeyError("label"),
        ZeroDivisionError(),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
    ],
)
def test_user_code_failures_are_counted(exc):
    assert not is_infrastructure(exc)


def test_signature_tells_places_apart():
    a = _raised(ValueError("x"))
    assert signature(a, "epoch 1 step 3") == signature(a, "epoch 1 step 3")
    assert signature(a, "epoch 1 step 3") != signature(a, "epoch 1 step 4")
    assert signature(a, "epoch 1 step 3") != signature(_raised(ValueError("y")), "epoch 1 step 3")


def test_the_same_error_in_two_attempts_gives_up_and_one_attempt_does_not(tmp_path):
    ledger = RunLedger(
        Storage(str(tmp_path)), "r", RetentionConfig(monitor="val_loss", mode="min", top_k=1, keep_latest=1)
    )
    sig = signature(_raised(ValueError("bad")), "epoch 1 step 3")
    ledger.record_failure(sig, "Traceback: rank 0", 1, "a")
    ledger.note_restart("ValueError: bad", "r1")  # Ray Train decides before a slow rank's report lands
    ledger.record_failure(sig, "Traceback: rank 1", 1, "b")  # another rank, the same attempt
    assert ledger.gave_up() is None
    ledger.record_failure(signature(_raised(ValueError("bad")), "epoch 1 step 4"), "tb", 2, "c")  # elsewhere
    assert ledger.gave_up() is None
    ledger.record_failure(sig, "Traceback: the user's own\nValueError: bad", 3, "d")
    assert ledger.gave_up() and "ValueError: bad" in ledger.gave_up() and "the user's own" in ledger.gave_up()


@pytest.mark.e2e
def test_a_deterministic_user_error_stops_after_its_second_time(tmp_path):
    task = f"{ROOT}/tests/tasks/poisoned.py:build"
    p = run_cli(
        "run",
        "examples/custom_task/job.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        f"task.name={task}",
        "--set",
        "failure.max_failures=6",
        "--set",
        "epochs=3",
        "--address",
        "local",
        "--quiet",
    )
    assert p.returncode == 1, p.stderr[-3000:]
    assert "a restart cannot fix it" in p.stderr and "training sample 123 is corrupt" in p.stderr, p.stderr[
        -3000:
    ]
    assert "poisoned.py" in p.stderr  # the user's own traceback, with their file
    events = jsonl(tmp_path / "regression" / "events.jsonl")
    assert sum(e["kind"] == "restart" for e in events) == 2  # not 6
    causes = [e["cause"] for e in events if e["kind"] == "restart"]  # the user's line, with file:line
    assert all("training sample 123 is corrupt" in c and "poisoned.py:" in c for c in causes), causes
    assert [e["kind"] for e in events].count("deterministic_failure") == 1


def test_a_wrapped_infrastructure_failure_is_infrastructure():
    try:
        try:
            raise CoordinatorTimeout("the run's coordinator did not answer commit within 300s")
        except CoordinatorTimeout as err:
            raise RuntimeError(f"checkpoint writer failed: {err}") from err  # as the writer does
    except RuntimeError as e:
        assert is_infrastructure(e)

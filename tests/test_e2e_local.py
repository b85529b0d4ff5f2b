"""The demo, end to end: a real embedded Ray, real DDP workers, a real SIGKILL.

These run the CLI as a user would and judge the outcome from what is in storage.
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from harness.cli import expected_kept, jsonl, manifest, run_cli, start_cli, wait_until
from orchestrator.core.manifest import CheckpointRecord
from orchestrator.core.procs import pid_alive
from orchestrator.core.storage import Storage
from orchestrator.core.verify import read_verified
from workers.metrics import evaluate
from workers.task import TaskContext
from workers.tasks import digits

pytestmark = pytest.mark.e2e


def test_demo_survives_a_worker_kill_and_hands_back_the_best(tmp_path):
    p = run_cli(
        "run",
        "configs/digits.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "name=demo",
        "--json",
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-5000:]
    summary = json.loads(p.stdout)
    run_dir = tmp_path / "demo"
    events = jsonl(run_dir / "events.jsonl")
    metrics = jsonl(run_dir / "metrics.jsonl")
    assert summary["status"] == "finished" and summary["epochs"] == 10

    # A real process died: the chaos event names a pid that no longer exists, and Ray
    # Train's controller (not our code) decided to restart the worker group.
    kill = next(e for e in events if e["kind"] == "chaos_kill")
    assert not pid_alive(kill["pid"])
    restarts = [e for e in events if e["kind"] == "restart"]
    assert len(restarts) == 1 and "WorkerGroupError" in restarts[0]["reason"]
    # ... and the restart names its cause, as the console's restart line does; Ray's token-auth
    # notice and its dead-worker (OOM killer) paragraph stay off the console (--json: stderr)
    assert restarts[0]["cause"] == f"rank 1 (pid {kill['pid']}) SIGKILLed by chaos.kills at epoch 5 step 0"
    assert "Token authentication" not in p.stderr and "A worker died or was killed" not in p.stderr
    assert summary["restarts"] == 1 and summary["attempts"] == 2

    # Resumed from the latest committed checkpoint: the epoch after it, not from scratch.
    i_restart = events.index(restarts[0])
    committed_before = [e["epoch"] for e in events[:i_restart] if e["kind"] == "commit"]
    second = [e for e in events if e["kind"] == "attempt_started" and e["attempt"] == 2][0]
    assert second["restore_epoch"] == max(committed_before) >= 1
    by_epoch = {r["epoch"]: r["attempt"] for r in metrics}
    assert sorted(by_epoch) == list(range(1, 11))
    assert all(a == 1 for e, a in by_epoch.items() if e <= second["restore_epoch"])
    assert all(a == 2 for e, a in by_epoch.items() if e > second["restore_epoch"])

    # Storage holds exactly best-k ∪ latest, every one in the manifest, nothing else.
    m = manifest(run_dir)
    kept_epochs = {c["epoch"] for c in m["checkpoints"]}
    assert kept_epochs == expected_kept(metrics, "val_loss", "min", top_k=3)
    assert set(os.listdir(run_dir / "checkpoints")) == {c["id"] for c in m["checkpoints"]} == set(m["kept"])

    # `best` points at the checkpoint whose val_loss is the best of the whole history.
    best_row = min(metrics, key=lambda r: r["val_loss"])
    p = run_cli("best", str(run_dir), "--json", "--download", str(tmp_path / "dl"), check=True)
    best = json.loads(p.stdout)
    assert best["epoch"] == best_row["epoch"] and best["value"] == best_row["val_loss"]
    assert summary["best"]["id"] == best["id"]

    # It loads with weights_only=True and reproduces its recorded metric.
    state = torch.load(tmp_path / "dl" / "model.pt", weights_only=True)
    model = digits.build_model({"batch_size": 32, "lr": 0.05})
    model.load_state_dict(state)
    task = digits.build({"batch_size": 32, "lr": 0.05}, TaskContext(0, 1, 0, torch.device("cpu")))
    got = evaluate(task, model, torch.device("cpu"))
    assert math.isclose(got["val_loss"], best["value"], rel_tol=1e-5)
    assert got["val_acc"] == pytest.approx(best["metrics"]["val_acc"], abs=1e-9)

    # The listing a user reads explains why each is kept.
    p = run_cli("checkpoints", str(run_dir), "--json", check=True)
    listed = json.loads(p.stdout)["checkpoints"]
    assert {c["id"]: c["kept_because"] for c in listed} == m["kept"]
    assert any("latest" in c["kept_because"] for c in listed)

    # TensorBoard got rank 0's train loss per reported step (its ticks) up to the last step,
    # beside the epochs' rows, and no tracker was switched off.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    per_step = acc.Scalars("step/train_loss")
    assert max(e.step for e in per_step) == metrics[-1]["global_step"] and len(per_step) >= 10
    assert all(math.isfinite(e.value) and e.value > 0 for e in per_step)
    assert summary["trackers_off"] == []


def test_killing_the_coordinator_mid_run_loses_no_committed_checkpoint(tmp_path, kill_group):
    run_dir = tmp_path / "coordkill"
    proc = start_cli(
        "run",
        "configs/digits.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "name=coordkill",
        "--set",
        "chaos.kills=[]",
        "--set",
        "epochs=8",
        "--address",
        "local",
        log=tmp_path / "run.log",
    )
    kill_group(proc)

    # A second driver on the same run while the first lives is refused, told who owns it.
    # Asked as soon as the lease exists, with the whole run still ahead: asked after the
    # kill below it raced the last epochs, and a finished run is refused for that instead.
    wait_until(lambda: (run_dir / "lease.json").exists() or proc.poll() is not None, 120, "the lease")
    second = run_cli(
        "run",
        "configs/digits.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "name=coordkill",
        "--address",
        "local",
        timeout=120,
    )
    assert second.returncode == 3, second.stdout + second.stderr
    assert f"in use by driver pid {proc.pid}" in second.stderr and "since" in second.stderr

    commits = lambda: [e for e in jsonl(run_dir / "events.jsonl") if e["kind"] == "commit"]  # noqa: E731
    wait_until(lambda: len(commits()) >= 3 or proc.poll() is not None, 300, "three commits")
    assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
    first = next(e for e in jsonl(run_dir / "events.jsonl") if e["kind"] == "coordinator_started")
    committed_before = {e["id"] for e in commits()}
    os.kill(first["pid"], signal.SIGKILL)

    assert proc.wait(timeout=400) == 0, (tmp_path / "run.log").read_text()[-5000:]
    events = jsonl(run_dir / "events.jsonl")
    starts = [e for e in events if e["kind"] == "coordinator_started"]
    assert len(starts) >= 2 and starts[1]["pid"] != first["pid"]  # Ray restarted the actor

    # Every checkpoint committed before the kill is still listed, or was dropped by
    # retention with a logged deletion: none vanished.
    m = manifest(run_dir)
    listed = {c["id"] for c in m["checkpoints"]}
    deleted = {e["id"] for e in events if e["kind"] == "delete" and e["why"] == "retention"}
    assert committed_before <= listed | deleted
    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in metrics] == list(range(1, 9))
    assert {c["epoch"] for c in m["checkpoints"]} == expected_kept(metrics, "val_loss", "min", 3)
    storage = Storage(str(run_dir))
    for c in m["checkpoints"]:
        read_verified(storage, CheckpointRecord.model_validate(c))  # whole and matching its record

"""The demo, end to end: a real embedded Ray, real DDP workers, a real SIGKILL.

These run the CLI as a user would and judge the outcome from what is in storage.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess

import pytest
import torch

from harness.cli import CLI, ROOT, cli_env, expected_kept, jsonl, manifest, run_cli, start_cli, wait_until
from orchestrator.core.manifest import CheckpointRecord
from orchestrator.core.procs import pid_alive
from orchestrator.core.storage import Storage
from orchestrator.core.verify import read_verified
from workers.metrics import evaluate
from workers.task import TaskContext
from workers.tasks import digits

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`make demo`'s run, where a user's shell has it: the working directory holds configs/ and
    the run lands in runs/digits. Shared by the demo's checks and the walk of README's commands
    below (one training run, not two)."""
    ws = tmp_path_factory.mktemp("workspace")
    (ws / "configs").symlink_to(ROOT / "configs")
    make_demo = ["run", "configs/digits.yaml", "--set", "name=digits", "--resume-if-exists"]
    p = subprocess.run(
        [*CLI, *make_demo, "--json"], cwd=ws, env=cli_env(), capture_output=True, text=True, timeout=900
    )
    return ws, p


def test_demo_survives_a_worker_kill_and_hands_back_the_best(demo):
    ws, p = demo
    assert p.returncode == 0, p.stderr[-5000:]
    summary = json.loads(p.stdout)
    run_dir = ws / "runs" / "digits"
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
    assert "Warning" not in p.stderr, p.stderr[-3000:]  # nothing of the project's own making either
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
    p = run_cli("best", str(run_dir), "--json", "--download", str(ws / "dl"), check=True)
    best = json.loads(p.stdout)
    assert best["epoch"] == best_row["epoch"] and best["value"] == best_row["val_loss"]
    assert summary["best"]["id"] == best["id"]

    # It loads with weights_only=True and reproduces its recorded metric.
    state = torch.load(ws / "dl" / "model.pt", weights_only=True)
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


# README's "Using it" commands that the walk below does not run, each with why (a command as
# written, or a subcommand).
NOT_WALKED = {
    "orchestrator run configs/digits.yaml": "make demo's run: the fixture trained runs/digits (with "
    "--resume-if-exists, make demo's way, which the walk runs); as written again it refuses the finished run",
    "orchestrator run configs/digits.yaml --set name=digits20 --set epochs=20 --set checkpoint.top_k=5": (
        "trains a second run the same way"
    ),
    "submit": "needs a Ray cluster's Jobs API: tests/test_cluster_jobs.py submits and follows jobs",
    "status": "the Jobs API too (tests/test_cluster_jobs.py)",
}


def readme_commands() -> list[str]:
    """The commands of README's "Using it" block, in order, comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Using it", 1)[1].split("```", 2)[1]
    lines = (line.split("  #", 1)[0].strip() for line in block.splitlines())
    return [line for line in lines if line.startswith("orchestrator ")]


def test_readme_commands_work_in_order_on_the_demos_run(demo):
    """README's "Using it" commands, run as written and in order in the shell make demo leaves
    (runs/digits trained), each exit 0; what a command leaves behind is checked where a user
    would look. Runs after the demo's own checks (the walk ends by deleting the run)."""
    ws, p = demo
    assert p.returncode == 0, p.stderr[-3000:]
    walked = []
    for command in readme_commands():
        if command in NOT_WALKED or command.split()[1] in NOT_WALKED:
            continue
        argv = shlex.split(command)
        out = subprocess.run(
            [*CLI, *argv[1:]], cwd=ws, env=cli_env(), capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, (
            f"{command} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        )
        walked.append(argv[1])
        if argv[1] == "resume":  # a finished run is told, not trained again
            assert "finished" in out.stdout + out.stderr
    assert walked[0] == "run" and walked[-1] == "delete" and len(walked) >= 14, walked
    assert (ws / "out" / "model.pt").exists() and (ws / "curves.png").stat().st_size > 0
    assert "<html" in (ws / "report.html").read_text().lower()
    assert json.loads((ws / "export" / "config.json").read_text())["monitor"] == "val_loss"
    assert json.loads((ws / "runs" / "aliases" / "prod.json").read_text())["run_uri"].endswith("runs/digits")
    assert not (ws / "runs" / "digits").exists()  # the last command deleted it


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

"""failure.mode replicas (workers/replicas.py): a killed replica is replaced alone and heals
from a live peer; a killed rank 0 (the writer) hands the writer's role to the lowest survivor
at once and its replacement heals as an ordinary replica, so no step is lost; and what
reaches storage is whole."""

from __future__ import annotations

import contextlib
import json
import math
import re

import pytest

from harness.cli import expected_kept, jsonl, manifest, run_cli, start_cli, wait_until
from harness.cluster import alive_actors, committed, local_cluster, stop
from orchestrator import preflight
from orchestrator.core.manifest import CheckpointRecord
from orchestrator.core.storage import Storage
from orchestrator.core.verify import read_verified
from orchestrator.spec import JobSpec, SpecError

BASE = {"name": "r", "task": {"name": "digits"}, "failure": {"mode": "replicas"}}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"scaling": {"num_workers": 1}}, "scaling.num_workers must be one number >= 2"),
        ({"scaling": {"num_workers": [1, 2]}}, "scaling.num_workers must be one number >= 2"),
        ({"failure": {"mode": "replicas", "checkpoint_on_preempt": True}}, "failure.checkpoint_on_preempt"),
        (
            {"chaos": {"kills": [{"rank": 0, "epoch": 1, "point": "after_upload"}]}},
            "chaos.kills.0.point: after_upload needs failure.mode restart",
        ),
        (
            {"failure": {"mode": "replicas", "replica_heartbeat_timeout_s": 0.1}},
            "replica_heartbeat_timeout_s",
        ),
    ],
)
def test_a_spec_replicas_cannot_run_is_refused_naming_the_field(change, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        JobSpec.model_validate({**BASE, **change})


def test_the_default_is_a_group_restart_and_replicas_validate():
    assert JobSpec.model_validate({"name": "r"}).failure.mode == "restart"
    assert JobSpec.model_validate(BASE).failure.mode == "replicas"
    # GPUs too (workers/replica_comms.py: NCCL for the gradients), no longer refused
    gpu = JobSpec.model_validate({**BASE, "scaling": {"num_workers": 2, "use_gpu": True}})
    assert gpu.scaling.use_gpu and gpu.failure.mode == "replicas"


def test_without_torchft_the_run_is_refused_before_ray(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchft" else real(name, *a)
    )
    with pytest.raises(
        SpecError, match=r"failure.mode: replicas needs torchft.*pip install 'torchft>=0.2,<0.3'"
    ):
        preflight.check_replicas(JobSpec.model_validate(BASE))
    preflight.check_replicas(JobSpec.model_validate({"name": "r"}))  # restart mode never asks


@pytest.mark.e2e
def test_a_killed_replica_heals_from_a_live_peer_and_a_killed_rank0_loses_no_step(tmp_path):
    # Batches of 8: 90 steps an epoch, so each kill's replacement (a few seconds to start)
    # joins and heals several epochs later: the first before rank 0 is killed, the second
    # before the end.
    epochs, kill0 = 24, {"epoch": 12, "step": 5}
    out = run_cli(
        "run",
        "configs/digits.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "name=rep",
        "--set",
        "failure.mode=replicas",
        "--set",
        f"epochs={epochs}",
        "--set",
        "task.options.batch_size=8",
        "--set",
        f"chaos.kills=[{{rank: 1, epoch: 2}}, {{rank: 0, epoch: {kill0['epoch']}, step: {kill0['step']}}}]",
        "--address",
        "local",
        "--verbose",
        timeout=400,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    run_dir = tmp_path / "rep"
    events = jsonl(run_dir / "events.jsonl")
    assert len([e for e in events if e["kind"] == "chaos_kill"]) == 2
    assert len([e for e in events if e["kind"] == "restart"]) == 2
    # Neither replacement started an attempt: rank 0 trained on while rank 1's started, and
    # rank 1 took rank 0's place as the writer at once (issue 21: a dead rank 0 used to stop
    # every replica until its replacement had started, restored and healed).
    attempts = [e for e in events if e["kind"] == "attempt_started"]
    assert [a["attempt"] for a in attempts] == [1], attempts
    moved = [e for e in events if e["kind"] == "writer_moved"]
    assert [(e["rank"], e["after_attempt"], e["attempt"]) for e in moved] == [(1, 1, 2)], moved
    assert "rank 1 writes the run's checkpoints from now on" in log, log[-5000:]  # its own line
    said = "[run] rank 1 took over writing the checkpoints (attempt 2): the writer left the quorum"
    assert said in log, log[-5000:]  # the driver's console
    # Rank 1's replacement healed from rank 0, which trained on (the first replica also heals
    # once, at epoch 1, from rank 0's start); rank 0's replacement healed from rank 1, as an
    # ordinary replica, after the kill.
    rank1 = [int(e) for e in re.findall(r"rank 1 healed from a live peer: epoch (\d+) step \d+", log)]
    assert any(e >= 2 for e in rank1), (rank1, log[-5000:])
    rank0 = [int(e) for e in re.findall(r"rank 0 healed from a live peer: epoch (\d+) step \d+", log)]
    assert rank0 and all(e >= kill0["epoch"] for e in rank0), (rank0, log[-5000:])

    # No step lost or redone: every epoch has its full count of steps, and the epochs from the
    # one rank 0 died in on were reported by rank 1, in the attempt it took over with.
    metrics = jsonl(run_dir / "metrics.jsonl")
    per_epoch = {r["epoch"]: r["global_step"] for r in metrics}
    steps = per_epoch[1]
    assert {r["epoch"]: r["attempt"] for r in metrics} == {
        e: 1 if e < kill0["epoch"] else 2 for e in range(1, epochs + 1)
    }

    # Every epoch reported once, in order; what is kept is the top-k plus the
    # latest, each whole and matching its record.
    assert [r["epoch"] for r in metrics] == list(range(1, epochs + 1))
    assert all(per_epoch[e] == e * steps for e in per_epoch)
    m = manifest(run_dir)
    assert {c["epoch"] for c in m["checkpoints"]} == expected_kept(metrics, "val_loss", "min", 3)
    storage = Storage(str(run_dir))
    for c in m["checkpoints"]:
        read_verified(storage, CheckpointRecord.model_validate(c))
    assert metrics[-1]["val_acc"] > 0.9  # it learned: the healed replicas trained one model


@pytest.mark.parametrize(
    ("reported", "restored_epoch", "reports", "saves"),
    [
        (1, 1, True, True),  # died before reporting epoch 2: report and save it
        (1, 2, True, False),  # its save of epoch 2 was committed (and restored): report only
        (2, 1, False, True),  # reported, but the save never committed: save it again
        (2, 2, False, False),  # nothing missing
    ],
)
def test_a_rank0_that_heals_past_an_epoch_end_records_what_is_missing(
    reported, restored_epoch, reports, saves
):
    """Rank 0 died at epoch 2's end, after the others moved on: its replacement heals at
    (3, 0) and records, from the handed-on state, what the old rank 0 did not."""
    from types import SimpleNamespace

    from workers import replicas
    from workers.metrics import EarlyStopping

    calls = []
    session = SimpleNamespace(
        cfg=SimpleNamespace(seed=0, every_n_epochs=1, epochs=5),
        world=2,
        rank=0,
        report_metrics=lambda row: calls.append(("report", row["epoch"], row["global_step"])),
        restored_record=lambda: SimpleNamespace(epoch=restored_epoch, end_of_epoch=True),
    )
    task = SimpleNamespace(train_data=list(range(100)), batch_size=10)
    saver = replicas.EpochSaver.__new__(replicas.EpochSaver)
    saver.task, saver.session, saver.last_saved = task, session, None
    saver.saver = SimpleNamespace(
        save=lambda at, *a: calls.append(("save", at.epoch, at.step_in_epoch, at.end_of_epoch))
    )
    live = SimpleNamespace(
        epoch=3,
        step=0,
        global_step=10,
        epoch_loss=None,
        metrics={"val_loss": 0.5},
        stopper=EarlyStopping("min", 3, 0.0),
        reported=reported,
    )
    assert saver.fill_in(live) is False
    assert (("report", 2, 10) in calls) == reports
    assert (("save", 2, 5, True) in calls) == saves  # 100 samples, 2 ranks, batches of 10: 5 steps
    assert live.reported == 2
    calls.clear()
    saver.fill_in(live)  # once recorded, never again
    assert calls == []


def _bare_session(replicas):
    """A Session with only what fit(), the refusals and close() read (no Ray, no storage)."""
    from types import SimpleNamespace

    from workers.session import Session

    session = Session.__new__(Session)
    session.cfg = SimpleNamespace(replicas=replicas, task="t.py:train")
    session.runner = session.fitted = session.fit_error = session.writer = session._shared_check = None
    session._extras_dirs = []
    return session


def test_a_train_function_trains_in_replicas_through_fit_and_its_own_loop_is_refused():
    """In failure.mode replicas a train function hands a Task to session.fit (the built-in
    loop, which can move a healed replica to a peer's place in its data); its own step(),
    report() and restore() stop the run as an input error naming the mode and the way out,
    and so does a function that returns without fit. fit() trains once per attempt, only
    inside a run, and is the session's last use. (The e2e: the DataLoader example's replicas
    job, and in restart mode tests/test_dataloader_task.py.)"""
    from workers.loop import run_train_function
    from workers.session import StopRun

    session = _bare_session(replicas=True)
    calls = (lambda: session.report({"val_loss": 1.0}, epoch=1), session.restore, lambda: session.step(1, 0))
    for call in calls:
        with pytest.raises(
            StopRun,
            match=r"failure.mode replicas: a train function's session\.(report|restore|step)\(\) is refused.*session\.fit\(task\)",
        ) as e:
            call()
        assert e.value.kind == "input"
    with pytest.raises(RuntimeError, match="inside a run the orchestrator started"):
        session.fit("a task")
    with pytest.raises(
        StopRun, match=r"the train function 't.py:train' \(task.name\) returned without session.fit\(task\)"
    ):
        run_train_function(session, lambda s: None, None, ["setup"])

    trained, where = [], ["setup"]

    def loop(s, build, where):
        trained.append(build({}, None))
        where[0] = "epoch 3 evaluation"
        return {"global_step": 7}

    def train(s):
        assert s.fit("the task") == {"global_step": 7}
        with pytest.raises(ValueError, match="once per attempt"):
            s.fit("the task")
        for call in (lambda: s.report({"val_loss": 1.0}, epoch=1), s.restore):
            with pytest.raises(
                StopRun, match=r"after session.fit\(\): the loop has committed its last checkpoint"
            ):
                call()

    assert run_train_function(_bare_session(replicas=True), train, loop, where) == {"global_step": 7}
    assert trained == ["the task"]
    assert where == ["the train function"]  # a failure after fit is the function's own

    def swallows(s):  # what ended the loop (a stop, a failure) ends the attempt even if caught
        with contextlib.suppress(Exception):
            s.fit("the task")

    def stops(s, build, where):
        raise StopRun("epoch 2: val_loss not finite (stop_on_nan)", "nan")

    with pytest.raises(StopRun, match="not finite") as e:
        run_train_function(_bare_session(replicas=False), swallows, stops, ["setup"])
    assert e.value.kind == "nan"


def test_a_rank0_that_heals_after_the_early_stop_ends_the_run(monkeypatch):
    from types import SimpleNamespace

    from workers import replicas
    from workers.metrics import EarlyStopping

    calls = []
    monkeypatch.setattr(replicas, "note_early_stop", lambda s, epoch, st: calls.append(("early_stop", epoch)))
    session = SimpleNamespace(
        cfg=SimpleNamespace(seed=0, every_n_epochs=5, epochs=9),
        world=2,
        rank=0,
        report_metrics=lambda row: calls.append(("report", row["epoch"])),
        restored_record=lambda: None,
    )
    saver = replicas.EpochSaver.__new__(replicas.EpochSaver)
    saver.task, saver.session, saver.last_saved = (
        SimpleNamespace(train_data=list(range(100)), batch_size=10),
        session,
        None,
    )
    saver.saver = SimpleNamespace(save=lambda at, *a: calls.append(("save", at.epoch)))
    stopper = EarlyStopping("min", 2, 0.0, {"best": 0.1, "bad_epochs": 2})  # it said stop at epoch 3
    live = SimpleNamespace(
        epoch=4,
        step=0,
        global_step=20,
        epoch_loss=None,
        metrics={"val_loss": 0.5},
        stopper=stopper,
        reported=2,
    )
    assert saver.fill_in(live) is True  # the early stop, saved though epoch 3 is not a save epoch
    assert calls == [("report", 3), ("save", 3), ("early_stop", 3)]


def kept_and_verified(run_dir, metrics, top_k=3):
    """What is kept is the top-k by val_loss plus the latest, and `orchestrator verify` finds
    every kept checkpoint's files whole and matching its record."""
    assert {c["epoch"] for c in manifest(run_dir)["checkpoints"]} == expected_kept(
        metrics, "val_loss", "min", top_k
    )
    p = run_cli("verify", str(run_dir), "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["ok"] and out["checkpoints"], out
    assert [c["status"] for c in out["checkpoints"]] == ["ok"] * len(out["checkpoints"]), out


def assert_group_restarted(run_dir, log, epochs):
    """The run finished through the driver's fallback (a whole-group restart recorded as a
    `restart` whose reason names the controller's error), every epoch reported once."""
    assert manifest(run_dir)["status"] == "finished"
    events = jsonl(run_dir / "events.jsonl")
    fallback = [e for e in events if e["kind"] == "restart" and "controller gave up" in e.get("reason", "")]
    assert fallback, [e for e in events if e["kind"] == "restart"]
    assert "the whole group restarts from the latest commit" in log
    # the console says each restart once, in order, and the fallback as the group restart it is
    restarts = [e for e in events if e["kind"] == "restart"]
    said = re.findall(r"^\[run\] (.*) \((\d+) so far\)", log, re.M)
    assert [int(n) for _, n in said] == [e["restarts"] for e in restarts], said
    assert "worker group restarted" in [what for what, _ in said], said
    attempts = [e for e in events if e["kind"] == "attempt_started"]
    # A survivor that took the writer's place before the controller gave up started an
    # attempt of its own (writer_moved): with those, every attempt number once, in order.
    moved = [e["attempt"] for e in events if e["kind"] == "writer_moved"]
    numbers = sorted([a["attempt"] for a in attempts] + moved)
    assert numbers == list(range(1, len(numbers) + 1)), (attempts, moved)
    assert len(attempts) >= 2, attempts
    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in metrics] == list(range(1, epochs + 1))
    return events, attempts, metrics


@pytest.mark.e2e
@pytest.mark.parametrize("ranks", [(1, 2), (0, 1)], ids=["ranks-1-2", "ranks-0-1"])
def test_two_replicas_killed_at_the_same_step_never_fail_the_run(tmp_path, ranks):
    """Ray 2.60's worker group clears the other dead group's result while replacing the first,
    and its controller gives up (ControllerError). The driver falls back to a whole-group
    restart from the latest commit instead of a failed run. Ranks 0 and 1 differ from 1 and 2:
    rank 0 is the writer, so the epoch it died in is trained again by the restarted group and
    reported once. A run of its own per case: each kills its own ranks, and it needs three
    workers, where the other replicas tests run two."""
    epochs = 3
    chaos = ", ".join(f"{{rank: {r}, epoch: 2, step: 3}}" for r in ranks)
    out = run_cli(
        "run",
        "configs/digits.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "name=two",
        "--set",
        "failure.mode=replicas",
        "--set",
        "scaling.num_workers=3",
        "--set",
        f"epochs={epochs}",
        "--set",
        f"chaos.kills=[{chaos}]",
        "--address",
        "local",
        "--verbose",
        timeout=500,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    run_dir = tmp_path / "two"
    events, attempts, metrics = assert_group_restarted(run_dir, log, epochs)
    kills = [e for e in events if e["kind"] == "chaos_kill"]
    assert sorted(int(re.match(r"rank (\d+)", e["what"])[1]) for e in kills) == sorted(ranks), kills
    kept_and_verified(run_dir, metrics)


@pytest.mark.e2e
def test_losing_a_node_that_hosts_two_replicas_never_fails_the_run(tmp_path):
    """A node lost takes every worker on it: here two replicas of three at once, which Ray
    2.60's controller cannot replace (as two kills in one step), so the driver restarts the
    whole group from the latest commit once a node replaces the lost one. A cluster of its
    own: its nodes are shaped so that one hosts two workers (a head of 0 CPUs, worker nodes of
    2 and 1), and the node is killed; the module cluster of tests/test_cluster_jobs.py has
    1-CPU nodes, each hosting one worker, and its other tests need its nodes alive."""
    epochs = 8
    with local_cluster(workers=0, head_num_cpus=0) as c:
        two, one = c.add_node(num_cpus=2), c.add_node(num_cpus=1)
        run_dir = tmp_path / "node"
        drv = start_cli(
            "run",
            "configs/digits.yaml",
            "--address",
            c.address,
            "--verbose",
            "--set",
            f"storage.root={tmp_path}",
            "--set",
            "name=node",
            "--set",
            "failure.mode=replicas",
            "--set",
            "scaling.num_workers=3",
            "--set",
            f"epochs={epochs}",
            "--set",
            "chaos.kills=[]",
            log=tmp_path / "driver.log",
            env=c.env,
        )
        try:
            wait_until(lambda: committed(run_dir) or drv.poll() is not None, 240, "a commit")
            assert drv.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
            hosts = [c.name_of(a["node_id"]) for a in alive_actors(c, "RayTrainWorker")]
            assert sorted(hosts) == sorted([two, two, one]), hosts
            before = max(r["epoch"] for r in committed(run_dir))
            c.kill_node(two)  # SIGKILL its raylet; returns once none of its processes is left
            c.add_node(num_cpus=2)  # room for the whole group again
            rc = drv.wait(timeout=400)
            log = (tmp_path / "driver.log").read_text()
            assert rc == 0, log[-6000:]
        finally:
            stop(drv)
    assert before < epochs, "the run finished before the node was lost"
    _, attempts, metrics = assert_group_restarted(run_dir, log, epochs)
    assert attempts[1]["restore"] is not None and attempts[1]["restore_epoch"] >= before, attempts
    kept_and_verified(run_dir, metrics)


def lighthouse_process(root_pid):
    """The torchft lighthouse's actor process among a driver's descendants (a local Ray)."""
    import psutil

    for p in psutil.Process(root_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "Lighthouse" in " ".join(p.cmdline()) and "ray::" in " ".join(p.cmdline()):
                return p
    return None


@pytest.mark.e2e
def test_a_killed_lighthouse_comes_back_and_the_run_finishes(tmp_path):
    """torchft's lighthouse forms every step's quorum; its process SIGKILLed mid-run (three
    replicas training) must cost neither the run nor an epoch."""
    epochs = 8
    run_dir = tmp_path / "lh"
    drv = start_cli(
        "run",
        "configs/digits.yaml",
        "--address",
        "local",
        "--verbose",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "name=lh",
        "--set",
        "failure.mode=replicas",
        "--set",
        "scaling.num_workers=3",
        "--set",
        f"epochs={epochs}",
        "--set",
        "task.options.batch_size=8",
        "--set",
        "chaos.kills=[]",
        log=tmp_path / "driver.log",
    )
    try:
        wait_until(lambda: committed(run_dir) or drv.poll() is not None, 240, "a commit")
        assert drv.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
        lighthouse = lighthouse_process(drv.pid)
        assert lighthouse is not None
        before = max(r["epoch"] for r in committed(run_dir))
        lighthouse.kill()
        rc = drv.wait(timeout=400)
        log = (tmp_path / "driver.log").read_text()
        assert rc == 0, log[-6000:]
    finally:
        stop(drv)
    assert before < epochs, "the run finished before the lighthouse was killed"
    # Ray restarted it at the same address, where the replicas' managers found it again
    assert len(set(re.findall(r"Lighthouse listening on: (\S+)", log))) == 1, log[-6000:]
    assert len(re.findall(r"Lighthouse listening on", log)) == 2, log[-6000:]
    # and the group was never restarted: no whole restart, no driver fallback. (The restarted
    # lighthouse's first quorum may form before the writer reconnects: the writer's role then
    # moves to a survivor, as for a writer that left the quorum, and the old writer, whose next
    # commit is refused, is replaced alone; docs/operations.md's known gaps. A step in flight
    # when it died may wait out one failure.replica_timeout_s. Its quorum ids, counted from 1
    # again, no longer send two process groups to one store prefix, workers/replica_pg.py:
    # that was a gloo timeout per reused id, then a hang.)
    restarts = [e for e in jsonl(run_dir / "events.jsonl") if e["kind"] == "restart"]
    assert len(restarts) <= 1 and all(e.get("alone") for e in restarts), restarts
    assert manifest(run_dir)["status"] == "finished"
    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in metrics] == list(range(1, epochs + 1))
    kept_and_verified(run_dir, metrics)


def newest_step(run_dir):
    return max((c["global_step"] for c in committed(run_dir)), default=-1)


def train_workers(root_pid, but=()):
    """The Ray Train workers among a driver's descendants (a local Ray), but those named."""
    import psutil

    found = []
    for p in psutil.Process(root_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.pid not in but and " ".join(p.cmdline()).startswith("ray::RayTrainWorker"):
                found.append(p)
    return found


@pytest.mark.e2e
def test_replicas_replaced_alone_do_not_spend_max_failures(tmp_path):
    """Three workers SIGKILLed one after another (each once its replacement has joined and a
    commit followed) with failure.max_failures 1: each is a replica replaced alone, counted
    against failure.max_replacements (default 20), so the run finishes. Ray Train alone counts
    each against max_failures and fails the run at the second."""
    epochs = 30
    run_dir = tmp_path / "budget"
    drv = start_cli(
        "run",
        "configs/digits.yaml",
        "--address",
        "local",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "name=budget",
        "--set",
        "failure.mode=replicas",
        "--set",
        "failure.max_failures=1",
        "--set",
        f"epochs={epochs}",
        "--set",
        "task.options.batch_size=8",
        "--set",
        "chaos.kills=[]",
        "--verbose",
        log=tmp_path / "driver.log",
    )
    log_of = (tmp_path / "driver.log").read_text
    killed: set[int] = set()
    try:
        for n in range(3):
            # the replica killed last (and at first, the one not holding rank 0's state) has
            # been replaced and healed: a kill before then would fail its start instead
            heals = lambda n=n: log_of().count("healed from a live peer") > n or drv.poll() is not None  # noqa: E731
            wait_until(heals, 240, f"heal {n + 1}")
            seen = newest_step(run_dir)
            wait_until(lambda s=seen: newest_step(run_dir) > s or drv.poll() is not None, 240, "a new commit")
            assert drv.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
            newest = max(train_workers(drv.pid, killed), key=lambda p: p.create_time())
            killed.add(newest.pid)
            newest.kill()
        rc = drv.wait(timeout=500)
        log = (tmp_path / "driver.log").read_text()
        assert rc == 0, log[-6000:]
    finally:
        stop(drv)
    restarts = [e for e in jsonl(run_dir / "events.jsonl") if e["kind"] == "restart"]
    assert len(restarts) == 3 and all(e.get("alone") for e in restarts), restarts
    assert manifest(run_dir)["replacements"] == 3
    assert re.findall(r"^\[run\] a failed worker replaced alone \((\d) so far\)", log, re.M) == [
        "1",
        "2",
        "3",
    ]
    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in metrics] == list(range(1, epochs + 1))
    kept_and_verified(run_dir, metrics)


@pytest.mark.e2e
def test_the_lighthouse_sits_off_the_drivers_node_and_every_workers(tmp_path):
    """A cluster with a node that hosts no worker (a head of 0 CPUs, two 1-CPU nodes for the
    two replicas, and a spare of 0 CPUs): the lighthouse goes where neither the driver's
    controller nor a worker is, so losing a worker's node never takes it along."""
    run_dir = tmp_path / "place"
    with local_cluster(workers=2, head_num_cpus=0) as c:
        c.add_node(num_cpus=0)
        drv = start_cli(
            "run",
            "configs/digits.yaml",
            "--address",
            c.address,
            "--set",
            f"storage.root={tmp_path}",
            "--set",
            "name=place",
            "--set",
            "failure.mode=replicas",
            "--set",
            "epochs=6",
            "--set",
            "task.options.batch_size=8",
            "--set",
            "chaos.kills=[]",
            log=tmp_path / "driver.log",
            env=c.env,
        )
        try:
            wait_until(lambda: committed(run_dir) or drv.poll() is not None, 240, "a commit")
            assert drv.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
            actors = alive_actors(c, "TorchftLighthouse", "RayTrainWorker", "TrainController")
            rc = drv.wait(timeout=300)
            assert rc == 0, (tmp_path / "driver.log").read_text()[-6000:]
        finally:
            stop(drv)
    on = lambda kind: [c.name_of(a["node_id"]) for a in actors if a["class_name"] == kind]  # noqa: E731
    (lighthouse,) = on("TorchftLighthouse")
    assert len(on("RayTrainWorker")) == 2, actors
    assert lighthouse not in {*on("RayTrainWorker"), *on("TrainController")}, actors


def _steps_of(rows, rank, n, batch, epochs, world=2, seed=0):
    """Each logged train_step's global step (its batch's indices name it: workers/data.py's
    order, rank `rank` of `world`), with the batch's size."""
    from workers.data import rank_batches

    where, gs = {}, 0
    for epoch in range(1, epochs + 1):
        for b in rank_batches(n, batch, seed, epoch, world, rank):
            where[tuple(b)] = (gs, len(b))
            gs += 1
    assert len(where) == gs  # every batch names one step
    return [where[tuple(r["index"])] for r in rows]


@pytest.mark.e2e
def test_a_healed_replica_gets_the_peers_grad_scaler_and_keeps_its_own_rng_streams(tmp_path):
    """A task with a grad scaler (CPU) and rank 1 killed in epoch 2: its replacement heals the
    scaler's state from rank 0 (the scale it starts from is rank 0's at that step, not its
    initial one), and every step of every rank, the replacement's included, draws from the
    rank's own stream for that step (workers/replica_streams.py), never the peer's. The steps
    rank 1 missed are reported as skipped (replica_skipped), to the sample. Every checkpoint
    holds the scaler and each rank's own streams."""
    import torch

    from workers.format import STATE_FILE, load_tensor_file
    from workers.replica_streams import stream_seed

    epochs, batch, n = 7, 8, 1438
    log = tmp_path / "steps"
    log.mkdir()
    out = run_cli(
        "run",
        "configs/digits.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "name=amp",
        "--set",
        "failure.mode=replicas",
        "--set",
        f"epochs={epochs}",
        "--set",
        "task.name=tests/tasks/replica_amp.py:build",
        "--set",
        f"task.options={{step_log: {log}, batch_size: {batch}, sleep_s: 0.01}}",
        "--set",
        "checkpoint.top_k=10",
        "--set",
        "chaos.kills=[{rank: 1, epoch: 2, step: 3}]",
        "--address",
        "local",
        "--verbose",
        timeout=400,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    run_dir = tmp_path / "amp"
    rows = {r: jsonl(log / f"rank{r}.log") for r in (0, 1)}
    at = {r: _steps_of(rows[r], r, n, batch, epochs) for r in (0, 1)}

    def expected_draw(rank, gs):
        g = torch.Generator().manual_seed(stream_seed(0, rank, gs))
        return torch.rand(1, generator=g).item()

    for r in (0, 1):  # each rank's own stream at every step, a step trained again included
        for row, (gs, _) in zip(rows[r], at[r], strict=True):
            assert row["draw"] == pytest.approx(expected_draw(r, gs), abs=0), (r, gs)
    # Both ranks' scales agree at every step both trained; the replacement's first is rank 0's.
    scale0 = {gs: row["scale"] for row, (gs, _) in zip(rows[0], at[0], strict=True)}
    for row, (gs, _) in zip(rows[1], at[1], strict=True):
        assert row["scale"] == scale0[gs], (gs, row, scale0[gs])
    pids = list(dict.fromkeys(row["pid"] for row in rows[1]))
    assert len(pids) == 2, pids  # the first process, then its replacement
    first = next(i for i, row in enumerate(rows[1]) if row["pid"] == pids[1])
    assert rows[1][first]["scale"] != 2.0**10, rows[1][first]  # healed, not its own initial scale

    # The steps rank 1 never trained were skipped, and reported to the sample.
    missed = {gs for gs, _ in at[0]} - {gs for gs, _ in at[1]}
    events = jsonl(run_dir / "events.jsonl")
    skipped = [e for e in events if e["kind"] == "replica_skipped"]
    assert missed and skipped, (missed, skipped)
    assert sum(e["steps"] for e in skipped) == len(missed), (skipped, sorted(missed))
    assert sum(e["samples"] for e in skipped) == sum(_sizes(1, n, batch, epochs)[gs] for gs in missed)

    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in metrics] == list(range(1, epochs + 1))
    kept_and_verified(run_dir, metrics, top_k=10)
    storage = Storage(str(run_dir))
    for c in manifest(run_dir)["checkpoints"]:  # the scaler and each rank's own streams
        state = load_tensor_file(read_verified(storage, CheckpointRecord.model_validate(c))[STATE_FILE])
        gs = c["global_step"]
        if gs in scale0:  # the scale rank 0 started the next step from
            assert state["grad_scaler"]["scale"] == scale0[gs], c
        for r, part in enumerate(state["ranks"]):
            torch.set_rng_state(part["rng"]["torch"])
            assert torch.rand(1).item() == expected_draw(r, gs), (c["id"], r)


def _sizes(rank, n, batch, epochs, world=2, seed=0):
    """Each global step's batch size for rank."""
    from workers.data import rank_batches

    out, gs = {}, 0
    for epoch in range(1, epochs + 1):
        for b in rank_batches(n, batch, seed, epoch, world, rank):
            out[gs] = len(b)
            gs += 1
    return out


def _trained(rows):
    """A sample log's steps, in order, a step trained again (the same batch, logged twice in a
    row) once."""
    out = []
    for r in rows:
        if not out or out[-1] != (r["pid"], r["index"]):
            out.append((r["pid"], r["index"]))
    return out


@pytest.mark.e2e
def test_the_dataloader_example_in_replicas_reads_each_shard_once_and_counts_what_it_skipped(tmp_path):
    """examples/dataloader_task/replicas.yaml (a train function that hands its task to
    session.fit; torchdata's StatefulDataLoader, 2 worker processes, a DistributedSampler over
    the replica groups) with rank 1 killed in epoch 2: each replica
    reads its own shard; rank 0 trains all of its shard every epoch; rank 1's replacement
    heals the loader's position from rank 0 and reads on from there (its workers read only
    what it trained: the epoch's head is not read again), and what rank 1 never trained in
    the meantime is what `replica_skipped` reports, to the sample."""
    epochs, batch, shard = 8, 8, 719  # 1438 samples, 2 replicas, the sampler's drop_last
    steps = math.ceil(shard / batch)
    log = tmp_path / "samples"
    log.mkdir()
    out = run_cli(
        "run",
        "examples/dataloader_task/replicas.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        f"epochs={epochs}",
        "--set",
        f"task.options.batch_size={batch}",
        "--set",
        f"task.options.sample_log={log}",
        "--set",
        "chaos.kills=[{rank: 1, epoch: 2, step: 3}]",  # as the job says
        "--address",
        "local",
        "--verbose",
        timeout=500,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    run_dir = tmp_path / "dataloader-digits"
    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in metrics] == list(range(1, epochs + 1))
    kept_and_verified(run_dir, metrics, top_k=2)
    # the function went on after session.fit returned, with the loop's result, on both ranks
    for rank in (0, 1):
        assert f"rank {rank}: trained to global step {epochs * steps}" in text, rank

    from torch.utils.data import DistributedSampler

    def order(rank):  # each (epoch, step)'s batch of rank's shard, as its sampler deals it
        sampler = DistributedSampler(range(1438), 2, rank, shuffle=True, seed=0, drop_last=True)
        out = []
        for e in range(1, epochs + 1):
            sampler.set_epoch(e)
            idx = list(sampler)
            out += [idx[k : k + batch] for k in range(0, shard, batch)]
        return out

    trained = {r: _trained(jsonl(log / f"rank{r}.log")) for r in (0, 1)}
    assert [b for _, b in trained[0]] == order(0)  # rank 0 missed no step
    pids = list(dict.fromkeys(pid for pid, _ in trained[1]))
    assert len(pids) == 2, pids  # the first process, then its replacement
    healed = re.findall(r"rank 1 healed from a live peer: epoch (\d+) step (\d+) \(global step (\d+)\)", text)
    epoch, step, gs = map(int, healed[-1])
    killed = steps + 3  # the global step rank 1 was killed before
    assert (epoch - 1) * steps + step == gs and gs > killed, healed
    # rank 1 trained its shard up to the kill, then, after the heal, from the peer's position on
    ones = order(1)
    assert [b for pid, b in trained[1] if pid == pids[0]] == ones[:killed]
    again = [b for pid, b in trained[1] if pid == pids[1]]
    assert again == ones[gs:], (len(again), len(ones) - gs)
    if step:  # its loader's workers read only what it trained (a read log line: owner pid, index)
        reads = [
            int(i)
            for owner, i in (line.split() for line in (log / "reads1.log").read_text().splitlines())
            if int(owner) == pids[1]
        ]
        assert sorted(reads) == sorted(i for b in again for i in b), len(reads)
    skipped = [e for e in jsonl(run_dir / "events.jsonl") if e["kind"] == "replica_skipped"]
    assert sum(e["steps"] for e in skipped) == gs - killed, skipped
    assert sum(e["samples"] for e in skipped) == sum(len(b) for b in ones[killed:gs]), skipped

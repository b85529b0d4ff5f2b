"""Elastic training: `num_workers: [min, max]` goes on with fewer workers after a node is
lost and grows back when a node returns, resuming from committed checkpoints each time."""

from __future__ import annotations

import pytest

from harness.cli import expected_kept, jsonl, manifest, start_cli, wait_until
from harness.cluster import committed, events, local_cluster, stop

pytestmark = pytest.mark.e2e


def world_sizes(run_dir):
    return [e["world_size"] for e in events(run_dir, "attempt_started")]


def test_elastic_run_shrinks_after_node_loss_and_grows_back(tmp_path):
    # Ray Train waits this long for a worker group it cannot place before it tries a smaller
    # one (60 s by default); the controller reads it from the head node's environment.
    with local_cluster(workers=2, head_num_cpus=0, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="15") as c:
        env = {k: v for k, v in c.env.items() if k != "RAY_AUTH_MODE"}  # the driver finds the token
        run_dir = tmp_path / "elastic"
        drv = start_cli(
            "run",
            "configs/digits.yaml",
            "--address",
            c.address,
            "--quiet",
            "--set",
            "epochs=30",
            "--set",
            f"storage.root={tmp_path}",
            "--set",
            "name=elastic",
            "--set",
            "chaos.kills=[]",
            "--set",
            "scaling.num_workers=[1, 2]",
            "--set",
            "scaling.elastic_resize_interval_s=5",
            "--set",
            "failure.max_failures=5",
            # Ray Train's own poll: a report waits for the poll that takes the one
            # before it, so 30 epochs outlast a shrink and a grow (at 0.25 s they
            # did not: the run ended at world size 1).
            "--set",
            "failure.health_check_interval_s=2",
            log=tmp_path / "driver.log",
            env=env,
        )
        try:
            wait_until(lambda: len(committed(run_dir)) >= 2 or drv.poll() is not None, 240, "2 commits")
            assert drv.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
            assert world_sizes(run_dir) == [2]
            before = max(r["epoch"] for r in committed(run_dir))
            c.kill_node("worker-2")  # each worker node hosts one training worker
            wait_until(lambda: world_sizes(run_dir)[-1:] == [1] or drv.poll() is not None, 240, "shrink to 1")
            c.add_node()
            wait_until(
                lambda: (
                    world_sizes(run_dir)[-1:] == [2]
                    and len(world_sizes(run_dir)) > 2
                    or drv.poll() is not None
                ),
                240,
                "grow back to 2",
            )
            rc = drv.wait(timeout=400)
            assert rc == 0, (tmp_path / "driver.log").read_text()[-5000:]
        finally:
            stop(drv)

    sizes = world_sizes(run_dir)
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes
    starts = events(run_dir, "attempt_started")
    shrunk = next(e for e in starts if e["world_size"] == 1)
    assert shrunk["restore"] is not None and shrunk["restore_epoch"] >= before  # resumed, not restarted
    grown = starts[-1]
    assert grown["restore_epoch"] >= shrunk["restore_epoch"]
    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in metrics] == list(range(1, 31))
    assert {c["epoch"] for c in manifest(run_dir)["checkpoints"]} == expected_kept(
        metrics, "val_loss", "min", 3
    )

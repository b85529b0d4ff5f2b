"""bench/scale.py's simulation, small enough for the suite: the parts that need no S3 server."""

from __future__ import annotations

from bench import scale


def test_only_rank_0_calls_the_coordinator_per_step_whatever_the_world_size():
    small, large = scale.calls_per_step(8, steps=50), scale.calls_per_step(512, steps=50)
    assert small["ranks_calling"] == large["ranks_calling"] == 1
    assert small["calls"] == large["calls"] <= 50 * 0.2 + 1  # a tick at most once a second


def test_the_manifest_stops_growing_once_retention_is_full(tmp_path):
    run = scale.long_run(tmp_path, 8, 60, None)  # top_k 3 + keep_latest 1
    last = run["samples"][-1]
    assert last["commits"] == 60 and last["kept"] <= 4
    assert last["manifest_bytes"] < 2500 * last["kept"]  # the kept records (8 files each), no history
    assert len(list((tmp_path / "long-w8-mNone" / "checkpoints").iterdir())) == last["kept"]


def test_a_commit_on_moto_after_another_moto_server_in_the_same_process(tmp_path):
    """The suite runs the storage benchmark's moto server before this one's: a Storage here
    must not reuse fsspec's cached client of the stopped server (it did, and every request
    failed to connect)."""
    for i in range(2):
        work = tmp_path / str(i)
        work.mkdir()
        with scale.moto_s3(work) as root:
            out = scale.commit_at(root, 8, 2, profile=False)
        assert out["commit_s"] > 0 and out["commits"][-1]["kept"] == 2
        assert out["listing"]["files"] == 8 + 3  # 8 shards, .metadata, train_state.pt, checkpoint.json

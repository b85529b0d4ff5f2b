"""Spec errors name the file, the field path and the problem, before anything starts."""

import pytest
import yaml

from orchestrator.spec import SpecError, load_spec, resolve_task

BASE = {"name": "t", "epochs": 3, "scaling": {"num_workers": 2}}


def write(tmp_path, data, name="job.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_default_demo_config_is_valid():
    spec = load_spec("configs/digits.yaml")
    assert spec.checkpoint.top_k == 3 and spec.checkpoint.mode == "min"
    assert spec.scaling.num_workers == 2 and spec.epochs >= 8
    assert len(spec.chaos.kills) == 1


@pytest.mark.parametrize(
    "patch, message",
    [
        (
            {"checkpoint": {"top_k": 0}},
            "checkpoint.top_k: Input should be greater than or equal to 1",
        ),
        ({"checkpoint": {"mode": "avg"}}, "checkpoint.mode: Input should be 'min' or 'max'"),
        ({"checkpoint": {"monitr": "val_loss"}}, "checkpoint.monitr: unknown field"),
        ({"epochs": "ten"}, "epochs: Input should be a valid integer"),
        (
            {"scaling": {"num_workers": 0}},
            "scaling.num_workers: must be >= 1 (got 0)",
        ),
        (
            {"scaling": {"num_workers": [3, 1]}},
            "scaling.num_workers: [min, max] needs min <= max (got [3, 1])",
        ),
        ({"task": {"name": "nosuch"}}, "task.name: unknown task 'nosuch'"),
        (
            {"task": {"name": "json:nosuch"}},
            "task.name: task 'json:nosuch': json has no function 'nosuch'",
        ),
        ({"task": {"name": "no_such_pkg.mod:fn"}}, "cannot import no_such_pkg.mod"),
        ({"task": {"name": "missing/file.py:build"}}, "missing/file.py does not exist"),
        (
            {"chaos": {"kills": [{"rank": 5, "epoch": 1}]}},
            "chaos.kills.0.rank: 5 but scaling.num_workers is 2",
        ),
        (
            {"chaos": {"kills": [{"rank": 0, "epoch": 9}]}},
            "chaos.kills.0.epoch: 9 is past epochs=3",
        ),
        (
            {"chaos": {"kills": [{"rank": 1, "epoch": 1, "point": "after_upload"}]}},
            "after_upload kills rank 0",
        ),
        ({"name": "a/b"}, "name: 'a/b' is not a run name"),
        (
            {"failure": {"health_check_interval_s": 0}},
            "failure.health_check_interval_s: Input should be greater than or equal to 0.05",
        ),
        (
            {"failure": {"replica_timeout_s": 0.5}},
            "failure.replica_timeout_s: Input should be greater than or equal to 1",
        ),
        (
            {"failure": {"replica_quorum_timeout_s": 5000}},
            "failure.replica_quorum_timeout_s: Input should be less than or equal to 3600",
        ),
        (
            {"failure": {"replica_heartbeat_timeout_s": 10, "replica_quorum_timeout_s": 10}},
            "failure.replica_quorum_timeout_s: 10 s must exceed replica_heartbeat_timeout_s (10 s)",
        ),
    ],
)
def test_bad_spec_names_file_field_and_problem(tmp_path, patch, message):
    data = {**BASE, **patch}
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(path) in str(e.value)
    assert message in str(e.value)


def test_missing_name(tmp_path):
    with pytest.raises(SpecError, match=r"job.yaml: name: Field required"):
        load_spec(write(tmp_path, {"epochs": 2}))


@pytest.mark.parametrize(
    "text, message", [("a: [1,", "not valid YAML"), ("- 1\n- 2\n", "expected a mapping")]
)
def test_not_a_spec(tmp_path, text, message):
    with pytest.raises(SpecError, match=message):
        load_spec(write(tmp_path, text))


def test_unreadable_file(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml: cannot read"):
        load_spec(tmp_path / "nope.yaml")


def test_overrides(tmp_path):
    path = write(tmp_path, BASE)
    spec = load_spec(
        path, ["checkpoint.top_k=5", "checkpoint.mode=max", "chaos.kills=[]", "task.options.lr=0.1"]
    )
    assert spec.checkpoint.top_k == 5 and spec.checkpoint.mode == "max"
    assert spec.task.options == {"lr": 0.1}
    with pytest.raises(SpecError, match="checkpoint.top_k: Input should be greater"):
        load_spec(path, ["checkpoint.top_k=-1"])
    with pytest.raises(SpecError, match="expected key.sub=value"):
        load_spec(path, ["checkpoint.top_k"])
    with pytest.raises(SpecError, match="'epochs' is not a section"):
        load_spec(path, ["epochs.x=1"])


def test_local_root_becomes_absolute_and_uris_stay(tmp_path):
    spec = load_spec(write(tmp_path, {**BASE, "storage": {"root": "rel/dir"}}))
    assert spec.run_uri.startswith("/") and spec.run_uri.endswith("rel/dir/t")
    spec = load_spec(write(tmp_path, {**BASE, "storage": {"root": "s3://b/runs/"}}))
    assert spec.run_uri == "s3://b/runs/t"


def test_task_from_a_file(tmp_path):
    f = tmp_path / "mytask.py"
    f.write_text("def build(options, ctx):\n    return 42\n")
    assert resolve_task(f"{f}:build")(None, None) == 42
    with pytest.raises(SpecError, match="has no function 'other'"):
        resolve_task(f"{f}:other")


def test_replica_timeouts_reach_the_workers(tmp_path):
    """failure.replica_timeout_s and replica_quorum_timeout_s are what each replica's torchft
    Manager is built with (workers/replicas.py reads them from its WorkerConfig)."""
    from orchestrator.driver import worker_config

    failure = {"mode": "replicas", "replica_timeout_s": 45, "replica_quorum_timeout_s": 90}
    cfg = worker_config(load_spec(write(tmp_path, {**BASE, "failure": failure})))
    assert (cfg.replicas, cfg.replica_timeout_s, cfg.replica_quorum_timeout_s) == (True, 45, 90)
    default = worker_config(load_spec(write(tmp_path, BASE, "plain.yaml")))
    assert (default.replica_timeout_s, default.replica_quorum_timeout_s) == (30, 120)

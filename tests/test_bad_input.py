"""Bad input around storage and the cluster (issue 12's table; the spec's own rows are in
tests/test_spec_input.py): each a clear error that names the field, file or address and what is
wrong, with its exit code, and nothing committed lost. One row per case.

Rows that need no Ray fail before it starts. The rest share one cluster (a head and a worker
node of 1 CPU each, token auth; harness/cluster.py) whose nodes, like the CLI, know the
test filesystem fullfs:// (a disk that fills up; tests/full_disk.py), and the session's moto.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest
import yaml
from full_disk import PROTOCOL, FullFS, plugin_dir

from harness.cli import ROOT, cli_env, run_cli
from harness.cluster import events, local_cluster
from harness.s3 import CREDS, free_port
from orchestrator.cli.exits import EXIT_API, EXIT_FAILED, EXIT_INPUT, EXIT_STORAGE
from orchestrator.core.manifest import CHECKPOINTS, read_manifest
from orchestrator.core.storage import Storage
from orchestrator.core.verify import read_verified
from orchestrator.spec import SpecError, load_spec

SMALL = {"chaos": {"kills": []}, "epochs": 1, "scaling": {"num_workers": 1}}


def job(
    tmp_path: Path,
    name: str = "x",
    root: str | None = None,
    options: dict[str, Any] | None = None,
    retry: dict[str, Any] | None = None,
    **fields: Any,
) -> Path:
    """A small digits spec in tmp_path/job.yaml."""
    spec: dict[str, Any] = {"name": name, **SMALL, **fields}
    spec["storage"] = {"root": root or str(tmp_path / "runs"), "options": options or {}}
    if retry:
        spec["storage"]["retry"] = retry
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(spec, sort_keys=False))
    return f


# -- storage, before Ray ---------------------------------------------------------------------


def unreachable(tmp_path: Path, moto: Any) -> tuple[Path, list[str]]:
    # A closed port, and a retry budget that would take minutes to spend: nothing answers, so
    # the run is refused after a few quick tries.
    port = free_port()
    f = job(
        tmp_path,
        root="s3://unreachable/runs",
        options={"endpoint_url": f"http://127.0.0.1:{port}"},
        retry={"attempts": 30, "initial_s": 1.0, "max_s": 5.0},
    )
    return f, [
        "storage s3://unreachable/runs/x",
        f"nothing answers at http://127.0.0.1:{port}",
        "storage.options.endpoint_url",
    ]


def missing_bucket(tmp_path: Path, moto: Any) -> tuple[Path, list[str]]:
    name = f"missing-{uuid.uuid4().hex[:8]}"
    f = job(tmp_path, root=f"s3://{name}/runs", options={"endpoint_url": moto.endpoint})
    return f, [f"storage s3://{name}/runs/x", f"bucket '{name}' does not exist at {moto.endpoint}"]


def write_denied(tmp_path: Path, moto: Any) -> tuple[Path, list[str]]:
    name = f"denied-{uuid.uuid4().hex[:8]}"
    s3 = moto.client()
    s3.create_bucket(Bucket=name)
    s3.put_bucket_policy(
        Bucket=name,
        Policy=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Deny",
                        "Principal": "*",
                        "Action": "s3:PutObject",
                        "Resource": f"arn:aws:s3:::{name}/*",
                    }
                ],
            }
        ),
    )
    f = job(tmp_path, root=f"s3://{name}/runs", options={"endpoint_url": moto.endpoint})
    return f, [f"storage s3://{name}/runs/x", "no permission to write", "s3:PutObject"]


def file_in_the_way(tmp_path: Path, moto: Any) -> tuple[Path, list[str]]:
    # A local root that cannot be a directory (as root, a chmod'ed directory would still be
    # writable; a file where a directory must be is not, for anyone).
    (tmp_path / "data").write_text("not a directory")
    f = job(tmp_path, root=str(tmp_path / "data" / "runs"))
    return f, [f"storage {tmp_path}/data/runs/x", f"{tmp_path}/data", "not a directory"]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(unreachable, id="unreachable-endpoint"),
        pytest.param(missing_bucket, id="missing-bucket"),
        pytest.param(write_denied, id="no-permission-bucket-policy"),
        pytest.param(file_in_the_way, id="local-root-not-a-directory"),
    ],
)
def test_storage_that_cannot_hold_a_run_is_refused_before_ray_starts(tmp_path, moto, make):
    f, fragments = make(tmp_path, moto)
    t0 = time.monotonic()
    p = run_cli("run", str(f), "--address", "local", env=cli_env(**CREDS), timeout=300)
    took = time.monotonic() - t0
    assert p.returncode == EXIT_STORAGE, p.stdout + p.stderr
    for text in fragments:
        assert text in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and "giving up" not in p.stderr, p.stderr
    assert "Token authentication" not in p.stderr  # refused before an embedded Ray started
    assert took < 60, f"took {took:.0f}s"  # the behaviour under test: no minutes of retries


@pytest.mark.parametrize(
    "name",
    ["../up", "a/b", "two words", "naïve", ".hidden", "x" * 129, "a:b", "ends-in-a-newline\n"],
)
def test_a_run_name_the_store_cannot_hold_is_refused_with_the_pattern(tmp_path, name):
    with pytest.raises(SpecError) as e:  # SpecError: exit 2, before anything is written
        load_spec(job(tmp_path, name=name))
    assert f"job.yaml: name: {name!r} is not a run name" in str(e.value), str(e.value)
    assert "must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$" in str(e.value)


# -- the cluster address, before Ray ---------------------------------------------------------


def test_an_address_where_no_cluster_answers_is_refused_before_anything_is_written(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    p = run_cli("run", str(job(tmp_path)), "--address", address, timeout=120)
    assert p.returncode == EXIT_API, p.stdout + p.stderr
    assert f"no Ray cluster answers at {address}" in p.stderr and "ray start --head" in p.stderr
    assert not (tmp_path / "runs").exists()  # no lease taken, no spec stored


# -- on a cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    """PYTHONPATH for processes that must know fullfs://."""
    return os.pathsep.join([str(plugin_dir(tmp_path_factory.mktemp("plugins"))), str(ROOT / "tests")])


@pytest.fixture(scope="module")
def cluster(plugins):
    with local_cluster(workers=1, PYTHONPATH=plugins) as c:
        yield c


def without_token(c: Any, home: Path, **extra: str) -> dict[str, str]:
    """The cluster's environment less its token: another HOME (no ~/.ray/auth_token)."""
    env = {k: v for k, v in c.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    return {**env, "HOME": str(home), **extra}


@pytest.mark.parametrize(
    "extra, fragments",
    [
        pytest.param(
            {},
            ["uses token authentication", "RAY_AUTH_MODE=token", "~/.ray/auth_token"],
            id="no-token-no-mode",
        ),
        pytest.param(
            {"RAY_AUTH_MODE": "token"},
            ["uses token authentication", "~/.ray/auth_token"],
            id="no-token-mode-token",
        ),
        pytest.param(
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, ["refused the token"], id="wrong-token"
        ),
    ],
)
def test_a_token_cluster_reached_without_its_token_says_how_to_give_it(cluster, tmp_path, extra, fragments):
    p = run_cli(
        "run",
        str(job(tmp_path)),
        "--address",
        cluster.address,
        timeout=120,
        env=without_token(cluster, tmp_path, **extra),
    )
    assert p.returncode == EXIT_API, p.stdout + p.stderr
    assert f"the Ray cluster at {cluster.address}" in p.stderr, p.stderr
    for text in fragments:
        assert text in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and "Failed to get cluster ID" not in p.stderr, p.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "sets, fragments",
    [
        pytest.param(
            ["scaling.num_workers=4"],
            [
                "scaling.num_workers: 4 workers x {CPU: 1} do not fit",
                "needs 4 CPU, it has 2 CPU in total",
                "cannot grow",
            ],
            id="too-many-workers",
        ),
        pytest.param(
            ["scaling.num_workers=2", "scaling.use_gpu=true"],
            ["2 workers x {CPU: 1, GPU: 1} do not fit", "needs 2 GPU, it has 0 GPU"],
            id="gpus",
        ),
        pytest.param(
            ["scaling.num_workers=1", "scaling.resources_per_worker={CPU: 2}"],
            ["1 worker x {CPU: 2} does not fit", "no node can hold one worker"],
            id="too-big-a-worker",
        ),
    ],
)
def test_workers_the_cluster_can_never_hold_are_refused_before_ray_train_waits(
    cluster, tmp_path, sets, fragments
):
    args = [a for s in sets for a in ("--set", s)]
    p = run_cli("run", str(job(tmp_path)), "--address", cluster.address, *args, env=cluster.env, timeout=300)
    assert p.returncode == EXIT_INPUT, p.stdout + p.stderr
    assert f"on the Ray cluster at {cluster.address}" in p.stderr, p.stderr
    for text in fragments:
        assert text in p.stderr, p.stderr
    assert read_manifest(Storage(str(tmp_path / "runs" / "x"))) is None  # no coordinator, no Ray Train


REMOTE_TASK = '''"""A task whose module imports a package that only the head node has."""
import os

if os.environ.get("ORCH_TEST_NODE", "").endswith(":worker-1"):
    import package_only_on_the_head  # noqa: F401

from workers.tasks.digits import build, check_options  # noqa: F401,E402
'''


def test_a_task_a_remote_node_cannot_import_shows_the_users_error_without_restarts(cluster, tmp_path):
    task = tmp_path / "remote_task.py"
    task.write_text(REMOTE_TASK)
    f = job(tmp_path, task={"name": f"{task}:build"}, scaling={"num_workers": 2}, failure={"max_failures": 3})
    p = run_cli("run", str(f), "--address", cluster.address, env=cluster.env, timeout=300)
    assert p.returncode == EXIT_INPUT, p.stdout + p.stderr
    assert "No module named 'package_only_on_the_head'" in p.stderr, p.stderr
    assert f'File "{task}", line 5, in <module>' in p.stderr, p.stderr  # the user's own frame
    assert "import package_only_on_the_head" in p.stderr
    run_dir = tmp_path / "runs" / "x"
    assert events(run_dir, "restart") == []  # not one of the 3 restarts spent
    m = read_manifest(Storage(str(run_dir)))
    assert m.status == "failed" and m.restarts == 0 and m.attempts == 0  # stopped before restoring


def test_a_full_disk_fails_the_run_clearly_keeps_every_commit_and_resume_goes_on(cluster, plugins, tmp_path):
    fsspec.register_implementation(PROTOCOL, FullFS, clobber=True)  # this process reads the run too
    disk = tmp_path / "disk"
    disk.mkdir()
    uri = f"{PROTOCOL}://{disk}/runs/full"
    # Two checkpoints of the digits CNN (about 310 KB each) fit, the third does not.
    options = {"disk": str(disk), "quota_bytes": 800_000}
    f = job(
        tmp_path,
        name="full",
        root=f"{PROTOCOL}://{disk}/runs",
        options=options,
        epochs=3,
        failure={"max_failures": 0},
    )
    env = {**cluster.env, "PYTHONPATH": plugins}
    p = run_cli("run", str(f), "--address", cluster.address, env=env, timeout=300)
    assert p.returncode == EXIT_FAILED, p.stdout + p.stderr
    assert "No space left on device" in p.stderr and f"{CHECKPOINTS}/epoch0003" in p.stderr, p.stderr
    assert f"orchestrator resume {uri}" in p.stderr, p.stderr

    store = Storage(uri, options)
    before = read_manifest(store)
    assert [c.epoch for c in before.checkpoints] == [1, 2]
    for c in before.checkpoints:
        read_verified(store, c)

    # Space is back. Reading the run needs its storage options, as an S3 run needs its endpoint.
    p = run_cli(
        "resume",
        uri,
        "--storage-option",
        f"disk={disk}",
        "--storage-option",
        "quota_bytes=100000000",
        "--address",
        cluster.address,
        "--json",
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    after = read_manifest(Storage(uri, {**options, "quota_bytes": 100_000_000}))
    assert after.status == "finished" and max(c.epoch for c in after.checkpoints) == 3
    for c in after.checkpoints:
        read_verified(store, c)
    assert sorted(os.listdir(disk / "runs" / "full" / CHECKPOINTS)) == sorted(c.id for c in after.checkpoints)
    resumed = [e for e in events(disk / "runs" / "full", "attempt_started")][-1]
    assert resumed["restore_epoch"] == 2


# -- how the worker check decides (pure logic) ------------------------------------------------

NODE = {"CPU": 1.0, "memory": 1e9}


@pytest.mark.parametrize(
    "need, nodes, holds",
    [
        ({"CPU": 1}, [NODE, NODE], 2),
        ({"CPU": 2}, [NODE, NODE], 0),
        ({"CPU": 0.5}, [NODE, NODE], 4),
        ({"CPU": 1, "GPU": 1}, [NODE, {**NODE, "GPU": 2.0}], 1),
        ({}, [NODE], None),  # asks for nothing: any number fits
    ],
)
def test_how_many_workers_the_nodes_hold(need, nodes, holds):
    from orchestrator import preflight

    assert preflight.workers_held(need, nodes) == holds


@pytest.mark.parametrize(
    "status, grows",
    [
        ({"autoscaler_report": {"node_type_mapping": {"ab12": "node_ab12", "cd34": "node_cd34"}}}, False),
        (
            {
                "autoscaler_report": {
                    "node_type_mapping": {"ab12": "ray.head.default", "cd34": "ray.worker.gpu"}
                }
            },
            True,
        ),
        ({"autoscaler_report": {"node_type_mapping": {}}}, None),
        ({}, None),
        (None, None),
    ],
)
def test_whether_a_cluster_can_grow_is_read_from_its_autoscaler(status, grows):
    from orchestrator.ray_compat import can_grow_from_status

    assert can_grow_from_status(status) is grows

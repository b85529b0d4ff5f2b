"""deploy/ stays consistent with the project: one Ray version, one image, shared storage,
credentials only from Secrets, an entrypoint that runs the CLI on a spec that validates.

Reads files only (plus `bash`, and deploy/local-cluster.sh against a stand-in for `ray`): no
cluster, no docker, no network.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from orchestrator.spec import load_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: same API from the backport
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
LAUNCHER = DEPLOY / "cluster-launcher" / "aws.yaml"
LOCAL_CLUSTER = DEPLOY / "local-cluster.sh"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
SPEC_FILES = sorted((DEPLOY / "configs").glob("*.yaml"))
# Env var names that carry credentials; their values must come from a Secret.
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|API_KEY", re.I)


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def load_docs(path: Path) -> list[Any]:
    """Every document of a (possibly multi-document) YAML file, empty ones dropped."""
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_one(path: Path) -> dict[str, Any]:
    docs = load_docs(path)
    assert len(docs) == 1, f"{_rel(path)}: expected one document, got {len(docs)}"
    assert isinstance(docs[0], dict)
    return docs[0]


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def requirement(pyproject: dict[str, Any], name: str) -> Requirement:
    reqs = [Requirement(d) for d in pyproject["project"]["dependencies"]]
    found = [r for r in reqs if r.name == name]
    assert len(found) == 1, f"pyproject.toml: expected one {name} dependency, got {found}"
    return found[0]


@pytest.fixture(scope="module")
def ray_pin(pyproject: dict[str, Any]) -> str:
    """'2.60' out of ray[default,train]==2.60.*."""
    req = requirement(pyproject, "ray")
    assert {"default", "train"} <= req.extras
    m = re.fullmatch(r"==(\d+\.\d+)\.\*", str(req.specifier))
    assert m, f"pyproject.toml: ray pin {req.specifier} is not of the form ==X.Y.*"
    return m.group(1)


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    out: list[str] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        out.append(buf + s)
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def docker_args(dockerfile: list[str]) -> dict[str, str]:
    args = {}
    for ins in dockerfile:
        m = re.fullmatch(r"ARG\s+(\w+)=(\S+)", ins)
        if m:
            args[m.group(1)] = m.group(2).strip("\"'")
    return args


@pytest.fixture(scope="module")
def kube() -> dict[str, dict[str, Any]]:
    """The KubeRay manifests by kind."""
    out: dict[str, dict[str, Any]] = {}
    for path in (RAYCLUSTER, RAYJOB):
        for doc in load_docs(path):
            assert doc.get("kind") not in out, f"two {doc.get('kind')} manifests"
            out[doc["kind"]] = doc
    return out


def cluster_specs(kube: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [kube["RayCluster"]["spec"], kube["RayJob"]["spec"]["rayClusterSpec"]]


def ray_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The Ray container (KubeRay treats the first one as Ray's) of every group."""
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [g["template"]["spec"]["containers"][0] for g in groups]


def all_containers(kube: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for spec in cluster_specs(kube):
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for g in groups:
            pod = g["template"]["spec"]
            out += pod.get("containers", []) + pod.get("initContainers", [])
    submitter = kube["RayJob"]["spec"].get("submitterPodTemplate")
    if submitter:
        out += submitter["spec"]["containers"]
    return out


# -- every YAML parses --------------------------------------------------------------------


def test_the_deploy_files_exist() -> None:
    for p in (DOCKERFILE, RAYCLUSTER, RAYJOB, LAUNCHER, LOCAL_CLUSTER):
        assert p.is_file(), f"missing {_rel(p)}"
    assert SPEC_FILES, "no job spec under deploy/configs/"
    assert set(map(_rel, (RAYCLUSTER, RAYJOB, LAUNCHER, *SPEC_FILES))) <= set(map(_rel, YAML_FILES))


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_every_yaml_parses_to_mappings(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{_rel(path)} is empty"
    for d in docs:
        assert isinstance(d, dict), f"{_rel(path)}: a document is a {type(d).__name__}"


@pytest.mark.parametrize("path", [p for p in DEPLOY.rglob("*") if p.is_file()], ids=_rel)
def test_no_aws_key_in_any_deploy_file(path: Path) -> None:
    # Access key ids have a fixed shape; a committed one is a leaked one.
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", path.read_text(errors="replace"))


# -- one Ray version, one image -----------------------------------------------------------


def test_dockerfile_base_and_versions_agree_with_pyproject(
    dockerfile: list[str], docker_args: dict[str, str], pyproject: dict[str, Any], ray_pin: str
) -> None:
    assert dockerfile[0] == "FROM python:3.11-slim"
    assert SpecifierSet(pyproject["project"]["requires-python"]).contains("3.11")

    ray_version = docker_args["RAY_VERSION"]
    assert ray_version.startswith(ray_pin + ".")
    assert requirement(pyproject, "ray").specifier.contains(ray_version)

    torch_version = docker_args["TORCH_VERSION"]
    assert torch_version == "2.13.0"
    assert requirement(pyproject, "torch").specifier.contains(torch_version)
    assert docker_args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


def test_dockerfile_installs_what_it_declares(dockerfile: list[str]) -> None:
    runs = [re.sub(r"[\"']", "", i) for i in dockerfile if i.startswith("RUN ")]
    assert any("pip install --index-url ${TORCH_INDEX_URL} torch==${TORCH_VERSION}" in r for r in runs), (
        "torch is not installed from TORCH_INDEX_URL at TORCH_VERSION"
    )
    # Ray pinned at RAY_VERSION in the same pip run that installs the project, so the
    # project's own `ray==2.60.*` cannot move it.
    assert any(
        "ray[default,train,serve]==${RAY_VERSION}" in r and re.search(r"pip install /src\b", r) for r in runs
    ), "the project is not installed with Ray pinned at RAY_VERSION"
    assert "COPY deploy/configs/ /app/configs/" in dockerfile


def test_dockerfile_runs_the_cli_without_an_entrypoint(dockerfile: list[str]) -> None:
    # The cluster launcher starts the container as `docker run IMAGE bash`.
    assert not [i for i in dockerfile if i.startswith("ENTRYPOINT")]
    assert dockerfile[-1] == 'CMD ["orchestrator", "--help"]'


def test_ray_version_is_the_same_everywhere(
    kube: dict[str, dict[str, Any]], docker_args: dict[str, str], ray_pin: str
) -> None:
    for spec in cluster_specs(kube):
        assert spec["rayVersion"] == docker_args["RAY_VERSION"]
        assert spec["rayVersion"].startswith(ray_pin + ".")
    setup = " ".join(load_one(LAUNCHER)["setup_commands"])
    assert f"'{docker_args['RAY_VERSION']}'" in setup, "the launcher does not check the image's Ray"


def test_one_image_tag_everywhere(
    kube: dict[str, dict[str, Any]], dockerfile: list[str], pyproject: dict[str, Any]
) -> None:
    version = pyproject["project"]["version"]
    docker = load_one(LAUNCHER)["docker"]
    images = {c["image"] for c in all_containers(kube)}
    images |= {docker[k] for k in ("image", "head_image", "worker_image") if k in docker}
    assert len(images) == 1, f"different images: {sorted(images)}"
    image = images.pop()
    repo, _, tag = image.rpartition(":")
    assert repo.endswith("/ray-orchestrator") and tag == version, image
    label = next(i for i in dockerfile if i.startswith("LABEL "))
    assert f'org.opencontainers.image.version="{version}"' in label


# -- KubeRay ------------------------------------------------------------------------------


def test_kuberay_manifests(kube: dict[str, dict[str, Any]]) -> None:
    assert set(kube) == {"RayCluster", "RayJob"}
    for doc in kube.values():
        assert doc["apiVersion"] == "ray.io/v1"
    for spec in cluster_specs(kube):
        assert spec["headGroupSpec"]["template"]["spec"]["containers"]
        assert spec["workerGroupSpecs"], "no worker group"
        for g in spec["workerGroupSpecs"]:
            assert g["groupName"] and g["replicas"] >= 1
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        for c in ray_containers(spec):
            assert c["resources"]["requests"] and c["resources"]["limits"]
        assert spec["authOptions"] == {"mode": "token"}


def test_rayjob_cluster_is_the_raycluster(kube: dict[str, dict[str, Any]]) -> None:
    # Submitting to raycluster.yaml and running rayjob.yaml must mean the same cluster.
    assert kube["RayJob"]["spec"]["rayClusterSpec"] == kube["RayCluster"]["spec"]


def test_rayjob_retries_a_lost_driver_and_cleans_up(kube: dict[str, dict[str, Any]]) -> None:
    spec = kube["RayJob"]["spec"]
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    assert spec["shutdownAfterJobFinishes"] is True
    # backoffLimit retries on a new RayCluster only when the RayJob creates it.
    assert "rayClusterSpec" in spec and "clusterSelector" not in spec


def entrypoint_argv(kube: dict[str, dict[str, Any]]) -> list[str]:
    return shlex.split(kube["RayJob"]["spec"]["entrypoint"])


def test_rayjob_entrypoint_runs_the_cli_on_shared_storage(kube: dict[str, dict[str, Any]]) -> None:
    argv = entrypoint_argv(kube)
    assert argv[:2] == ["orchestrator", "run"], argv
    config = argv[2]
    assert config.startswith("/app/configs/"), config
    # /app/configs/ holds configs/ and deploy/configs/ (see the Dockerfile's COPY lines).
    name = config.removeprefix("/app/configs/")
    local = next((p for p in (DEPLOY / "configs" / name, ROOT / "configs" / name) if p.is_file()), None)
    assert local is not None, f"{config} is in neither deploy/configs/ nor configs/"
    # --resume-if-exists: a retry continues the run (tests/test_kube_retry.py).
    rest = [a for a in argv[3:] if a != "--resume-if-exists"]
    assert len(rest) % 2 == 0 and all(flag == "--set" for flag in rest[::2]), rest
    overrides = rest[1::2]
    assert any(o.startswith("storage.root=s3://") for o in overrides), overrides

    spec = load_spec(local, overrides)  # exactly what the driver will run
    assert spec.storage.root.startswith("s3://")
    assert spec.run_uri.startswith("s3://")
    assert spec.chaos.kills == []


def test_kubernetes_credentials_come_from_secrets(kube: dict[str, dict[str, Any]]) -> None:
    for c in all_containers(kube):
        for env in c.get("env", []):
            if SECRET_NAME.search(env["name"]):
                assert "value" not in env, f"{c['name']}: {env['name']} is inlined"
                assert env["valueFrom"]["secretKeyRef"]["name"], env
    # Every node reads or writes the run: the driver and coordinator on the head, the
    # training workers on the workers.
    for spec in cluster_specs(kube):
        for c in ray_containers(spec):
            names = {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names, c["name"]


# -- job specs ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", SPEC_FILES, ids=_rel)
def test_deploy_specs_validate_on_shared_storage(path: Path) -> None:
    spec = load_spec(path, check_task=True)
    assert spec.storage.root.startswith("s3://"), spec.storage.root
    assert spec.chaos.kills == [], "no fault injection in cluster specs"
    assert not [k for k in spec.storage.options if SECRET_NAME.search(k) or "key" in k.lower()]


def test_cluster_spec_trains_like_the_local_demo() -> None:
    # digits-s3.yaml is configs/digits.yaml moved to shared storage, nothing else.
    local = load_spec(ROOT / "configs" / "digits.yaml").model_dump()
    cluster = load_spec(DEPLOY / "configs" / "digits-s3.yaml").model_dump()
    for key in ("storage", "chaos"):
        del local[key], cluster[key]
    assert cluster == local


# -- cluster launcher ---------------------------------------------------------------------


def test_launcher_config_is_valid_for_ray() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_one(LAUNCHER)
    assert raw["provider"]["type"] == "aws" and raw["provider"]["region"]
    assert raw["auth"]["ssh_user"]
    validate_config(prepare_config(raw))  # Ray's own schema and checks, offline

    types = raw["available_node_types"]
    assert raw["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != raw["head_node_type"]}
    assert workers and all(v["max_workers"] >= 1 for v in workers.values())
    assert raw["max_workers"] >= sum(v.get("min_workers", 0) for v in workers.values())

    assert any("ray start --head" in c for c in raw["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in raw["worker_start_ray_commands"])


def test_launcher_version_check_fails_on_another_ray(docker_args: dict[str, str]) -> None:
    # Run the setup command here against this venv's Ray: it passes on the pinned
    # version and fails on any other, so `ray up` stops early on a wrong image.
    (check,) = load_one(LAUNCHER)["setup_commands"]
    argv = shlex.split(check)
    assert argv[:2] == ["python", "-c"]
    ok = subprocess.run([sys.executable, "-c", argv[2]], capture_output=True, text=True)
    here = importlib.metadata.version("ray")
    assert (ok.returncode == 0) == (here == docker_args["RAY_VERSION"]), ok.stderr
    wrong = argv[2].replace(f"'{docker_args['RAY_VERSION']}'", "'0.0.0'")
    bad = subprocess.run([sys.executable, "-c", wrong], capture_output=True, text=True)
    assert bad.returncode != 0 and "expected 0.0.0" in bad.stderr


# -- local cluster script -----------------------------------------------------------------


def test_local_cluster_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(LOCAL_CLUSTER)], check=True)
    assert LOCAL_CLUSTER.stat().st_mode & stat.S_IXUSR, "not executable"
    assert "set -euo pipefail" in LOCAL_CLUSTER.read_text()


# A stand-in for `ray`: records how it was called, and for `ray start --head` writes the
# address file and listens on the dashboard port; then blocks like `ray start --block`.
RAY_STUB = """#!{python}
import json, os, socket, sys, time
argv = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"argv": argv, "auth": os.environ.get("RAY_AUTH_MODE"), "pid": os.getpid()}}) + "\\n")
opt = lambda name: argv[argv.index(name) + 1]
if "--head" in argv:
    with open(os.path.join(opt("--temp-dir"), "ray_current_cluster"), "w") as f:
        f.write("127.0.0.1:" + opt("--port"))
    s = socket.socket()
    s.bind(("127.0.0.1", int(opt("--dashboard-port"))))
    s.listen()
print("Ray runtime started.", flush=True)
time.sleep(600)
"""


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def local_cluster_sh(tmp_path: Path) -> Any:
    """Run deploy/local-cluster.sh with the stub as RAY, HOME and STATE_DIR under tmp_path."""
    stub = tmp_path / "bin" / "ray"
    stub.parent.mkdir()
    stub.write_text(RAY_STUB.format(python=sys.executable))
    stub.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("N", "RAY_AUTH_MODE")}
    env = {
        **base,
        "RAY": str(stub),
        "HOME": str(tmp_path),
        "STATE_DIR": str(tmp_path / "state"),
        "STUB_LOG": str(tmp_path / "calls.jsonl"),
        "GRACE": "5",
    }

    def sh(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(LOCAL_CLUSTER), *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )

    yield sh
    if (tmp_path / "calls.jsonl").exists():  # whatever a failed test left running, by pid
        for call in _stub_calls(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(call["pid"], signal.SIGKILL)


def _stub_calls(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def _session_alive(sid: int) -> bool:
    """Any process (not a zombie) left in the session that `ray start` with this pid led."""
    out = subprocess.run(["ps", "-e", "-o", "sid=,stat="], capture_output=True, text=True).stdout
    return any(row.split()[0] == str(sid) and not row.split()[1].startswith("Z") for row in out.splitlines())


@pytest.mark.parametrize(
    ("args", "env", "workers", "cpus", "head_cpus"),
    [
        ([], {}, 2, "1", "1"),
        ([], {"N": "3"}, 3, "1", "1"),
        (["1", "--num-cpus", "2", "--head-num-cpus", "0"], {}, 1, "2", "0"),
    ],
)
def test_local_cluster_script_starts_and_stops_exactly_its_nodes(
    local_cluster_sh: Any,
    tmp_path: Path,
    args: list[str],
    env: dict[str, str],
    workers: int,
    cpus: str,
    head_cpus: str,
) -> None:
    port, dash = _free_ports(2)
    p = local_cluster_sh("up", *args, "--port", str(port), "--dashboard-port", str(dash), **env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"address:   127.0.0.1:{port}" in p.stdout and f"http://127.0.0.1:{dash}" in p.stdout
    calls = _stub_calls(tmp_path)
    assert [c["auth"] for c in calls] == ["token"] * (1 + workers)
    head, *rest = [c["argv"] for c in calls]
    assert head[:2] == ["start", "--block"] and "--head" in head
    assert head[head.index("--num-cpus") + 1] == head_cpus
    assert head[head.index("--dashboard-host") + 1] == "127.0.0.1"
    assert len(rest) == workers and all("--head" not in w for w in rest)
    assert all(w[w.index("--address") + 1] == f"127.0.0.1:{port}" for w in rest)
    assert all(w[w.index("--num-cpus") + 1] == cpus for w in rest)
    token = tmp_path / ".ray" / "auth_token"
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text()) and token.stat().st_mode & 0o777 == 0o600

    st = local_cluster_sh("status")
    assert st.returncode == 0, st.stderr
    rows = [line.split() for line in st.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["head"] + [f"worker-{i}" for i in range(1, workers + 1)]
    assert all(r[2] == "up" for r in rows)
    pids = [int(r[1]) for r in rows]
    again = local_cluster_sh("up", "--port", str(port), "--dashboard-port", str(dash))
    assert again.returncode == 1 and "already up" in again.stderr

    k = local_cluster_sh("kill-node", "worker-1")  # a node-failure drill: the whole node at once
    assert k.returncode == 0 and "SIGKILLed worker-1" in k.stdout, k.stderr
    assert not _session_alive(pids[1]) and _session_alive(pids[0])
    st = local_cluster_sh("status")
    assert [line.split()[2] for line in st.stdout.splitlines()[2:4]] == ["up", "DOWN"]
    assert local_cluster_sh("kill-node", "worker-9").returncode == 2

    d = local_cluster_sh("down")
    assert d.returncode == 0, d.stderr
    assert "down: stopped head" in d.stdout and not any(_session_alive(pid) for pid in pids)
    assert not (tmp_path / "state").exists()
    p = local_cluster_sh("status")
    assert p.returncode == 1 and "no cluster recorded" in p.stderr
    p = local_cluster_sh("down")
    assert p.returncode == 0 and "nothing to stop" in p.stdout


def test_local_cluster_script_rejects_bad_usage(local_cluster_sh: Any, tmp_path: Path) -> None:
    for args in ([], ["bogus"]):
        p = local_cluster_sh(*args)
        assert p.returncode == 2 and "Usage:" in p.stderr
    p = local_cluster_sh("--help")
    assert p.returncode == 0 and "Usage:" in p.stdout and "ray start" not in p.stderr
    for args in (
        ["up", "--bogus", "1"],
        ["up", "--port"],
        ["up", "--num-cpus", "x"],
        ["down", "now"],
        ["status", "--json"],
        ["kill-node"],
    ):
        p = local_cluster_sh(*args)
        assert p.returncode == 2 and p.stderr.startswith("error: "), (args, p.stderr)
    assert not (tmp_path / "calls.jsonl").exists() and not (tmp_path / "state").exists()  # nothing started


# -- docs ---------------------------------------------------------------------------------


def test_deploy_doc_covers_every_artifact() -> None:
    text = DEPLOY_DOC.read_text()
    for p in sorted(DEPLOY.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            assert _rel(p) in text, f"docs/deploy.md does not mention {_rel(p)}"


def test_every_cluster_deploy_starts_sees_a_lost_node_fast(dockerfile: list[str]) -> None:
    """The head's node health checks, as the image, the local cluster script and the test
    clusters set them (bench/node_loss.py: 14.8 s to see a SIGKILLed node with Ray's own
    settings, 2.5 s with these). Ray reads RAY_<name> for each of its config entries."""
    from ray._raylet import Config  # type: ignore[attr-defined]  # see orchestrator/ray_compat.py

    want = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    for name in want:
        assert hasattr(Config, name.removeprefix("RAY_")), f"Ray has no config entry {name}"
    env = " ".join(i for i in dockerfile if i.startswith("ENV "))
    script = LOCAL_CLUSTER.read_text()
    support = (ROOT / "harness" / "cluster.py").read_text()
    for name, value in want.items():
        assert f"{name}={value}" in env, f"deploy/Dockerfile does not set {name}={value}"
        assert f'export {name}="${{{name}:-{value}}}"' in script, f"local-cluster.sh does not set {name}"
        assert f'"{name}": "{value}"' in support, f"harness/cluster.py does not set {name}"

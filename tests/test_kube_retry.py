"""`orchestrator run SPEC --resume-if-exists`: the entrypoint a retried job runs unchanged.

KubeRay's `backoffLimit` (deploy/kuberay/rayjob.yaml) reruns the very same entrypoint on a
new cluster after the driver dies. That command must continue the unfinished run from its
latest commit when the stored spec is this one, start the run when there is none, say a
finished run is finished (exit 0, no Ray), and refuse (exit 2, naming the fields) a spec that
differs from the stored one.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from pathlib import Path

import pytest
import yaml

from harness.cli import ROOT, jsonl, manifest, run_cli, start_cli, wait_until
from harness.cluster import committed
from orchestrator.core.manifest import Manifest, write_manifest
from orchestrator.driver import store_spec
from orchestrator.spec import load_spec

RAYJOB = ROOT / "deploy" / "kuberay" / "rayjob.yaml"
LAUNCHER = ROOT / "deploy" / "cluster-launcher" / "aws.yaml"
FLAG = "--resume-if-exists"


def _cmd(tmp_path: Path, name: str, *sets: str) -> list[str]:
    return [
        "run",
        "configs/digits.yaml",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        f"name={name}",
        *(a for s in sets for a in ("--set", s)),
        FLAG,
        "--address",
        "local",
    ]


def _stored_run(tmp_path: Path, name: str, status: str, *sets: str) -> Path:
    """A run in storage as a driver leaves it (its spec.yaml and manifest), without training:
    these tests only read it, and must not start Ray."""
    spec = load_spec(ROOT / "configs" / "digits.yaml", [f"storage.root={tmp_path}", f"name={name}", *sets])
    storage = spec.open_run_storage()
    store_spec(storage, spec)
    write_manifest(storage, Manifest(run=name, status=status))
    return tmp_path / name


def _untouched(run_dir: Path, before: bytes) -> None:
    """No driver started: no lease taken, no event written, the manifest as it was."""
    assert not (run_dir / "lease.json").exists()
    assert not (run_dir / "events.jsonl").exists()
    assert (run_dir / "manifest.json").read_bytes() == before


# -- no Ray: what the flag decides from storage alone -----------------------------------------


def test_a_changed_spec_is_refused_naming_each_differing_field(tmp_path):
    run_dir = _stored_run(tmp_path, "changed", "running")
    before = (run_dir / "manifest.json").read_bytes()
    p = run_cli(
        *_cmd(tmp_path, "changed", "epochs=7", "task.options.lr=0.1", "checkpoint.top_k=2"), timeout=120
    )
    assert p.returncode == 2, p.stdout + p.stderr
    err = p.stderr
    assert str(run_dir) in err and "differs from the stored spec" in err, err
    for field, old, new in (("epochs", 10, 7), ("task.options.lr", 0.05, 0.1), ("checkpoint.top_k", 3, 2)):
        assert f"{field}: {old} -> {new}" in err, err
    assert "seed" not in err and "storage.root" not in err, err  # only what differs
    assert f"orchestrator resume {run_dir}" in err and "--set name=" in err, err
    _untouched(run_dir, before)


def test_redacted_secrets_are_not_a_difference(tmp_path):
    # The stored spec.yaml holds "***" for a secret; the entrypoint carries the real value.
    run_dir = _stored_run(tmp_path, "secret", "finished", "storage.options.password=stored-pass")
    assert "stored-pass" not in (run_dir / "spec.yaml").read_text()
    before = (run_dir / "manifest.json").read_bytes()
    p = run_cli(*_cmd(tmp_path, "secret", "storage.options.password=another-pass"), timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "already finished" in p.stdout, p.stdout
    _untouched(run_dir, before)
    # A non-secret option is compared like any field.
    p = run_cli(
        *_cmd(tmp_path, "secret", "storage.options.password=x", "storage.options.auto_mkdir=true"),
        timeout=120,
    )
    assert p.returncode == 2 and "storage.options.auto_mkdir: (not set) -> true" in p.stderr, p.stderr


def test_a_finished_run_with_the_same_spec_is_reported_finished_without_ray(tmp_path):
    run_dir = _stored_run(tmp_path, "done", "finished")
    before = (run_dir / "manifest.json").read_bytes()
    t0 = time.monotonic()
    p = run_cli(*_cmd(tmp_path, "done"), "--json", timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.loads(p.stdout)
    assert summary["status"] == "finished" and summary["already_finished"] is True
    assert summary["run_uri"] == str(run_dir)
    assert time.monotonic() - t0 < 60  # an embedded Ray alone takes longer to start and stop here
    _untouched(run_dir, before)
    p = run_cli(*_cmd(tmp_path, "done"), timeout=120)
    assert p.returncode == 0 and "already finished" in p.stdout and "nothing to do" in p.stdout, p.stdout


def test_resume_of_a_finished_run_answers_from_storage_without_ray(tmp_path):
    """`orchestrator resume` of a finished run used to start Ray (50 s here) and print a
    replayed, wrong history; now storage answers, and no driver starts (no lease, no event).
    More epochs than the run was asked for go on to train (here: to an address nothing
    answers at, refused before Ray)."""
    run_dir = _stored_run(tmp_path, "done", "finished")
    before = (run_dir / "manifest.json").read_bytes()
    p = run_cli("resume", str(run_dir), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"[run] {run_dir} already finished (epochs: 10); nothing to do (Ray not started)" in p.stdout, (
        p.stdout
    )
    p = run_cli("resume", str(run_dir), "--set", "epochs=8", "--json", timeout=300)
    assert p.returncode == 0 and json.loads(p.stdout)["already_finished"] is True, p.stdout + p.stderr
    _untouched(run_dir, before)
    p = run_cli("resume", str(run_dir), "--set", "epochs=12", "--address", "127.0.0.1:9", timeout=300)
    assert p.returncode == 5 and "no Ray cluster answers at 127.0.0.1:9" in p.stderr, p.stdout + p.stderr


def test_without_the_flag_run_still_refuses_an_existing_run(tmp_path):
    _stored_run(tmp_path, "plain", "running")
    cmd = [a for a in _cmd(tmp_path, "plain") if a != FLAG]
    p = run_cli(*cmd, timeout=180)
    assert p.returncode == 2 and "orchestrator resume" in p.stderr, p.stderr


def test_the_flag_is_in_run_help():
    p = run_cli("run", "--help", timeout=60)
    assert p.returncode == 0 and FLAG in p.stdout, p.stdout


def test_the_deploy_entrypoints_continue_their_run():
    argv = shlex.split(yaml.safe_load(RAYJOB.read_text())["spec"]["entrypoint"])
    assert argv[:2] == ["orchestrator", "run"] and FLAG in argv, argv
    launcher = LAUNCHER.read_text()
    assert f"orchestrator run /app/configs/digits-s3.yaml {FLAG}" in launcher


# -- the retry as KubeRay makes it: the same command, a dead driver between -----------------


def _rayjob_command(tmp_path: Path) -> list[str]:
    """The RayJob's entrypoint, run here: its spec from this checkout instead of the image's
    /app/configs, its storage.root a local directory instead of the bucket."""
    argv = shlex.split(yaml.safe_load(RAYJOB.read_text())["spec"]["entrypoint"])
    assert argv[:2] == ["orchestrator", "run"], argv
    name = argv[2].removeprefix("/app/configs/")
    config = next(p for p in (ROOT / "deploy" / "configs" / name, ROOT / "configs" / name) if p.is_file())
    rest = [f"storage.root={tmp_path}" if a.startswith("storage.root=") else a for a in argv[3:]]
    # Shorter than the spec's 10 epochs, and an embedded Ray whatever else runs on this machine.
    return ["run", str(config.relative_to(ROOT)), *rest, "--set", "epochs=6", "--address", "local"]


@pytest.mark.e2e
def test_the_rayjob_entrypoint_run_again_after_a_driver_kill_continues_the_run(tmp_path, kill_group):
    # Each attempt starts its own embedded Ray and the SIGKILLed driver's Ray goes with it, as
    # each KubeRay retry gets a new RayCluster: a cluster shared between the attempts (the
    # `ray_cluster` fixture of test_cluster_jobs.py) would keep state a real retry never sees.
    cmd = _rayjob_command(tmp_path)
    spec = load_spec(ROOT / cmd[1], [a for a in cmd[2:] if "=" in a])
    run_dir = Path(spec.run_uri)
    first = start_cli(*cmd, log=tmp_path / "first.log")
    kill_group(first)
    reported = lambda: [r["epoch"] for r in jsonl(run_dir / "metrics.jsonl")]  # noqa: E731
    latest = lambda: max((c["epoch"] for c in committed(run_dir)), default=0)  # noqa: E731
    wait_until(
        lambda: (3 in reported() and latest() >= 2) or first.poll() is not None,
        400,
        "epoch 3, and a commit of epoch 2",
    )
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
    os.kill(first.pid, signal.SIGKILL)  # the driver only, as a lost head pod takes it
    first.wait(timeout=30)
    assert manifest(run_dir)["status"] == "running"

    second = run_cli(*cmd, timeout=600)  # the retry: the very same command
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    assert "[run] finished: 6 epochs" in second.stdout, second.stdout[-3000:]
    header = next(line for line in second.stdout.splitlines() if line.startswith(f"[run] {spec.name}:"))
    assert ", on an embedded Ray (" in header, header  # which Ray it runs on
    assert manifest(run_dir)["status"] == "finished"
    rows = [
        json.loads(line)
        for line in run_cli("metrics", str(run_dir), "--json", check=True).stdout.splitlines()
    ]
    assert [r["epoch"] for r in rows] == list(range(1, 7))  # every epoch exactly once
    events = jsonl(run_dir / "events.jsonl")
    starts = [e for e in events if e["kind"] == "driver_started"]
    assert [s["resume"] for s in starts] == [False, True]
    attempt = [e for e in events if e["kind"] == "attempt_started" and e["ts"] > starts[1]["ts"]]
    assert attempt[0]["restore"] is not None and attempt[0]["restore_epoch"] >= 2  # continued, not restarted
    assert all(r["attempt"] == 1 for r in rows if r["epoch"] <= attempt[0]["restore_epoch"])

    # A third attempt (KubeRay retries only failures, but a person may rerun it): finished.
    third = run_cli(*cmd, timeout=120)
    assert third.returncode == 0 and "already finished" in third.stdout, third.stdout + third.stderr
    # The same entrypoint with a changed spec: refused, naming the fields, the run untouched.
    changed = run_cli(*cmd, "--set", "epochs=8", "--set", "task.options.lr=0.1", timeout=120)
    assert changed.returncode == 2, changed.stdout + changed.stderr
    assert "epochs: 6 -> 8" in changed.stderr and "task.options.lr: 0.05 -> 0.1" in changed.stderr, (
        changed.stderr
    )
    assert len([e for e in jsonl(run_dir / "events.jsonl") if e["kind"] == "driver_started"]) == 2

"""deploy/serve: the best checkpoint served over real HTTP by a real Ray Serve, and reloaded
when a better one is committed.

The run is made without training a cluster: checkpoints of a digits CNN trained here for
an epoch or two, written as the workers write them (model.pt, then checkpoint.json) and
committed through the real RunLedger. Serve runs as `serve run CONFIG` in a process of its
own (its own local Ray), stopped with Ctrl-C (SIGINT) as a user would.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml
from sklearn.datasets import load_digits

from harness.cli import ROOT, cli_env, manifest, wait_until
from harness.s3 import free_port
from orchestrator.api import load_best
from orchestrator.coordinator import RunLedger
from orchestrator.core.manifest import CHECKPOINTS, RECORD, CheckpointRecord, FileEntry
from orchestrator.core.retention import RetentionConfig
from orchestrator.core.storage import Storage, sha256_hex
from orchestrator.driver import store_spec
from orchestrator.spec import load_spec
from workers.metrics import evaluate
from workers.task import TaskContext
from workers.tasks import digits

SERVE = str(Path(sys.executable).parent / "serve")
POLL_S = 1.0


class Trainer:
    """The digits task, trained here a little at a time; each checkpoint is committed the
    way rank 0's writer commits it."""

    def __init__(self, run_dir: Path) -> None:
        spec = load_spec(
            ROOT / "configs" / "digits.yaml",
            [f"storage.root={run_dir.parent}", f"name={run_dir.name}", "chaos.kills=[]"],
        )
        self.storage = Storage(str(run_dir))
        store_spec(self.storage, spec)
        ck = spec.checkpoint
        cfg = RetentionConfig(ck.monitor, ck.mode, ck.top_k, ck.keep_latest)
        self.ledger = RunLedger(self.storage, spec.name, cfg)
        self.attempt = self.ledger.start_attempt(world_size=1)["attempt"]
        torch.manual_seed(0)
        self.task = digits.build(spec.task.options, TaskContext(0, 1, spec.seed, torch.device("cpu")))
        self.epoch = self.step = 0

    def train_epoch(self) -> None:
        t = self.task
        t.model.train()
        for x, y in torch.utils.data.DataLoader(t.train_data, batch_size=t.batch_size, shuffle=True):
            t.optimizer.zero_grad()
            torch.nn.functional.cross_entropy(t.model(x), y).backward()
            t.optimizer.step()
            self.step += 1
        self.epoch += 1

    def commit(self, val_loss: float | None = None, damage: bool = False) -> str:
        metrics = evaluate(self.task, self.task.model, torch.device("cpu"))
        if val_loss is not None:
            metrics["val_loss"] = val_loss
        cid = f"epoch{self.epoch:04d}-step{self.step:07d}-a{self.attempt}"
        buf = io.BytesIO()
        torch.save(self.task.model.state_dict(), buf)
        data = buf.getvalue()
        self.storage.write_bytes(f"{CHECKPOINTS}/{cid}/model.pt", data)
        record = CheckpointRecord(
            id=cid,
            epoch=self.epoch,
            step_in_epoch=0,
            global_step=self.step,
            end_of_epoch=True,
            metrics=metrics,
            files=[FileEntry(path="model.pt", size=len(data), sha256=sha256_hex(data))],
            world_size=1,
            attempt=self.attempt,
        )
        body = json.dumps(record.model_dump(), indent=1).encode()
        self.storage.write_bytes(f"{CHECKPOINTS}/{cid}/{RECORD}", body)  # last, as the writer does
        if damage:  # bit rot after the upload: same size, other bytes; the commit does not hash
            self.storage.write_bytes(f"{CHECKPOINTS}/{cid}/model.pt", bytes(b ^ 0xFF for b in data))
        self.ledger.commit(record)
        return cid


def http(method: str, url: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return 0, str(e)


def tree(pid: int) -> set[tuple[int, float]]:
    """A process and everything under it, as (pid, start time): a reused pid is not a survivor."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    out = set()
    for p in procs:
        try:
            out.add((p.pid, p.create_time()))
        except psutil.NoSuchProcess:
            pass
    return out


def alive(procs: set[tuple[int, float]]) -> set[tuple[int, float]]:
    left = set()
    for pid, created in procs:
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                left.add((pid, created))
        except psutil.NoSuchProcess:
            pass
    return left


def start_serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`serve run CONFIG` in its own session, its output to log."""
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [SERVE, "run", "--address", "local", str(config)],
            cwd=ROOT,  # deploy.serve.app imports from the repository root
            env=cli_env(PYTHONDONTWRITEBYTECODE="1", RAY_USAGE_STATS_ENABLED="0"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Ctrl-C must reach it as KeyboardInterrupt: Python installs that handler only when
            # SIGINT is not ignored at start, and a shell's background job ignores it (seen: under
            # `nohup ... &`, serve run sat through SIGINT for 150 s).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def model_predictions(run_dir: Path, images: torch.Tensor) -> tuple[str, list[int]]:
    """The best checkpoint's own answers, loaded here the documented way."""
    from orchestrator.api import open_run

    best = open_run(str(run_dir)).best().id
    model = load_best(str(run_dir), model=digits.build_model({}))
    with torch.inference_mode():
        return best, model(images).argmax(dim=1).tolist()


@pytest.mark.e2e
def test_serves_the_best_checkpoint_and_reloads_a_better_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "digits"
    trainer = Trainer(run_dir)
    trainer.train_epoch()
    first = trainer.commit()
    assert load_best(str(run_dir)).keys()  # a committed, verified best exists

    # Serve's own config file, pointed at this run and at a free loopback port.
    config = yaml.safe_load((ROOT / "deploy" / "serve" / "config.yaml").read_text())
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["applications"][0]["args"].update(run_uri=str(run_dir), poll_s=POLL_S)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{port}"

    digits_data = load_digits()
    images = torch.tensor(digits_data.images[:200], dtype=torch.float32) / 16.0  # as the task scales
    flat = images.reshape(len(images), 64).tolist()
    labels = digits_data.target[:200].tolist()

    t_start = time.time()
    proc = start_serve(tmp_path / "serve.yaml", tmp_path / "serve.log")
    started: set[tuple[int, float]] = set()
    try:

        def up() -> bool:
            started.update(tree(proc.pid))
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-5000:]
            return http("GET", f"{base}/healthz", timeout=2)[0] == 200

        wait_until(up, timeout=180, what="Serve to answer /healthz", interval=1)
        print(f"serve up in {time.time() - t_start:.1f}s")
        status, health = http("GET", f"{base}/healthz")
        assert health["checkpoint"] == first and health["run"] == str(run_dir)

        # Answers are the checkpoint's own, for flat inputs and 8x8 images alike.
        best, expected = model_predictions(run_dir, images.unsqueeze(1))
        assert best == first
        status, out = http("POST", f"{base}/predict", {"inputs": flat})
        assert status == 200, out
        assert out["predictions"] == expected and out["checkpoint"] == first and out["epoch"] == 1
        # Beside each label, the class probabilities: the softmax of the model's logits.
        assert [o["label"] for o in out["outputs"]] == expected, out["outputs"][:3]
        for o in out["outputs"]:
            probs = o["probabilities"]
            assert len(probs) == 10 and all(0.0 <= p <= 1.0 for p in probs), o
            assert abs(sum(probs) - 1.0) < 1e-5, o
            assert max(range(len(probs)), key=probs.__getitem__) == o["label"], o
        local = load_best(str(run_dir), model=digits.build_model({}))
        with torch.inference_mode():
            mine = local(images.unsqueeze(1)).double().softmax(dim=1)
        served = torch.tensor([o["probabilities"] for o in out["outputs"]], dtype=torch.float64)
        assert torch.allclose(served, mine, atol=1e-6), (served[:2], mine[:2])  # the model's own
        status, out8 = http("POST", f"{base}/predict", {"inputs": images[:5].tolist()})
        assert status == 200 and out8["predictions"] == expected[:5], out8

        # Bad input: a clear 422, the server keeps serving.
        status, err = http("POST", f"{base}/predict", {"inputs": [[1.0, 2.0]]})
        assert status == 422 and "64 numbers" in err, err

        # A better checkpoint (more training, lower val_loss) is committed: served within a poll.
        trainer.train_epoch()
        trainer.train_epoch()
        second = trainer.commit()
        committed_at = time.time()
        better, expected2 = model_predictions(run_dir, images.unsqueeze(1))
        assert better == second != first and expected2 != expected  # different weights, different answers

        generation = manifest(run_dir)["generation"]
        answers = {first: expected, second: expected2}

        def reloaded() -> bool:
            status, out = http("POST", f"{base}/predict", {"inputs": flat})
            assert status == 200, out
            assert out["predictions"] == answers[out["checkpoint"]]  # one model per request, never a mix
            return bool(out["checkpoint"] == second)

        wait_until(reloaded, timeout=30, what="the better checkpoint to be served", interval=0.05)
        latency = time.time() - committed_at
        status, out = http("POST", f"{base}/predict", {"inputs": flat})
        assert out["predictions"] == expected2 and out["epoch"] == 3 and out["generation"] == generation
        assert sum(p == y for p, y in zip(out["predictions"], labels, strict=True)) > 0.8 * len(labels)
        status, health = http("GET", f"{base}/healthz")
        assert health["checkpoint"] == second and health["last_error"] is None
        print(f"reload seen {latency:.2f}s after the commit (poll_s={POLL_S}); load_s={health['load_s']}")

        # A worse checkpoint, then a "better" one whose model.pt is damaged: neither is served.
        trainer.train_epoch()
        trainer.commit(val_loss=10.0)
        trainer.train_epoch()
        damaged = trainer.commit(val_loss=0.0, damage=True)
        generation = manifest(run_dir)["generation"]

        def checked() -> bool:
            return bool(http("GET", f"{base}/healthz")[1]["checked_generation"] == generation)

        wait_until(checked, timeout=30, what="the server to check the latest manifest", interval=0.2)
        status, health = http("GET", f"{base}/healthz")
        assert health["checkpoint"] == second, health
        (skipped,) = health["skipped"]
        assert skipped["id"] == damaged and "sha256" in skipped["reason"], skipped
        status, out = http("POST", f"{base}/predict", {"inputs": flat})
        assert out["checkpoint"] == second and out["predictions"] == expected2
    finally:
        started.update(tree(proc.pid))
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: `serve run` shuts Serve and its Ray down
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)

    # Nothing it started survives: Serve's controller, proxy, replica, and the Ray it started.
    assert len(started) > 3, started
    try:
        wait_until(lambda: not alive(started), timeout=30, what="Serve's processes to exit")
    finally:
        for pid, _ in alive(started):  # fail, but leave nothing behind
            psutil.Process(pid).kill()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# -- a run that cannot be served: one line, once -----------------------------------------------


def build(args: dict[str, Any]) -> Any:
    """The app builder, as Serve's build task calls it (from the repository root)."""
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    from deploy.serve.app import app_builder

    return app_builder(args)


def test_a_run_that_cannot_be_served_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    from ray.serve.exceptions import RayServeException

    monkeypatch.chdir(tmp_path)  # run_uri runs/digits resolves here, as in `serve run`'s directory
    with pytest.raises(RayServeException) as e:  # Serve's kind: reported alone, never retried
        build({"run_uri": "runs/digits"})
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"run_uri runs/digits ({tmp_path}/runs/digits): no run there"), msg
    assert "`make demo` writes runs/digits" in msg and "args.run_uri in deploy/serve/config.yaml" in msg, msg

    Trainer(tmp_path / "runs" / "digits")  # a run, started, with nothing committed yet
    with pytest.raises(
        RayServeException,
        match=r"^run_uri runs/digits \(.*\): no committed checkpoint "
        r"with a 'val_loss' value to serve yet \(status running\); start the app after",
    ):
        build({"run_uri": "runs/digits"})

    (tmp_path / "runs" / "digits" / "manifest.json").write_text("{not json")  # and no backup
    with pytest.raises(RayServeException, match=r"^run_uri runs/digits .*: the run cannot be read: ") as e:
        build({"run_uri": "runs/digits"})
    assert "\n" not in str(e.value), str(e.value)

    with pytest.raises(RayServeException, match=r"arguments .*: poll_s: Input should be greater than 0$"):
        build({"run_uri": "runs/digits", "poll_s": 0})

    # a run of a train function whose module has no serving_model: the hook named, one line
    from test_export import make_run

    from orchestrator.core.storage import Storage

    (tmp_path / "bare.py").write_text("def train(session):\n    pass\n")
    make_run(Storage(str(tmp_path / "runs" / "fn")), [0.5], task=f"{tmp_path / 'bare.py'}:train")
    with pytest.raises(
        RayServeException,
        match=r"^run_uri runs/fn \(.*\): task .* is a train function.*"
        r"def serving_model\(options\)",
    ) as e:
        build({"run_uri": "runs/fn"})
    assert "\n" not in str(e.value), str(e.value)


@pytest.mark.e2e
def test_serve_run_of_a_missing_run_fails_once_in_one_line(tmp_path: Path) -> None:
    """What a newcomer who runs `serve run deploy/serve/config.yaml` before `make demo` sees."""
    config = yaml.safe_load((ROOT / "deploy" / "serve" / "config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": free_port()}
    missing = tmp_path / "runs" / "digits"
    config["applications"][0]["args"]["run_uri"] = str(missing)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    log_path = tmp_path / "serve.log"
    proc = start_serve(tmp_path / "serve.yaml", log_path)
    started: set[tuple[int, float]] = set()
    try:

        def failed() -> bool:
            started.update(tree(proc.pid))
            assert proc.poll() is None, log_path.read_text()[-5000:]
            return "failed with exception" in log_path.read_text()

        wait_until(failed, timeout=240, what="Serve to report the app's failure", interval=1)
        time.sleep(5)  # a retry would start within this
        out = log_path.read_text()
        print(out[-3000:])
        lines = [line for line in out.splitlines() if f"run_uri {missing}: no run there" in line]
        assert len(lines) == 1, out[-5000:]  # once: the build is not retried
        assert "`make demo` writes runs/digits" in lines[0], lines[0]
        assert out.count("Importing application 'best-checkpoint'") == 1, out[-5000:]
        assert "Traceback" not in out and "retries remaining" not in out, out[-5000:]
    finally:
        started.update(tree(proc.pid))
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C, as the message says
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    try:
        wait_until(lambda: not alive(started), timeout=30, what="Serve's processes to exit")
    finally:
        for pid, _ in alive(started):
            psutil.Process(pid).kill()


# -- serving an alias: a promote of another run is served without a redeploy ----------------


def checkpoint_predictions(run_dir: Path, cid: str, images: torch.Tensor) -> list[int]:
    """Checkpoint cid's own answers, its weights read back the documented way."""
    from orchestrator.api import open_run

    _, state, _ = open_run(str(run_dir)).weights(cid)
    model = digits.build_model({})
    model.load_state_dict(state)
    with torch.inference_mode():
        return list(model.eval()(images).argmax(dim=1).tolist())


@pytest.mark.e2e
def test_serving_an_alias_follows_a_promote_of_another_run(tmp_path: Path) -> None:
    from harness.cli import run_cli

    root = tmp_path / "runs"
    run_a, run_b = Trainer(root / "a"), Trainer(root / "b")
    run_a.train_epoch()
    ck_a = run_a.commit()
    for _ in range(3):
        run_b.train_epoch()
    ck_b = run_b.commit()
    images = torch.tensor(load_digits().images[:200], dtype=torch.float32).unsqueeze(1) / 16.0
    flat = images.reshape(len(images), 64).tolist()
    answers = {ck_a: checkpoint_predictions(root / "a", ck_a, images)}
    answers[ck_b] = checkpoint_predictions(root / "b", ck_b, images)
    assert answers[ck_a] != answers[ck_b]  # different weights, different answers
    run_cli("promote", str(root / "a"), "--as", "prod", check=True)

    config = yaml.safe_load((ROOT / "deploy" / "serve" / "config.yaml").read_text())
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    args = config["applications"][0]["args"]
    args.pop("run_uri")
    args.update(alias="prod", root=str(root), poll_s=POLL_S)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{port}"
    proc = start_serve(tmp_path / "serve.yaml", tmp_path / "serve.log")
    started: set[tuple[int, float]] = set()
    try:

        def up() -> bool:
            started.update(tree(proc.pid))
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-5000:]
            return http("GET", f"{base}/healthz", timeout=2)[0] == 200

        wait_until(up, timeout=180, what="Serve to answer /healthz", interval=1)
        status, health = http("GET", f"{base}/healthz")
        assert (health["alias"], health["run"], health["checkpoint"]) == ("prod", str(root / "a"), ck_a), (
            health
        )
        status, out = http("POST", f"{base}/predict", {"inputs": flat})
        assert status == 200 and out["checkpoint"] == ck_a and out["predictions"] == answers[ck_a], out

        run_cli("promote", str(root / "b"), "--as", "prod", check=True)  # another run's checkpoint
        promoted_at = time.time()

        def switched() -> bool:
            status, out = http("POST", f"{base}/predict", {"inputs": flat})
            assert status == 200, out
            assert out["predictions"] == answers[out["checkpoint"]]  # one model per request
            return bool(out["checkpoint"] == ck_b)

        wait_until(switched, timeout=30, what="run b's checkpoint to be served", interval=0.1)
        print(f"alias switch seen {time.time() - promoted_at:.2f}s after the promote (poll_s={POLL_S})")
        status, health = http("GET", f"{base}/healthz")
        assert (health["run"], health["checkpoint"], health["last_error"]) == (str(root / "b"), ck_b, None)
    finally:
        started.update(tree(proc.pid))
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    try:
        wait_until(lambda: not alive(started), timeout=30, what="Serve's processes to exit")
    finally:
        for pid, _ in alive(started):
            psutil.Process(pid).kill()


def test_the_app_given_an_alias_checks_it_before_any_replica_starts(tmp_path: Path) -> None:
    from ray.serve.exceptions import RayServeException

    from orchestrator import aliases
    from orchestrator.api import open_run

    root = tmp_path / "runs"
    run = Trainer(root / "a")
    run.train_epoch()
    run.commit()
    with pytest.raises(RayServeException) as e:
        build({"alias": "prod", "root": str(root)})
    assert str(e.value) == (
        f"alias=prod root={root}: alias 'prod': none under {root}; promote a checkpoint first: "
        "orchestrator promote RUN_URI --as prod"
    )
    for bad in ({"alias": "prod"}, {"alias": "prod", "root": str(root), "run_uri": str(root / "a")}, {}):
        with pytest.raises(RayServeException, match=r"give run_uri=RUN_URI, or alias=NAME with root=ROOT"):
            build(bad)
    aliases.promote(open_run(str(root / "a")), "prod")
    assert build({"alias": "prod", "root": str(root)}) is not None

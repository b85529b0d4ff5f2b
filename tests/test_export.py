"""Export for serving: the best checkpoint as safetensors (loaded with plain safetensors and
the model's class, in a process that imports neither orchestrator nor workers),
TorchScript and ONNX, each answering like the model itself."""

from __future__ import annotations

import inspect
import io
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from harness.cli import run_cli
from orchestrator.api import load_best
from orchestrator.coordinator import RetentionConfig, RunLedger
from orchestrator.core.manifest import CHECKPOINTS, RECORD, CheckpointRecord, FileEntry
from orchestrator.core.storage import Storage, sha256_hex
from workers.tasks.digits import DigitsCNN

CFG = RetentionConfig("val_loss", "min", top_k=2, keep_latest=1)


def digits_inputs(n: int = 64) -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().images[:n], dtype=torch.float32).unsqueeze(1) / 16.0


def make_run(storage: Storage, losses: list[float], task: str = "digits") -> None:
    """A finished digits run written the way workers and the coordinator write one (no Ray):
    real DigitsCNN weights per epoch, each checkpoint's files then its record, then commit."""
    import io

    storage.write_bytes("spec.yaml", f"name: r\ntask: {{name: '{task}', options: {{}}}}\nseed: 0\n".encode())
    led = RunLedger(storage, "r", CFG)
    led.start_attempt(1)
    for epoch, loss in enumerate(losses, start=1):
        torch.manual_seed(epoch)
        buf = io.BytesIO()
        torch.save(DigitsCNN().state_dict(), buf)
        data, cid = buf.getvalue(), f"epoch{epoch:04d}-step{epoch:07d}-a1"
        storage.write_bytes(f"{CHECKPOINTS}/{cid}/model.pt", data)
        rec = CheckpointRecord(
            id=cid,
            epoch=epoch,
            step_in_epoch=1,
            global_step=epoch,
            end_of_epoch=True,
            metrics={"val_loss": loss},
            world_size=1,
            attempt=1,
            files=[FileEntry(path="model.pt", size=len(data), sha256=sha256_hex(data))],
        )
        storage.write_bytes(f"{CHECKPOINTS}/{cid}/{RECORD}", rec.model_dump_json().encode())
        led.commit(rec)
    led.finish("finished")


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path):
    if request.param == "local":
        uri = str(tmp_path / "r")
    else:
        request.getfixturevalue("s3_env")
        uri = f"s3://{request.getfixturevalue('bucket')}/runs/r"
    make_run(Storage(uri), [0.9, 0.2, 0.5])  # epoch 2 is the best
    return uri


@pytest.fixture
def umask_077():
    """A user whose umask keeps new files private (0600): the CLI, a child, inherits it."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def modes(folder) -> dict[str, str]:
    return {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in sorted(folder.iterdir())}


def expected(uri: str) -> list[int]:
    model = load_best(uri, model=DigitsCNN())
    with torch.no_grad():
        return model(digits_inputs()).argmax(1).tolist()


INFERENCE = """
import json, sys, torch
from torch import nn
from safetensors.torch import load_file
exec(sys.argv[1])  # the model's class, as its source: nothing of this project is imported
model = DigitsCNN()
model.load_state_dict(load_file(sys.argv[2]))
model.eval()
x = torch.tensor(json.loads(sys.argv[3]))
print(json.dumps({"pred": model(x).argmax(1).tolist(),
                  "leaked": sorted(m for m in sys.modules if m.split(".")[0] in ("orchestrator", "workers"))}))
"""


def test_safetensors_export_loads_without_this_package(run_uri, tmp_path, umask_077):
    p = run_cli("export", run_uri, "--out", str(tmp_path / "exp"), "--format", "safetensors", "--json")
    assert p.returncode == 0, p.stderr
    assert modes(tmp_path / "exp") == {"config.json": "0o644", "model.safetensors": "0o644"}
    assert p.stderr == "", p.stderr[-3000:]
    config = json.loads(p.stdout)
    assert config["checkpoint"] == "epoch0002-step0000002-a1" and config["epoch"] == 2
    assert config["metrics"] == {"val_loss": 0.2} and config["monitor"] == "val_loss"
    assert config["task"] == "digits" and config["run_uri"] == run_uri
    assert set(config["source_sha256"]) == {"model.pt"}
    assert json.loads((tmp_path / "exp" / "config.json").read_text()) == config
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            INFERENCE,
            inspect.getsource(DigitsCNN),
            str(tmp_path / "exp" / "model.safetensors"),
            json.dumps(digits_inputs().tolist()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["leaked"] == []
    assert got["pred"] == expected(run_uri)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_traced_exports_answer_like_the_model(tmp_path, fmt, umask_077):
    uri = str(tmp_path / "r")
    make_run(Storage(uri), [0.9, 0.2, 0.5])
    p = run_cli("export", uri, "--out", str(tmp_path / fmt), "--format", fmt, "--json", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    # Readable by a server of another user whatever the umask, and quiet: nothing of what
    # torch.onnx / onnxscript / torch.jit print on the way (warnings, progress) reaches the user.
    assert set(modes(tmp_path / fmt).values()) == {"0o644"}, modes(tmp_path / fmt)
    assert p.stderr == "", p.stderr[-3000:]
    p_text = run_cli("export", uri, "--out", str(tmp_path / f"{fmt}-text"), "--format", fmt, timeout=300)
    assert p_text.returncode == 0 and p_text.stderr == "", p_text.stderr[-3000:]
    assert (
        p_text.stdout.startswith("exported epoch0002-step0000002-a1") and len(p_text.stdout.splitlines()) == 1
    ), p_text.stdout[-3000:]
    config = json.loads(p.stdout)
    assert config["input_shape"] == ["batch", 1, 8, 8]
    # What a server needs to rebuild and feed the model, in Hugging Face's habit: the class and
    # its constructor arguments (they rebuild the model the run trained), the dtypes, and the
    # preprocessing in words.
    assert config["model_args"] == {"channels": 16, "hidden": 64, "dropout": 0.25}
    assert (config["dtype"], config["input_dtype"]) == ("float32", "float32")
    assert "divided by 16.0" in config["preprocessing"]
    assert config["model_class"] == "workers.tasks.digits.DigitsCNN"
    weights = Storage(uri).read_bytes(f"{CHECKPOINTS}/{config['checkpoint']}/model.pt")
    DigitsCNN(**config["model_args"]).load_state_dict(torch.load(io.BytesIO(weights)))
    assert sorted(f.name for f in (tmp_path / fmt).iterdir()) == sorted(
        ["config.json", config["file"]]
    )  # one file
    x = digits_inputs()
    if fmt == "torchscript":
        pred = torch.jit.load(str(tmp_path / fmt / "model.ts"))(x).argmax(1).tolist()
    else:
        ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extras")
        session = ort.InferenceSession(str(tmp_path / fmt / "model.onnx"))
        pred = session.run(None, {"input": x.numpy()})[0].argmax(1).tolist()
    assert pred == expected(uri)


def test_export_of_latest_or_an_id_and_clear_errors(tmp_path):
    uri = str(tmp_path / "r")
    make_run(Storage(uri), [0.9, 0.2, 0.5])
    p = run_cli("export", uri, "--out", str(tmp_path / "l"), "--checkpoint", "latest", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["epoch"] == 3
    p = run_cli("export", uri, "--out", str(tmp_path / "x"), "--checkpoint", "nope")
    assert p.returncode == 1 and "no committed checkpoint 'nope'" in p.stderr and "epoch0002" in p.stderr
    p = run_cli("export", uri, "--out", str(tmp_path / "x"), "--format", "pickle")
    assert p.returncode == 2 and "safetensors, torchscript, onnx" in p.stderr
    (tmp_path / "afile").write_text("x")
    p = run_cli("export", uri, "--out", str(tmp_path / "afile"))
    assert p.returncode == 2 and "--out" in p.stderr and "Traceback" not in p.stderr


def test_export_says_when_it_passed_over_a_damaged_best(tmp_path):
    uri = str(tmp_path / "r")
    make_run(Storage(uri), [0.9, 0.2, 0.5])
    best = tmp_path / "r" / CHECKPOINTS / "epoch0002-step0000002-a1" / "model.pt"
    best.write_bytes(b"x" + best.read_bytes()[1:])
    p = run_cli("export", uri, "--out", str(tmp_path / "e"), "--json")
    assert p.returncode == 0, p.stderr
    config = json.loads(p.stdout)
    assert config["epoch"] == 3 and config["skipped"][0]["id"] == "epoch0002-step0000002-a1"
    assert "failed verification" in p.stderr and "exported the next best" in p.stderr


def test_a_storage_error_is_not_blamed_on_the_output_dir(tmp_path):
    uri = str(tmp_path / "r")
    make_run(Storage(uri), [0.9, 0.2, 0.5])
    best = tmp_path / "r" / CHECKPOINTS / "epoch0002-step0000002-a1" / "model.pt"
    best.unlink()
    best.mkdir()  # reading it fails with an OSError of the run's side, not of --out
    for args in (
        ["export", uri, "--out", str(tmp_path / "e")],
        ["best", uri, "--download", str(tmp_path / "d")],
    ):
        p = run_cli(*args)
        assert p.returncode == 4 and f"{uri}: reading the run failed" in p.stderr, (args, p.stderr)


def test_load_best_builds_the_model_only_when_asked(tmp_path):
    uri = str(tmp_path / "r")
    make_run(Storage(uri), [0.9, 0.2, 0.5])
    state = load_best(uri)
    assert isinstance(state, dict) and "head.4.weight" in state
    model = load_best(uri, build=True)
    assert not model.training and isinstance(model, DigitsCNN)


def test_a_train_functions_model_gets_out_through_its_serving_model(tmp_path):
    """A train function builds its model inside itself: export and load_best(build=True) use
    the `serving_model(options)` beside it, and one without it is told what to add."""
    from orchestrator.core.tasks import TaskError

    example = inspect.getsourcefile(load_best).replace("orchestrator/api.py", "examples/session_api/train.py")
    uri = str(tmp_path / "r")
    make_run(Storage(uri), [0.9, 0.2], task=f"{example}:train")
    model = load_best(uri, build=True)
    assert isinstance(model, torch.nn.Module) and not model.training
    p = run_cli("export", uri, "--format", "torchscript", "--out", str(tmp_path / "ts"))
    assert p.returncode == 0, p.stderr
    config = json.loads((tmp_path / "ts" / "config.json").read_text())
    assert (
        config["model_class"].endswith("session_api/train.py:DigitsCNN")
        or config["model_class"] == "workers.tasks.digits.DigitsCNN"
    )
    assert config["input_shape"] == ["batch", 1, 8, 8]
    traced = torch.jit.load(str(tmp_path / "ts" / "model.ts"))
    x = digits_inputs(16)
    assert torch.allclose(traced(x), model(x), atol=1e-5)

    bare = tmp_path / "bare.py"
    bare.write_text("def train(session):\n    pass\n")
    uri2 = str(tmp_path / "r2")
    make_run(Storage(uri2), [0.5], task=f"{bare}:train")
    with pytest.raises(TaskError, match="is a train function.*def serving_model"):
        load_best(uri2, build=True)
    p = run_cli("export", uri2, "--format", "onnx", "--out", str(tmp_path / "onnx"))
    assert p.returncode == 2 and "def serving_model(options)" in p.stderr and "Traceback" not in p.stderr, (
        p.stderr
    )


NOISY_TASK = """
import sys, warnings
import torch
from workers.tasks.digits import DigitsCNN


class Untraceable(DigitsCNN):
    def forward(self, x):
        warnings.warn("a warning while tracing")
        print("printed while tracing", file=sys.stderr)
        return "not a tensor"


def serving_model(options):
    return Untraceable(), torch.zeros(2, 1, 8, 8)


def train(session):
    pass
"""


def test_a_failed_export_is_one_line_with_the_last_thing_torch_printed(tmp_path):
    task = tmp_path / "noisy.py"
    task.write_text(NOISY_TASK)
    uri = str(tmp_path / "r")
    make_run(Storage(uri), [0.5], task=f"{task}:train")
    p = run_cli("export", uri, "--format", "torchscript", "--out", str(tmp_path / "ts"), timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    (line,) = p.stderr.splitlines()  # one line: no traceback, no warning, nothing the model printed
    assert line.startswith("error: torchscript export of epoch0001-step0000001-a1 failed: RuntimeError: "), (
        line
    )
    assert "it printed last: printed while tracing" in line and "--format safetensors" in line, line


def test_best_download_files_are_readable_by_all(tmp_path, umask_077):
    uri = str(tmp_path / "r")
    make_run(Storage(uri), [0.9, 0.2, 0.5])
    p = run_cli("best", uri, "--download", str(tmp_path / "dl"), "--all-files")
    assert p.returncode == 0, p.stderr
    assert modes(tmp_path / "dl") == {"checkpoint.json": "0o644", "model.pt": "0o644"}

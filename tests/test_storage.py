"""The storage layer: atomic replacement, bounded retries, secrets kept out of messages."""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from orchestrator.core.manifest import (
    CheckpointRecord,
    FileEntry,
    Manifest,
    read_manifest,
    write_manifest,
)
from orchestrator.core.storage import (
    RetryPolicy,
    Storage,
    StorageError,
    is_transient,
    redact_options,
    secrets_in,
)


def big_manifest(n: int, gen: int = 0) -> Manifest:
    recs = [
        CheckpointRecord(
            id=f"c{i:05d}",
            epoch=i,
            step_in_epoch=0,
            global_step=i,
            end_of_epoch=True,
            metrics={"val_loss": 1.0 / (i + 1)},
            files=[FileEntry(path="model.pt", size=1, sha256="0" * 64)],
            world_size=2,
            attempt=1,
            seq=i,
        )
        for i in range(n)
    ]
    return Manifest(run="r", checkpoints=recs, generation=gen)


@pytest.mark.parametrize("uri", ["memory://atomic-test/run", "LOCAL"])
def test_manifest_roundtrip_and_generation(tmp_path, uri):
    s = Storage(str(tmp_path / "run") if uri == "LOCAL" else uri)
    assert read_manifest(s) is None
    m1 = write_manifest(s, big_manifest(3))
    m2 = write_manifest(s, m1)
    assert (m1.generation, m2.generation) == (1, 2)
    assert read_manifest(s) == m2
    if uri == "LOCAL":
        # no temp left (the .lock sidecar of the backup's compare-and-swap stays, empty)
        names = sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.endswith(".lock"))
        assert names == ["manifest.backup.json", "manifest.json"]


def torn_reads_while_rewriting(
    writer: Storage, reader: Storage, n_checkpoints: int, writes: int
) -> list[str]:
    """Rewrite the manifest `writes` times while another thread reads it in a loop; return
    every read that failed to parse or came back with the wrong content (a torn read)."""
    m = write_manifest(writer, big_manifest(n_checkpoints))
    stop = threading.Event()
    bad: list[str] = []

    def read_loop():
        while not stop.is_set():
            try:
                assert len(read_manifest(reader).checkpoints) == n_checkpoints
            except Exception as e:
                bad.append(repr(e))

    t = threading.Thread(target=read_loop)
    t.start()
    for _ in range(writes):
        m = write_manifest(writer, m)
    stop.set()
    t.join()
    return bad


def test_concurrent_reader_never_sees_a_partial_manifest(tmp_path):
    s = Storage(str(tmp_path))
    # ~600 KB: a torn write would be visible
    assert torn_reads_while_rewriting(s, Storage(str(tmp_path)), 2000, writes=40) == []
    assert read_manifest(s).generation == 41


WRITER = """
from orchestrator.core.storage import Storage
from orchestrator.core.manifest import write_manifest, read_manifest
from test_storage import big_manifest
s = Storage({root!r})
m = write_manifest(s, big_manifest(3000))
print("ready", flush=True)
while True:
    m = write_manifest(s, m)
"""


def test_sigkilled_writer_leaves_a_whole_manifest(tmp_path):
    root = str(tmp_path / "run")
    code = WRITER.format(root=root)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}  # this module, for big_manifest
    for delay in (0.05, 0.13, 0.31):
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        m = read_manifest(Storage(root))  # parses: old or new, never half
        assert m is not None and len(m.checkpoints) == 3000
        assert json.loads((tmp_path / "run" / "manifest.json").read_text())["generation"] == m.generation


class Flaky:
    """Wraps a filesystem method to fail with the given errors first."""

    def __init__(self, fn, errors):
        self.fn, self.errors, self.calls = fn, list(errors), 0

    def __call__(self, *a, **k):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.fn(*a, **k)


def test_transient_errors_are_retried_and_reported(tmp_path):
    retries = []
    s = Storage(
        "memory://flaky/run",
        retry=RetryPolicy(attempts=4, initial_s=0.01),
        on_retry=lambda what, e, n, d: retries.append((what, type(e).__name__, n)),
    )
    s.write_bytes("x", b"1")
    s.fs.cat_file = Flaky(s.fs.cat_file, [ConnectionResetError(), OSError(errno.EREMOTEIO, "InternalError")])
    assert s.read_bytes("x") == b"1"
    assert retries == [("read x", "ConnectionResetError", 1), ("read x", "OSError", 2)]


def test_retry_budget_is_bounded(tmp_path):
    s = Storage("memory://flaky2/run", retry=RetryPolicy(attempts=3, initial_s=0.01))
    s.write_bytes("x", b"1")
    s.fs.cat_file = Flaky(s.fs.cat_file, [TimeoutError("slow")] * 10)
    with pytest.raises(StorageError, match="read x failed 3 times, giving up"):
        s.read_bytes("x")
    assert s.fs.cat_file.calls == 3


def test_permanent_errors_are_not_retried():
    s = Storage("memory://flaky3/run", retry=RetryPolicy(attempts=5, initial_s=0.01))
    s.fs.cat_file = Flaky(s.fs.cat_file, [PermissionError("AccessDenied")])
    with pytest.raises(PermissionError):
        s.read_bytes("x")
    assert s.fs.cat_file.calls == 1


def s3_error(code: str, status: int, message: str = "") -> OSError:
    """What s3fs raises for an S3 error response: botocore's ClientError, translated."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    err = ClientError(
        {"Error": {"Code": code, "Message": message or code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )
    return translate_boto_error(err)


@pytest.mark.parametrize(
    "exc, transient",
    [
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (OSError(errno.EREMOTEIO, "We encountered an internal error"), True),
        (s3_error("SlowDown", 503), True),
        (s3_error("ServiceUnavailable", 503), True),
        (s3_error("InternalError", 500), True),
        (s3_error("AccessDenied", 403), False),
        (s3_error("NoSuchKey", 404), False),
        # Classified by code and status, never by the message: a 4xx that mentions "503".
        (s3_error("InvalidArgument", 400, message="part 503 timed out"), False),
        (FileNotFoundError("nope"), False),
        (PermissionError("AccessDenied"), False),
        (ValueError("bad"), False),
        (OSError(errno.EINVAL, "InvalidArgument"), False),
    ],
)
def test_is_transient(exc, transient):
    assert is_transient(exc) is transient


def test_secrets_are_found_and_redacted(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecretvalue")
    opts = {
        "key": "AKIAEXAMPLE",
        "secret": "s3cr3tvalue",
        "endpoint_url": "http://x",
        "client_kwargs": {"aws_session_token": "tok3nvalue", "region_name": "us-east-1"},
    }
    assert set(secrets_in(opts)) == {"AKIAEXAMPLE", "s3cr3tvalue", "tok3nvalue", "envsecretvalue"}
    red = redact_options(opts)
    assert (
        red["secret"] == "***" and red["key"] == "***" and red["client_kwargs"]["aws_session_token"] == "***"
    )
    assert red["endpoint_url"] == "http://x" and red["client_kwargs"]["region_name"] == "us-east-1"


def test_error_messages_do_not_carry_secrets():
    s = Storage(
        "memory://sec/run",
        {"secret_token": "canary-SECRET-123"},
        retry=RetryPolicy(attempts=2, initial_s=0.01),
    )
    s.fs.cat_file = Flaky(s.fs.cat_file, [ConnectionError("failed with canary-SECRET-123 in url")] * 3)
    with pytest.raises(StorageError) as e:
        s.read_bytes("x")
    assert "canary-SECRET-123" not in str(e.value) and "***" in str(e.value)

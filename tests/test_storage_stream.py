"""Streamed writes and file uploads through the one storage layer (Storage.write_stream,
Storage.put_file), on a local directory and on a real S3 protocol server (moto), and what a
save holds in memory: the serialized checkpoint never whole."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tracemalloc

import pytest
import torch

from orchestrator.core.manifest import CHECKPOINTS
from orchestrator.core.node_cache import NodeCache
from orchestrator.core.storage import RetryPolicy, Storage, StorageError, _hashed
from orchestrator.core.verify import read_verified
from workers.writer import CheckpointWriter

MB = 1 << 20


def blocks(total: int, block: int = 3 * MB) -> list[bytes]:
    out, i = [], 0
    while total > 0:
        n = min(block, total)
        out.append(hashlib.sha256(str(i).encode()).digest() * (n // 32) + b"x" * (n % 32))
        total, i = total - n, i + 1
    return out


def writes(parts: list[bytes], fail_after: int | None = None):
    def produce(f):
        for i, p in enumerate(parts):
            if fail_after is not None and i == fail_after:
                raise ConnectionResetError("upload interrupted (injected)")
            f.write(p)

    return produce


def test_local_stream_is_hashed_while_written_and_atomic(tmp_path):
    s = Storage(str(tmp_path / "run"))
    parts = blocks(7 * MB)
    data = b"".join(parts)
    assert s.write_stream("a/b.bin", writes(parts)) == (len(data), hashlib.sha256(data).hexdigest())
    assert s.read_bytes("a/b.bin") == data
    with pytest.raises(StorageError, match="write a/b.bin: ValueError: not this"):
        s.write_stream(
            "a/b.bin", lambda f: (f.write(b"partial"), (_ for _ in ()).throw(ValueError("not this")))
        )
    assert s.read_bytes("a/b.bin") == data  # the old file stands
    assert os.listdir(tmp_path / "run" / "a") == ["b.bin"]  # no temp file left


def test_a_transient_error_restarts_the_stream_from_the_start(tmp_path):
    s = Storage(str(tmp_path / "run"), retry=RetryPolicy(attempts=3, initial_s=0.01, max_s=0.02))
    parts, calls = blocks(2 * MB, MB), []

    def produce(f):
        calls.append(1)
        writes(parts, fail_after=1 if len(calls) == 1 else None)(f)

    data = b"".join(parts)
    assert s.write_stream("x.bin", produce) == (len(data), hashlib.sha256(data).hexdigest())
    assert len(calls) == 2 and s.read_bytes("x.bin") == data


def test_torch_save_into_a_full_disk_raises_the_disk_error(tmp_path):
    """torch.save turns a failed write into RuntimeError('unexpected pos ...'); the storage
    layer raises the OSError itself, which decides retries and the writer's fallback."""
    with open("/dev/full", "wb", buffering=0) as full, pytest.raises(OSError) as e:
        _hashed(full, lambda f: torch.save({"w": torch.zeros(1 << 16)}, f))
    assert e.value.errno == errno.ENOSPC


def test_local_put_file_replaces_atomically(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"".join(blocks(5 * MB)))
    s = Storage(str(tmp_path / "run"))
    s.put_file(str(src), "c/d.bin")
    assert s.read_bytes("c/d.bin") == src.read_bytes()
    assert os.listdir(tmp_path / "run" / "c") == ["d.bin"]


def s3_storage(request) -> tuple[Storage, str, object]:
    request.getfixturevalue("s3_env")
    bucket = request.getfixturevalue("bucket")
    moto = request.getfixturevalue("moto")
    return Storage(f"s3://{bucket}/runs/r"), bucket, moto.client()


def test_s3_stream_is_a_multipart_upload_and_a_failed_one_leaves_nothing(request):
    s, bucket, client = s3_storage(request)
    parts = blocks(20 * MB)
    data = b"".join(parts)
    assert s.write_stream("big.bin", writes(parts)) == (len(data), hashlib.sha256(data).hexdigest())
    head = client.head_object(Bucket=bucket, Key="runs/r/big.bin")
    assert head["ContentLength"] == len(data) and head["ETag"].strip('"').endswith("-3")  # 8 MiB parts
    assert s.read_bytes("big.bin") == data

    s.retry = RetryPolicy(attempts=1)
    with pytest.raises(Exception, match="upload interrupted"):
        s.write_stream("torn.bin", writes(parts, fail_after=5))  # after two parts went up
    assert not s.exists("torn.bin")
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # aborted


def test_s3_put_file_uploads_parts_concurrently_and_whole(request, tmp_path):
    s, bucket, client = s3_storage(request)
    src = tmp_path / "src.bin"
    src.write_bytes(b"".join(blocks(20 * MB)))
    s.put_file(str(src), "up.bin")
    head = client.head_object(Bucket=bucket, Key="runs/r/up.bin")
    assert head["ETag"].strip('"').endswith("-3")
    assert s.read_bytes("up.bin") == src.read_bytes()


@pytest.mark.parametrize("tier", [True, False], ids=["node-local-tier", "straight-to-shared"])
def test_s3_checkpoint_round_trip(request, tmp_path, tier):
    from test_node_cache import meta, save_all, state

    s, _, _ = s3_storage(request)
    if tier:
        s.node_cache = NodeCache(str(tmp_path / "cache"), s.uri)
    led = save_all(s, 2)
    latest = led.manifest.latest()
    plain = Storage(s.uri)
    blobs = read_verified(plain, latest)
    loaded = torch.load(io.BytesIO(blobs["model.pt"]), weights_only=True)
    assert loaded["w"].equal(state(2)["model.pt"]["w"]) and latest.id == meta(2)["id"]
    if tier:
        assert s.node_cache.has(latest.id)


@pytest.mark.parametrize("tier", [True, False], ids=["node-local-tier", "straight-to-shared"])
def test_a_save_never_holds_the_serialized_checkpoint_in_memory(tmp_path, tier):
    """The state is 16 MiB; serializing it used to build the file in a BytesIO (16 MiB, and a
    copy of it). tracemalloc sees Python's allocations (a BytesIO, bytes), not the tensors'."""
    storage = Storage(str(tmp_path / "run"))
    if tier:
        storage.node_cache = NodeCache(str(tmp_path / "cache"), storage.uri)
    writer = CheckpointWriter(storage, commit=lambda r: None, async_save=False)
    state = {"model.pt": {"w": torch.randn(2 * MB)}, "train_state.pt": {"m": torch.randn(2 * MB)}}
    meta = {
        "id": "epoch0001-step0000001-a1",
        "epoch": 1,
        "step_in_epoch": 0,
        "global_step": 1,
        "end_of_epoch": True,
        "world_size": 1,
        "attempt": 1,
    }
    tracemalloc.start()
    try:
        writer.save(meta, state)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert storage.read_bytes(f"{CHECKPOINTS}/{meta['id']}/model.pt")
    assert peak < 4 * MB, f"a save allocated {peak / MB:.1f} MiB of Python memory"

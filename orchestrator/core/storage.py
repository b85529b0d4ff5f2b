"""The one storage layer: fsspec under a run's URI, atomic writes, bounded retries.

Everything that touches shared storage (manifest, checkpoints, events, lease)
goes through `Storage`, so atomicity, retries and secret redaction are decided
once. Paths are str rather than Path because a run may live at s3://... which
Path would mangle.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import fsspec
import tenacity
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractBufferedFile

from orchestrator.core.errors import StorageProblem

T = TypeVar("T")

# A streamed write hands the store at most this much at a time: an s3fs file copies each
# write into its buffer whole before it uploads a part, so one 1 GB tensor written in one
# call would otherwise be a 1 GB copy in memory.
STREAM_CHUNK = 8 << 20
# Uploads to S3 go in parts of at least this size (S3's minimum is 5 MiB), and an uploaded
# file has this many parts in flight (each held in memory while it uploads: 32 MiB in all).
# s3fs's own defaults (50 MiB x 10) would hold 500 MiB. `storage.options.max_concurrency`
# (s3fs's own option) overrides the concurrency.
UPLOAD_PART = 8 << 20
UPLOAD_CONCURRENCY = 4
_MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload

# Option keys whose values are secrets; matched case-insensitively anywhere in the key.
# aws_access_key_id, key, secret, token, session_token, aws_secret_access_key, password, ...
_SECRET_KEY = re.compile(r"secret|token|password|passwd|credential|access_key|(^|_)key(_id)?$", re.I)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EAGAIN,
    errno.EPIPE,
    getattr(errno, "EREMOTEIO", errno.EIO),
}
# botocore / aiohttp exception classes that mean "the request did not get an answer";
# matched by class name along the MRO so this module imports neither library.
_TRANSIENT_CLASSES = {
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ClientConnectorError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "IncompleteRead",
    "FSTimeoutError",
    "HTTPClientError",
    "ResponseParserError",
}
# S3 error codes worth retrying (botocore's own retry handler uses the same set).
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
}


CLOCK_PROBE = "clock.tmp-"  # the prefix of the probe files that read a local store's clock


class StorageError(StorageProblem, RuntimeError):
    """A storage operation failed for good (not transient, or out of retry budget)."""


class Conflict(StorageProblem, RuntimeError):
    """A compare-and-swap lost: the object is no longer the version the writer last saw."""


class LocalIOError(OSError):
    """The local side of a download failed (a full disk, a directory a temp cleaner removed):
    nothing is known about the stored copy, which must not be judged by it."""


@dataclass(frozen=True)
class Versioned:
    """An object's bytes, its version (S3: the ETag; elsewhere: the sha256 of the bytes) and
    its age by the storage's own clock (S3: the response's Date minus LastModified)."""

    data: bytes
    version: str
    age_s: float  # 0.0 unless asked for (read_versioned(aged=True))


# Compare-and-swap on a local filesystem: an exclusive lock on a sidecar file around
# read-compare-replace. In-process stores (memory://) use a process-wide lock.
_MEMORY_CAS = threading.Lock()


def _s3_error(exc: BaseException) -> tuple[str, int] | None:
    """(error code, HTTP status) of a botocore ClientError, else None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return None
    code = str((response.get("Error") or {}).get("Code", ""))
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return code, status


def _lost_race(exc: BaseException) -> bool:
    """An S3 conditional write refused: 412 PreconditionFailed, or 409 when another
    conditional write to the same key is in flight."""
    for e in (exc, exc.__cause__):
        s3 = _s3_error(e) if e is not None else None
        if s3 is not None and (
            s3[1] in (409, 412) or s3[0] in ("PreconditionFailed", "ConditionalRequestConflict")
        ):
            return True
    return isinstance(exc, FileExistsError)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: 5xx, throttling, resets, timeouts. Not for 4xx.

    Decided by type, errno, and for S3 by botocore's error code and HTTP status (s3fs
    raises an OSError whose __cause__ is the ClientError); never by the message text."""
    s3 = _s3_error(exc)
    if s3 is not None:
        code, status = s3
        return code in _TRANSIENT_CODES or status >= 500 or status == 429
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return exc.__cause__ is not None and is_transient(exc.__cause__)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if any(c.__name__ in _TRANSIENT_CLASSES for c in type(exc).__mro__):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return exc.__cause__ is not None and is_transient(exc.__cause__)


@dataclass(frozen=True)
class RetryPolicy:
    """One retry budget per storage operation (the layers below are told not to retry)."""

    attempts: int = 8  # tries per operation, the first included
    initial_s: float = 0.2  # first backoff; doubles each retry
    max_s: float = 5.0  # longest single backoff

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")


def secrets_in(options: Mapping[str, Any]) -> list[str]:
    """Secret values found in storage options (nested) and the AWS environment."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if isinstance(v, str) and _SECRET_KEY.search(str(k)) and v:
                    found.append(v)
                else:
                    walk(v)

    walk(options)
    found += [os.environ[k] for k in _SECRET_ENV if os.environ.get(k)]
    return sorted(set(found), key=len, reverse=True)


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of storage options with secret values replaced, for the stored spec and logs."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, Mapping):
            out[k] = redact_options(v)
        elif isinstance(v, str) and _SECRET_KEY.search(str(k)):
            out[k] = "***"
        else:
            out[k] = v
    return out


def redact(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if len(s) >= 4:
            text = text.replace(s, "***")
    return text


class _PrivateJitter(tenacity.wait_random_exponential):
    """tenacity's full-jitter backoff, drawn from a generator of its own. tenacity draws from
    the global `random`, the stream a training loop seeds and every checkpoint captures: a
    storage retry on a rank changed that rank's Python RNG state, so a run with an S3 hiccup
    no longer equalled one without (found by harness/campaign.py)."""

    _rng = random.Random()

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        high = tenacity.wait_exponential.__call__(self, retry_state)
        return self._rng.uniform(self.min, high)


def _single_retry_owner(uri: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Turn botocore's own retries off for S3 (unless the user set them): this layer retries,
    with one budget, and logs every retry. Layered retries multiply (botocore 5 x s3fs 5 x ours).
    One attempt in all: botocore's `max_attempts` counts retries, so 1 was one more request, with
    a delay drawn from the global `random` a checkpoint captures (found by harness/campaign.py)."""
    opts = dict(options)
    if uri.startswith(("s3://", "s3a://")):
        config = dict(opts.get("config_kwargs") or {})
        config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        opts["config_kwargs"] = config
    return opts


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def part_size(size_hint: int) -> int:
    """The multipart part size for an object of about size_hint bytes: UPLOAD_PART, or more
    where S3's 10,000 parts would not hold it."""
    return max(UPLOAD_PART, -(-size_hint // (_MAX_PARTS - 1)))


class HashingWriter:
    """A write-only file object that passes what is written on to `out`, counting it and
    hashing it (sha256) on the way, so a file's checksum needs no second pass over its bytes.
    Writes are handed on in slices of at most `chunk` bytes (memoryviews: no copy).

    Hand-written because hashlib has no file wrapper and fsspec's callbacks see sizes, not
    bytes."""

    def __init__(self, out: IO[bytes], chunk: int = STREAM_CHUNK) -> None:
        self.out, self.chunk = out, chunk
        self.size = 0
        self.error: BaseException | None = None  # the first write error (see _hashed)
        self._digest = hashlib.sha256()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            for start in range(0, len(view), self.chunk):
                part = view[start : start + self.chunk]
                self._digest.update(part)
                self.out.write(part)
        except BaseException as e:
            self.error = self.error or e
            raise
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self.out.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _hashed(f: IO[bytes], produce: Callable[[HashingWriter], object]) -> tuple[int, str]:
    w = HashingWriter(f)
    try:
        produce(w)
    except Exception:
        # torch.save reports a failed write as RuntimeError("unexpected pos ..."), losing the
        # OSError (a full disk, a connection reset) that decides whether to retry: raise that.
        if w.error is not None:
            raise w.error from None
        raise
    return w.size, w.hexdigest()


def _local(path: str | None, what: str, fn: Callable[..., T]) -> T:
    """fn() for the local side of a transfer (or open(path, what) when what is a mode); its
    OSError becomes a LocalIOError naming the local path."""
    try:
        return fn(path or os.devnull, what) if what in ("wb", "rb") else fn()
    except OSError as e:
        raise LocalIOError(e.errno, f"local copy {path}: {what} failed: {e.strerror or e}") from e


def _local_atomic(target: str, fill: Callable[[IO[bytes]], T], durable: bool) -> T:
    """Write target on a local filesystem through a temp file beside it, renamed over it:
    a reader sees the old file or the whole new one. When durable, the file and the rename
    are fsynced."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            out = fill(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, target)
        if durable:  # the rename itself is durable only once the directory is
            dir_fd = os.open(os.path.dirname(target), os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return out
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Storage:
    """A run's directory on any fsspec filesystem."""

    def __init__(
        self,
        uri: str,
        options: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[str, BaseException, int, float], None] | None = None,
    ) -> None:
        self.uri = uri.rstrip("/")
        self.options = dict(options or {})
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self._secrets = secrets_in(self.options)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(
                self.uri, **_single_retry_owner(self.uri, self.options)
            )
        except (ImportError, ValueError, TypeError) as e:
            raise StorageError(f"storage {uri!r}: {self.clean(e)}") from None
        if hasattr(self.fs, "retries"):
            self.fs.retries = 1  # s3fs would retry throttling 5x on its own, unseen and unbounded by us
        self.is_local = isinstance(self.fs, LocalFileSystem)
        # This node's copy of the last committed checkpoint (orchestrator/core/node_cache.py),
        # which read_verified tries first; set on the workers' storage only.
        self.node_cache: Any = None

    def __reduce__(self) -> Any:  # ship to Ray actors without the live filesystem
        return (Storage, (self.uri, self.options, self.retry))

    def clean(self, e: BaseException) -> str:
        """e as text, every secret of these options (and of the AWS environment) masked."""
        return redact(f"{type(e).__name__}: {e}", self._secrets)

    def path(self, rel: str = "") -> str:
        return f"{self.root.rstrip('/')}/{rel.strip('/')}" if rel else self.root

    def child_uri(self, rel: str) -> str:
        return f"{self.uri}/{rel.strip('/')}"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            if self.on_retry and exc is not None:
                self.on_retry(what, exc, state.attempt_number, delay)
            if not self.is_local:
                self.fs.invalidate_cache()

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.retry.attempts),
            # Jittered: ranks that failed together do not retry in lockstep.
            wait=_PrivateJitter(multiplier=self.retry.initial_s, max=self.retry.max_s),
            retry=tenacity.retry_if_exception(is_transient),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(fn)
        except Exception as e:
            if is_transient(e):
                raise StorageError(
                    f"storage {self.uri}: {what} failed {self.retry.attempts} times, giving up: "
                    f"{self.clean(e)}"
                ) from None
            if isinstance(e, (OSError, Conflict)):
                raise  # FileNotFoundError, a lost compare-and-swap: callers act on them
            # Not an OSError: missing credentials, a client misconfiguration. Say which
            # storage and what, without the secrets.
            raise StorageError(f"storage {self.uri}: {what}: {self.clean(e)}") from None

    # -- reads ---------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        return self._call(f"read {rel}", lambda: self.fs.cat_file(self.path(rel)))

    def download(self, rel: str, target: str | None, chunk: int = 8 << 20) -> tuple[int, str]:
        """Stream rel into the local file target (whole or not at all: a .part file renamed at
        the end), or only through the hash when target is None; returns (size, sha256) of
        what was read, hashed while copying. Nothing is held in memory whole."""
        part = f"{target}.part" if target else None

        def copy() -> tuple[int, str]:
            digest, size = hashlib.sha256(), 0
            with self.fs.open(self.path(rel), "rb") as src, _local(part, "wb", open) as out:
                while block := src.read(chunk):
                    digest.update(block)
                    size += len(block)
                    _local(part, "write", lambda: out.write(block))
            if part and target:
                _local(target, "rename", lambda: os.replace(part, target))
            return size, digest.hexdigest()

        try:
            return self._call(f"read {rel}", copy)
        finally:
            if part and os.path.exists(part):
                os.unlink(part)

    def exists(self, rel: str) -> bool:
        def check() -> bool:
            if not self.is_local:
                self.fs.invalidate_cache(self.path(rel))
            return bool(self.fs.exists(self.path(rel)))

        return self._call(f"stat {rel}", check)

    def list_sizes(self, rel: str) -> dict[str, int]:
        """Every file under rel (at any depth), by its path relative to rel, with its size: one
        listing (S3: list_objects_v2 pages of 1,000 keys), not a request per file."""

        def find() -> dict[str, int]:
            base = self.path(rel).rstrip("/")
            if not self.is_local:
                self.fs.invalidate_cache()
            try:
                found = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
            return {
                k.rstrip("/")[len(base) + 1 :]: int(v.get("size") or 0)
                for k, v in found.items()
                if v.get("type") != "directory" and k.rstrip("/") != base
            }

        return self._call(f"list {rel}", find)

    def list_dirs(self, rel: str) -> list[str]:
        """Names of the entries directly under rel (empty if rel does not exist)."""

        def ls() -> list[str]:
            if not self.is_local:
                self.fs.invalidate_cache()
            try:
                entries = self.fs.ls(self.path(rel), detail=False)
            except FileNotFoundError:
                return []
            base = self.path(rel).rstrip("/")
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != base)

        return self._call(f"list {rel}", ls)

    # -- writes --------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace rel with data atomically: a reader sees the old or the new bytes, never part.

        Locally: write a temp file, fsync, rename. On object stores: one PUT, which
        the store makes visible whole or not at all.
        """
        target = self.path(rel)
        self._call(f"write {rel}", lambda: self._replace(target, data))

    def _replace(self, target: str, data: bytes) -> None:
        if not self.is_local:
            self.fs.pipe_file(target, data)
            return
        _local_atomic(target, lambda f: f.write(data), durable=True)

    def write_stream(
        self,
        rel: str,
        produce: Callable[[HashingWriter], object],
        durable: bool = True,
        size_hint: int = 0,
    ) -> tuple[int, str]:
        """Write as rel whatever produce(f) writes into f, atomically, and return its (size,
        sha256), hashed while it was written: the bytes are never held whole in memory nor read
        back. A retry calls produce again from the start, so it must be able to repeat itself.

        Locally: a temp file beside rel, renamed over it (fsynced first when durable; a cache
        need not be). On object stores: a streamed upload; on S3 a multipart upload of
        part_size(size_hint) parts, one at a time, aborted if produce fails, so nothing
        appears at rel."""
        target = self.path(rel)

        def stream() -> tuple[int, str]:
            if self.is_local:
                return _local_atomic(target, lambda f: _hashed(f, produce), durable)
            kw = {"block_size": part_size(size_hint)} if self.is_s3 else {}
            f = self.fs.open(target, "wb", **kw)
            try:
                out = _hashed(f, produce)
                f.close()  # completes the upload: a failure here aborts it too
            except BaseException:
                if discard := getattr(f, "discard", None):
                    discard()  # s3fs: abort the multipart upload
                if isinstance(f, AbstractBufferedFile):
                    f.closed = True  # its finalizer would otherwise close it: commit the part written
                raise
            return out

        return self._call(f"write {rel}", stream)

    def put_file(self, local: str, rel: str) -> None:
        """Upload the local file `local` as rel, atomically. Locally: copied beside rel and
        renamed over it, fsynced. S3: s3fs's concurrent multipart upload (UPLOAD_CONCURRENCY
        parts of part_size() in flight), which s3fs aborts if a part fails."""
        target = self.path(rel)

        def put() -> None:
            if self.is_local:
                with open(local, "rb") as src:
                    _local_atomic(target, lambda f: shutil.copyfileobj(src, f, 1 << 20), durable=True)
            elif self.is_s3:
                concurrency = self.options.get("max_concurrency", UPLOAD_CONCURRENCY)
                chunk = part_size(os.path.getsize(local))
                self.fs.put_file(local, target, chunksize=chunk, max_concurrency=concurrency)
            else:
                self.fs.put_file(local, target)
            if not self.is_local:
                self.fs.invalidate_cache(target)

        self._call(f"write {rel}", put)

    def append(self, rel: str, data: bytes) -> None:
        """Add data at the end of rel. Local: an O_APPEND write, fsynced. Object stores have no
        append, so there it is a rewrite of the whole object (read, concatenate, one PUT)."""
        target = self.path(rel)

        def add() -> None:
            if self.is_local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                return
            try:
                old = self.fs.cat_file(target)
            except FileNotFoundError:
                old = b""
            self.fs.pipe_file(target, old + data)

        self._call(f"append {rel}", add)

    # -- compare-and-swap ------------------------------------------------------
    @property
    def is_s3(self) -> bool:
        return "s3" in (
            self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        )

    def read_versioned(self, rel: str, aged: bool = False) -> Versioned | None:
        """rel's bytes with its version, or None when it does not exist; with aged, its age by
        the storage's own clock too (the lease's staleness)."""
        return self._call(f"read {rel}", lambda: self._read_versioned(rel, aged))

    def _read_versioned(self, rel: str, aged: bool = False) -> Versioned | None:
        target = self.path(rel)
        if self.is_s3:
            return self._s3_get(target)
        try:
            data = self.fs.cat_file(target)
        except FileNotFoundError:
            return None
        age = 0.0
        if self.is_local and aged:
            age = self._local_now(target) - os.stat(target).st_mtime
        return Versioned(data, sha256_hex(data), age)

    @staticmethod
    def _local_now(beside: str) -> float:
        """'Now' by the clock that stamps mtimes in this directory: the mtime of a probe file
        written beside `beside`. On NFS the file server sets mtimes, so the reader's own
        time.time() would compare two hosts' clocks. The probe's name holds ".tmp-", so one a
        crash leaves behind is collected with the other temp files."""
        for tries_left in (1, 0):
            probe = f"{os.path.dirname(beside)}/{CLOCK_PROBE}{uuid.uuid4().hex[:8]}"
            try:
                with open(probe, "wb") as f:
                    f.write(b"clock probe")
                return os.stat(probe).st_mtime
            except FileNotFoundError:  # removed under us (a cleaner): once more
                if not tries_left:
                    raise
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(probe)
        raise AssertionError("unreachable")

    def age(self, rel: str) -> float:
        """How long ago rel was last written, by the storage's clock (local: against a probe's
        mtime; object stores: the response's Date against LastModified)."""
        if self.is_local:
            target = self.path(rel)
            return self._call(f"stat {rel}", lambda: self._local_now(target) - os.stat(target).st_mtime)
        v = self.read_versioned(rel, aged=True)
        return v.age_s if v is not None else 0.0

    def _s3_get(self, target: str) -> Versioned | None:
        from email.utils import parsedate_to_datetime

        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(target)

        async def get() -> Versioned | None:
            try:
                r = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return None
            async with r["Body"] as body:
                data = await body.read()
            now = parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"])
            return Versioned(data, r["ETag"], (now - r["LastModified"]).total_seconds())

        return sync(self.fs.loop, get)

    def write_if(self, rel: str, data: bytes, expect: str | None) -> str:
        """Replace rel with data only if its version is still `expect` (None: only if rel does
        not exist); return the new version. Raises Conflict when another writer got there first.

        S3: a conditional PUT (If-Match / If-None-Match: *), decided by the store. Local: an
        exclusive lock around compare and atomic replace (on NFS only as good as its locks)."""
        target = self.path(rel)
        if self.is_s3:
            bucket, key, _ = self.fs.split_path(target)
            cond = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": expect}

            def put() -> str:
                try:
                    out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
                except Exception as e:
                    if _lost_race(e):
                        raise Conflict(f"{self.child_uri(rel)} changed since version {expect}") from None
                    raise
                self.fs.invalidate_cache(target)
                return str(out["ETag"])

            try:
                return self._call(f"write {rel}", put)
            except Conflict:
                # A retried PUT whose first try landed (its answer lost) meets its own write:
                # the bytes are ours, so the write succeeded.
                current = self._read_versioned(rel)
                if current is not None and current.data == data:
                    return current.version
                raise

        def swap() -> str:
            current = self._read_versioned(rel)
            if (current.version if current else None) != expect:
                raise Conflict(f"{self.child_uri(rel)} changed since version {expect}")
            self._replace(target, data)
            return sha256_hex(data)

        if not self.is_local:
            # memory:// (one process: exact). Other remote stores without conditional writes
            # (gs://, az://, ...): read, compare, write, not fenced across hosts (docs/storage.md).
            with _MEMORY_CAS:
                return self._call(f"write {rel}", swap)
        import fcntl

        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(f"{target}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return self._call(f"write {rel}", swap)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def delete(self, rel: str) -> None:
        """Delete rel (a file or a whole directory); already gone is fine."""

        def rm() -> None:
            try:
                self.fs.rm(self.path(rel), recursive=True)
            except FileNotFoundError:
                pass

        self._call(f"delete {rel}", rm)

"""A real S3-protocol server on loopback (moto's standalone server) and a fault-injecting
HTTP proxy in front of it, for tests of storage faults."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass
class MotoServer:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, log: Path) -> MotoServer:
        port = free_port()
        exe = Path(sys.executable).with_name("moto_server")
        proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(port)],
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_port(port)
        except RuntimeError:
            proc.kill()
            raise
        return cls(proc, port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def client(self):  # noqa: ANN201
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            **{
                "aws_access_key_id": CREDS["AWS_ACCESS_KEY_ID"],
                "aws_secret_access_key": CREDS["AWS_SECRET_ACCESS_KEY"],
                "region_name": CREDS["AWS_DEFAULT_REGION"],
            },
        )


class FaultProxy:
    """Forwards HTTP to an upstream S3 endpoint; `mode` decides what a request gets:

    ok: forwarded; 503: a SlowDown error without forwarding; reset: the connection is
    closed with no response; flaky: every other request is a 503, the rest forwarded.

    hold_next(match) holds the next request that match(method, path) accepts (one only), as a
    partition that delays its packets would: nothing is forwarded until release(), then it
    goes on as any other (so its answer is what the server holds at the release).

    `writes` logs every request but GET and HEAD that reached the server, as (time, method,
    path, status), a multi-object delete (POST ?delete) as one DELETE per key it names: what
    the clients behind this proxy changed, whoever they are."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mode = "ok"
        self.faults = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._hold: Callable[[str, str], bool] | None = None
        self.held: list[str] = []  # "METHOD path" of each request held since hold_next
        self.writes: list[tuple[float, str, str, int]] = []
        self._released = threading.Event()
        self._released.set()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    hold = proxy._hold is not None and proxy._hold(self.command, self.path)
                    if hold:
                        proxy._hold = None  # one request only
                        proxy.held.append(f"{self.command} {self.path}")
                if hold:
                    proxy._released.wait()
                with proxy._lock:
                    proxy.requests += 1
                    mode = proxy.mode
                    fault = mode in ("503", "reset") or (mode == "flaky" and proxy.requests % 2 == 0)
                    if fault:
                        proxy.faults += 1
                if fault and mode == "reset":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if fault:
                    xml = (
                        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                        b"<Message>Please reduce your request rate.</Message></Error>"
                    )
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if self.command not in ("GET", "HEAD"):
                    proxy._log_write(self.command, self.path, body, resp.status)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD's answer has no body but the object's own Content-Length (its size: what
                # a stat reads); a body's length otherwise.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hold_next(self, match: Callable[[str, str], bool]) -> None:
        """Hold the next request match(method, path) accepts until release()."""
        with self._lock:
            self.held = []
            self._released.clear()
            self._hold = match

    def _log_write(self, method: str, path: str, body: bytes, status: int) -> None:
        now = time.time()
        if method == "POST" and "delete" in path.split("?", 1)[-1].split("&"):
            bucket = path.split("?", 1)[0].rstrip("/")
            keys = re.findall(rb"<Key>(.*?)</Key>", body)
            rows = [(now, "DELETE", f"{bucket}/{k.decode()}", status) for k in keys]
        else:
            rows = [(now, method, path, status)]
        with self._lock:
            self.writes.extend(rows)

    def release(self) -> None:
        """Forward the held request (if any) now, and hold nothing more."""
        with self._lock:
            self._hold = None
        self._released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

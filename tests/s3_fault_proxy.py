"""A fault-injecting HTTP proxy for an S3 endpoint (moto's server in the tests), stdlib only.

    proxy = FaultProxy("http://127.0.0.1:5000", FaultPlan(rate=0.2, seed=0)).start()
    ... point storage.endpoint_override at proxy.endpoint ...
    proxy.stop(); proxy.counts  # {"requests": N, "passed": n0, "500": n1, "cut": n2, ...}

Every request is forwarded unchanged (method, path with query, headers, body; ranged GETs and
multipart uploads included) unless the seeded plan picks a fault for it:
- "500": `500 InternalError`, S3's XML error body, the request not forwarded;
- "503": `503 ServiceUnavailable`; "slowdown": `503 SlowDown` (S3's throttling answer);
- "cut": forwarded, then the connection is closed halfway through the response body (or,
  for a response without a body, before any answer);
- "slow": forwarded, answered after `slow_s` seconds.
`methods` and `path_contains` narrow which requests may be faulted (e.g. only PUTs below one
prefix: a persistent write fault with `rate=1.0`); `limit` caps the number of faults (the
first `limit` matching requests fail with `rate=1.0`).
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULT_KINDS = ("500", "503", "slowdown", "cut", "slow")

_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
}
# Not forwarded as they are: they describe one hop's connection, not the message.
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
                "trailer", "upgrade", "expect"}


@dataclass(frozen=True)
class FaultPlan:
    """Which requests fail and how: each request that matches `methods` / `path_contains` is
    faulted with probability `rate`, the kind drawn uniformly from `kinds` (seeded)."""

    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    methods: tuple[str, ...] | None = None  # None: every method
    path_contains: str | None = None
    slow_s: float = 0.5
    limit: int | None = None  # at most this many faults in all (None: no limit)

    def __post_init__(self):
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")


def _error_body(code: str, message: str, path: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><Resource>{path}</Resource>"
            "<RequestId>FAULTPROXY</RequestId></Error>").encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue answered for PUT bodies
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # one line per request would flood the test output

    def _read_body(self) -> bytes:
        """The request body as sent (a chunked one raw, chunk framing included)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = bytearray()
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the empty line
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        fault = self.server.draw(self.command, self.path)
        if fault in _ERRORS:
            status, code, message = _ERRORS[fault]
            payload = _error_body(code, message, self.path)
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        status, reason, headers, payload = self._forward(body)
        if fault == "cut" and (self.command == "HEAD" or len(payload) <= 1):
            self.close_connection = True  # nothing to cut halfway: no answer at all
            return
        if fault == "slow":
            time.sleep(self.server.plan.slow_s)
        self.send_response(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_HEADERS and name.lower() != "content-length":
                self.send_header(name, value)
        # a HEAD answer carries the object's length without its body
        length = dict((k.lower(), v) for k, v in headers).get("content-length", "0") \
            if self.command == "HEAD" else str(len(payload))
        self.send_header("Content-Length", length)
        if fault == "cut":
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _forward(self, body: bytes):
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            headers["Transfer-Encoding"] = "chunked"  # body is forwarded with its framing
        conn = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port,
                                          timeout=60)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, resp.reason, resp.getheaders(), payload
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815 - http.server's names


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, upstream: str, plan: FaultPlan):
        super().__init__(("127.0.0.1", 0), _Handler)
        parsed = urlparse(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port
        self.plan = plan
        self.counts: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self._rng = random.Random(plan.seed)
        self._lock = threading.Lock()

    def handle_error(self, request, client_address):
        """A client that hung up (as one does after a cut or a timeout) is not an error here."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def draw(self, method: str, path: str) -> str | None:
        """The fault for this request (None: none), counted."""
        plan = self.plan
        eligible = ((plan.methods is None or method in plan.methods)
                    and (plan.path_contains is None or plan.path_contains in path))
        with self._lock:
            self.counts["requests"] += 1
            self.requests.append((method, path))
            faults = self.counts["requests"] - 1 - self.counts["passed"]
            if (not eligible or (plan.limit is not None and faults >= plan.limit)
                    or self._rng.random() >= plan.rate):
                self.counts["passed"] += 1
                return None
            fault = self._rng.choice(plan.kinds)
            self.counts[fault] += 1
            return fault


class FaultProxy:
    """The proxy on 127.0.0.1 (a free port), serving in a background thread."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None):
        self._server = _Server(upstream, plan or FaultPlan())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def plan(self) -> FaultPlan:
        return self._server.plan

    @plan.setter
    def plan(self, plan: FaultPlan) -> None:
        """Change the faults from now on (the random stream restarts with the plan's seed, the
        counts and the request log from empty)."""
        with self._server._lock:
            self._server.plan = plan
            self._server.counts = Counter()
            self._server.requests = []
            self._server._rng = random.Random(plan.seed)

    @property
    def counts(self) -> dict[str, int]:
        with self._server._lock:
            return dict(self._server.counts)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path with query) of each request since the plan was set, in order."""
        with self._server._lock:
            return list(self._server.requests)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _round_ops(loc, i: int, big: bytes | None, table) -> list:
    """One round of the measurement's storage operations (the big object in the first ones)."""
    ops = [lambda: loc.child(f"f{i}.bin").write_bytes(b"abc" * i),
           lambda: loc.child("t", f"p{i}.parquet").write_table(table),
           lambda: loc.child(f"f{i}.bin").read_bytes(),
           lambda: loc.child("t").read_table(),
           lambda: loc.list_files(".bin"),
           lambda: loc.child(f"f{i}.bin").exists()]
    if big is not None:
        ops += [lambda: loc.child(f"big{i}.bin").write_bytes(big),
                lambda: loc.child(f"big{i}.bin").read_bytes()]
    return ops


def _measure(rate: float, rounds: int, strategy: str, attempts: int, seed: int) -> None:
    """`rounds` rounds of write / read / list / parquet operations, straight to a fresh moto
    server and then through the proxy at `rate`: wall times, faults, failed operations."""
    import os
    import socket
    import subprocess
    import sys

    import boto3
    import pyarrow as pa
    import pyarrow.fs as pafs

    from diffinf_ray.storage import Location, RetryingS3FileSystem

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_EC2_METADATA_DISABLED="true")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"),
                             "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    upstream = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=upstream, region_name="us-east-1")
    for _ in range(300):
        try:
            client.create_bucket(Bucket="measure")
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    big, table = os.urandom(12 * 1024 * 1024), pa.table({"x": list(range(100_000))})
    with FaultProxy(upstream) as proxy:
        for label, endpoint, plan in (("fault-free", upstream, FaultPlan()),
                                      (f"{rate:.0%} faults", proxy.endpoint,
                                       FaultPlan(rate=rate, seed=seed, slow_s=0.2))):
            proxy.plan = plan
            host = endpoint.split("://")[1]
            fs = (RetryingS3FileSystem(max_attempts=attempts, endpoint_override=host,
                                       scheme="http", region="us-east-1")
                  if strategy == "default" else pafs.S3FileSystem(
                      endpoint_override=host, scheme="http", region="us-east-1",
                      retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)))
            prefix = f"measure/{label.replace(' ', '_').replace('%', 'pct')}"
            loc = Location(f"s3://{prefix}", _resolved=(fs, prefix))
            failed, started = 0, time.perf_counter()
            for i in range(rounds):
                for op in _round_ops(loc, i, big if i < 3 else None, table):
                    try:
                        op()
                    except Exception:  # noqa: BLE001 - counted, the measurement goes on
                        failed += 1
            print(f"{label}: {time.perf_counter() - started:.1f} s, {failed} failed "
                  f"operations, proxy {proxy.counts}", flush=True)
    moto.terminate()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="time storage operations through faults")
    parser.add_argument("--rate", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--strategy", choices=("default", "standard"), default="default",
                        help="default: storage.RetryingS3FileSystem; standard: pyarrow's own")
    parser.add_argument("--attempts", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    _measure(args.rate, args.rounds, args.strategy, args.attempts, args.seed)

"""Shared fixtures.

`ray_local`: an isolated local Ray (2 CPUs, own temp dir) for one test module, shut down after
(its start retried when a loaded box makes Ray's start-up time out).
`s3_endpoint`: a real S3 protocol endpoint (moto's server) on 127.0.0.1, one per test.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

S3_REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Endpoint:
    """A running moto server: `endpoint` is its URL, `client` a boto3 client for it."""

    endpoint: str
    client: object = field(repr=False)

    def bucket(self, name: str) -> str:
        """Create bucket `name` (if needed) and return its base URI for `storage.Location`:
        `s3://name?endpoint_override=...&region=us-east-1` (use `.child(...)` for prefixes)."""
        existing = {b["Name"] for b in self.client.list_buckets().get("Buckets", [])}
        if name not in existing:
            self.client.create_bucket(Bucket=name)
        return f"s3://{name}?endpoint_override={self.endpoint}&region={S3_REGION}"

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=data)


def _moto_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    exe = str(script) if script.exists() else shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not found; install the test extra (moto[server])")
    return [exe, "-H", "127.0.0.1", "-p", str(port)]


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> Iterator[S3Endpoint]:
    import boto3
    import botocore.exceptions

    # Fake credentials for this process (pyarrow and boto3 read the environment) and nothing
    # that could send a request to real AWS.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", S3_REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(_moto_command(port), stdout=log, stderr=subprocess.STDOUT)
    try:
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name=S3_REGION,
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                client.list_buckets()
                break
            except (botocore.exceptions.EndpointConnectionError,
                    botocore.exceptions.ConnectionClosedError):
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer on {endpoint} within 60 s")
                time.sleep(0.1)
        yield S3Endpoint(endpoint=endpoint, client=client)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (`pytestmark = usefixtures(...)`): the CI box
    has 2 shared cores, and Ray's workers need the other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from diffinf_ray.ray_session import start_local_ray

    # 5 attempts, not the default 3 (ray_session.START_ATTEMPTS): the raylet's fixed 15 s wait
    # for its agent failed 3 times in a row at load average 20-45 on this 2-core box
    temp_dir = tmp_path_factory.mktemp("ray")
    start_local_ray(2, attempts=5, temp_dir=str(temp_dir), configure_logging=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)  # the session's logs and spilled objects


# Tests that use these fixtures run a Tune sweep or train every baseline method with Ray Train:
# marked slow (`make test`, what CI runs, runs them; `make test-fast` leaves them out).
SLOW_FIXTURES = {"tiny_sweep", "baseline_run"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

"""S3 faults (500 / 503 / SlowDown, connections cut mid-body, slow answers) injected by a seeded
proxy in front of moto's server (tests/s3_fault_proxy.py): transient faults are retried and the
results equal a fault-free run; a persistent fault is one clear error naming the URI (and the
stage), and the stage is not marked done."""

from __future__ import annotations

import os
import pickle
import time

import pyarrow as pa
import pytest
from s3_fault_proxy import FAULT_KINDS, FaultPlan, FaultProxy

from diffinf_ray.storage import (
    WHOLE_OBJECT_ATTEMPTS,
    Location,
    RetryingS3FileSystem,
    StorageError,
    StorageOptions,
    with_retries,
)

BUCKET = "faults"


@pytest.fixture
def proxy(s3_endpoint):
    s3_endpoint.bucket(BUCKET)
    with FaultProxy(s3_endpoint.endpoint) as p:
        yield p


def _location(endpoint: str, prefix: str, max_attempts: int = 10) -> Location:
    return Location(f"s3://{BUCKET}/{prefix}?endpoint_override={endpoint}&region=us-east-1",
                    StorageOptions(max_attempts=max_attempts))


def _exercise(loc: Location, big: bytes) -> dict:
    """Writes, then reads back, lists and range-reads what it wrote: the results to compare."""
    table = pa.table({"i": list(range(20_000)), "s": [f"row{i}" for i in range(20_000)]})
    for i in range(6):
        loc.child("blobs", f"b{i}.bin").write_bytes(f"blob {i}".encode() * (i + 1))
        loc.child("json", f"r{i}.json").write_json({"i": i})
        loc.child("table", f"part-{i}.parquet").write_table(table.slice(i * 1000, 1000))
    loc.child("big.bin").write_bytes(big)  # > pyarrow's 10 MB part: a multipart upload
    return {
        "blobs": [loc.child("blobs", f"b{i}.bin").read_bytes() for i in range(6)],
        "json": [loc.child("json", f"r{i}.json").read_json() for i in range(6)],
        "listing": [p.rsplit("/", 1)[1] for p in loc.list_files(recursive=True)],
        "dirs": loc.list_dirs(),
        # a column subset of parquet files: ranged GETs
        "table": loc.child("table").read_table(columns=["s"]).to_pydict(),
        "big_equal": loc.child("big.bin").read_bytes() == big,
        "exists": [loc.child("blobs", "b0.bin").exists(), loc.child("nope").exists()],
    }


def test_retry_settings_travel_to_workers():
    fs = RetryingS3FileSystem(max_attempts=7, region="us-east-1",
                              endpoint_override="127.0.0.1:9", scheme="http")
    again = pickle.loads(pickle.dumps(fs))
    assert type(again) is RetryingS3FileSystem
    assert again._init_kwargs["max_attempts"] == 7
    # the configured value reaches the filesystem a run root opens
    assert _location("http://127.0.0.1:9", "x", max_attempts=4).fs._init_kwargs["max_attempts"] == 4


def test_transient_faults_give_the_fault_free_results(proxy, s3_endpoint):
    big = os.urandom(11 * 1024 * 1024)
    started = time.perf_counter()
    clean = _exercise(_location(s3_endpoint.endpoint, "clean"), big)
    clean_s = time.perf_counter() - started

    proxy.plan = FaultPlan(rate=0.2, seed=3, slow_s=0.2)
    started = time.perf_counter()
    faulty = _exercise(_location(proxy.endpoint, "faulty"), big)
    faulty_s = time.perf_counter() - started

    assert faulty == clean
    assert clean["big_equal"] and clean["exists"] == [True, False]
    counts = proxy.counts
    print(f"\nclean {clean_s:.1f} s, through 20 % faults {faulty_s:.1f} s: {counts}")
    assert all(counts.get(kind, 0) > 0 for kind in FAULT_KINDS), counts


def test_persistent_write_fault_is_one_clear_error(proxy):
    loc = _location(proxy.endpoint, "stuck", max_attempts=3)
    proxy.plan = FaultPlan(rate=1.0, kinds=("500",), methods=("PUT", "POST"))
    with pytest.raises(StorageError) as err:
        loc.child("out.json").write_json({"a": 1})
    message = str(err.value)
    assert message.startswith(f"cannot write s3://{BUCKET}/stuck/out.json: ")
    assert "INTERNAL_FAILURE" in message or "500" in message
    assert proxy.counts["500"] >= 3  # the SDK tried max_attempts times
    proxy.plan = FaultPlan()
    assert not loc.child("out.json").exists()  # nothing half-written is left


def test_cut_reads_are_retried(proxy, s3_endpoint):
    """GETs cut halfway through their body: retried (by the SDK, or whole by `with_retries`
    when the SDK gives up on it); a cut that never ends is one error naming the URI."""
    data = os.urandom(1000)
    _location(s3_endpoint.endpoint, "cut").child("x.bin").write_bytes(data)
    loc = _location(proxy.endpoint, "cut", max_attempts=4)
    proxy.plan = FaultPlan(rate=1.0, kinds=("cut",), methods=("GET",), limit=3)
    assert loc.child("x.bin").read_bytes() == data
    assert proxy.counts["cut"] == 3
    proxy.plan = FaultPlan(rate=1.0, kinds=("cut",), methods=("GET",))
    with pytest.raises(StorageError, match=f"^cannot read s3://{BUCKET}/cut/x.bin: "):
        loc.child("x.bin").read_bytes()
    assert proxy.counts["cut"] >= 4


def test_with_retries_retries_only_what_the_sdk_does_not():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < WHOLE_OBJECT_ATTEMPTS:
            raise OSError("AWS Error INTERNAL_FAILURE during GetObject operation: "
                          "Failed to flush response stream (eof: 0, bad: 1)")
        return "body"

    assert with_retries(flaky, "read s3://b/k", pause_s=0.01) == "body"
    assert len(calls) == WHOLE_OBJECT_ATTEMPTS
    calls.clear()

    def refused():
        calls.append(1)
        raise OSError("AWS Error ACCESS_DENIED during GetObject operation")

    with pytest.raises(OSError, match="ACCESS_DENIED"):
        with_retries(refused, "read s3://b/k", pause_s=0.01)
    assert len(calls) == 1

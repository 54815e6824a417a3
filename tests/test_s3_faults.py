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
    storage_failure,
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


# -- stages through the proxy -----------------------------------------------------------------


def _tiny(root: str, endpoint: str, stages: str, *extra: str):
    from diffinf_ray.config import load_config

    return load_config("jobs/configs/tiny.yaml", [
        f"run.root={root}", f"storage.endpoint_override={endpoint}", "storage.region=us-east-1",
        "ray.num_cpus=2", "train.epochs=1", f"stages=[{stages}]", *extra])


def _write_manifest(cfg, root) -> dict:
    """A stage body that writes two output files (what ingest writes, in small)."""
    for i in range(2):
        root.manifest.child(f"part-{i}.parquet").write_table(pa.table({"sample_id": [f"s{i}"]}))
    return {"rows": 2}


def test_persistent_write_fault_fails_the_stage_clearly(proxy):
    """Every write below the manifest fails: the stage fails with one error naming the stage
    and the URI, and its record says failed, not done."""
    from diffinf_ray.pipeline import is_done, open_run_root, run_stage

    cfg = _tiny(f"s3://{BUCKET}/stuck", proxy.endpoint, "ingest", "storage.max_attempts=2")
    root = open_run_root(cfg)
    proxy.plan = FaultPlan(rate=1.0, kinds=("500",), methods=("PUT", "POST"),
                           path_contains=f"/{BUCKET}/stuck/manifest/")
    with pytest.raises(StorageError) as err:
        run_stage(cfg, root, "ingest", body=_write_manifest)
    assert str(err.value).startswith(
        f"stage ingest: cannot write s3://{BUCKET}/stuck/manifest/part-0.parquet: ")
    assert "\n" not in str(err.value)
    assert root.stage_record("ingest")["status"] == "failed"
    assert not is_done(root, cfg, "ingest")

    # the store recovers: a rerun finishes the stage, and the marker is the last write
    proxy.plan = FaultPlan()
    run_stage(cfg, root, "ingest", body=_write_manifest)
    assert is_done(root, cfg, "ingest")
    writes = [path for method, path in proxy.requests if method in ("PUT", "POST")]
    assert "/stages/ingest.json" in writes[-1]
    assert any("/manifest/part-1.parquet" in w for w in writes[:-1])


def test_a_failing_marker_write_names_the_stage(proxy):
    """The store fails the stage's record itself: one error naming the stage and the marker's
    URI, and no stage output written."""
    from diffinf_ray.pipeline import open_run_root, run_stage

    cfg = _tiny(f"s3://{BUCKET}/nomark", proxy.endpoint, "ingest", "storage.max_attempts=2")
    root = open_run_root(cfg)
    proxy.plan = FaultPlan(rate=1.0, kinds=("503",), methods=("PUT", "POST"),
                           path_contains="/stages/")
    with pytest.raises(StorageError, match=f"^stage ingest: cannot write s3://{BUCKET}/nomark/"
                                           "stages/ingest.json: "):
        run_stage(cfg, root, "ingest", body=_write_manifest)
    proxy.plan = FaultPlan()
    assert root.stage_record("ingest") is None
    assert not root.manifest.exists()


def test_storage_failure_is_found_behind_wrappers():
    """Ray hands a worker's storage error to the driver wrapped, its traceback in the text."""
    inner = OSError("When uploading part for key 'run/manifest/p.parquet' in bucket 'b': "
                    "AWS Error SLOW_DOWN during UploadPart operation: Please reduce your "
                    "request rate.")

    class TaskError(Exception):  # Ray's task errors carry the worker's exception as .cause
        cause = inner

    wrapped = TaskError("Traceback (most recent call last):\n  ...\n" + str(inner))
    assert storage_failure(wrapped) == (
        "storage failed at s3://b/run/manifest/p.parquet: " + str(inner))
    assert storage_failure(ValueError("bad label")) is None
    named = StorageError("cannot read s3://b/x: gone")
    try:
        raise RuntimeError("while ingesting") from named
    except RuntimeError as err:
        assert storage_failure(err) == "cannot read s3://b/x: gone"

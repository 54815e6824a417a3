"""S3 faults (500 / 503 / SlowDown, connections cut mid-body, slow answers) injected by a seeded
proxy in front of moto's server (tests/s3_fault_proxy.py): transient faults are retried and the
results equal a fault-free run; a persistent fault is one clear error naming the URI (and the
stage), and the stage is not marked done."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import time
from pathlib import Path

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


def test_every_opener_of_a_runs_storage_uses_its_retry_setting(tmp_path):
    """storage.max_attempts reaches the run root, ingest's source, the experiment and sweep
    roots and a sweep trial's view of its base run, not only the first of them."""
    from types import SimpleNamespace

    from diffinf_ray.config import load_config
    from diffinf_ray.experiment.plan import experiment_location
    from diffinf_ray.pipeline import open_run_root
    from diffinf_ray.stages.ingest import root_options
    from diffinf_ray.sweep.trial_root import SharedRunRoot

    cfg = load_config("jobs/configs/tiny.yaml", [f"run.root={tmp_path / 'run'}",
                                                 "storage.max_attempts=4"])
    root = open_run_root(cfg)
    assert root.options.max_attempts == 4
    assert root_options(cfg).max_attempts == 4
    exp = SimpleNamespace(root=str(tmp_path / "exp"))
    assert experiment_location(exp, [SimpleNamespace(config=cfg)]).options.max_attempts == 4
    trial = SharedRunRoot.for_trial(root, str(tmp_path / "trial"), cfg)
    assert trial.options.max_attempts == trial.shared_base.options.max_attempts == 4


def test_local_writes_are_atomic(tmp_path, monkeypatch):
    """A local write cut short leaves the old file whole and no leftover: a reader never sees
    half a marker."""
    marker = Location(str(tmp_path)).child("stages", "ingest.json")
    marker.write_json({"status": "running"})
    original = Location._write_stream

    def cut_short(self, path, data):
        original(self, path, data[: len(data) // 2])
        raise OSError("disk went away")

    monkeypatch.setattr(Location, "_write_stream", cut_short)
    with pytest.raises(StorageError, match="^cannot write .*stages/ingest.json: disk went away"):
        marker.write_json({"status": "done", "summary": {"rows": 160}})
    monkeypatch.undo()
    assert marker.read_json() == {"status": "running"}
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["ingest.json"]


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


# -- secrets ---------------------------------------------------------------------------------

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKESECRET1234567",
    "AWS_SECRET_ACCESS_KEY": "fakeSecretLeakCheck/0123456789abcdefABCDEF",
    "AWS_SESSION_TOKEN": "FakeSessionTokenLeakCheck0123456789",
}


def _bucket_objects(s3_endpoint, bucket: str) -> dict[str, bytes]:
    client = s3_endpoint.client
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _leaks(texts: dict[str, bytes | str]) -> list[str]:
    """'where: VARIABLE' for each fake credential found in `texts`."""
    found = []
    for where, text in texts.items():
        data = text.encode() if isinstance(text, str) else text
        found += [f"{where}: {var}" for var, value in FAKE_CREDENTIALS.items()
                  if value.encode() in data]
    return found


def test_credentials_appear_in_no_output_or_record(s3_endpoint, monkeypatch, caplog, capfd):
    """Storage operations, `diffinf config`, a stage's record and a failing stage's error,
    with distinctive credentials: none of them in the logs, the console or the run root."""
    import logging

    from diffinf_ray.cli import main
    from diffinf_ray.pipeline import open_run_root, run_stage

    for var, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(var, value)
    caplog.set_level(logging.DEBUG)
    s3_endpoint.bucket("secrets")
    with FaultProxy(s3_endpoint.endpoint) as proxy:
        cfg = _tiny("s3://secrets/run", proxy.endpoint, "ingest", "storage.max_attempts=2")
        root = open_run_root(cfg)
        run_stage(cfg, root, "ingest", body=_write_manifest)
        assert root.manifest.read_table().num_rows == 2 and root.manifest.list_files()
        # a failing stage: its error (console, log, record) names the URI, not the keys
        proxy.plan = FaultPlan(rate=1.0, kinds=("500",), methods=("PUT", "POST"),
                               path_contains="/manifest/")
        with pytest.raises(StorageError) as err:
            run_stage(cfg, root, "ingest", force=True, body=_write_manifest)
        print(err.value)
    assert main(["config", "jobs/configs/tiny.yaml", "run.root=s3://secrets/run",
                 f"storage.endpoint_override={s3_endpoint.endpoint}"]) == 0
    out, errtext = capfd.readouterr()
    assert "endpoint_override" in out and "stage ingest: cannot write" in out
    texts = {"stdout": out, "stderr": errtext, "log": caplog.text}
    texts.update({f"s3://secrets/{k}": v for k, v in _bucket_objects(s3_endpoint, "secrets").items()})
    assert "s3://secrets/run/stages/ingest.json" in texts
    assert _leaks(texts) == []
    assert _leaks({"x": FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}) == ["x: AWS_SECRET_ACCESS_KEY"]


def _files_below(folder) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in Path(folder).rglob("*")
            if p.is_file() and not p.is_symlink()}


def _run_outputs(root) -> dict:
    """What ingest, noise and one epoch of training produced: rows, labels, checkpoints."""
    manifest = root.manifest.read_table(columns=["sample_id", "label", "split"]).to_pylist()
    noisy = root.noisy_manifest.read_table(
        columns=["sample_id", "label", "label_clean", "is_corrupted"]).to_pylist()
    return {
        "manifest": sorted(manifest, key=lambda r: r["sample_id"]),
        "noisy": sorted(noisy, key=lambda r: r["sample_id"]),
        "checkpoints": [p.rsplit("/", 2)[-2] for p in root.checkpoints.list_files("checkpoint.pt",
                                                                                  recursive=True)],
        "done": {s: (root.stage_record(s) or {}).get("status") for s in ("ingest", "noise", "train")},
    }


# In CI: two pipeline runs of three stages, 95 s on the idle 2-core box (2026-12-05), 13+ min
# once at load average 40-90; the storage-level tests above cover the same faults in seconds
@pytest.mark.timeout(2400)
def test_pipeline_through_faults_equals_fault_free(s3_endpoint, monkeypatch):
    """ingest, noise and one epoch of training, once straight to the store and once through
    10 % faults of every kind, with distinctive credentials: the same rows, labels and
    checkpoints, and the credentials in no record under either run root nor in Ray's logs."""
    pytest.importorskip("ray")
    from diffinf_ray.pipeline import open_run_root, run_pipeline
    from diffinf_ray.ray_session import ray_session, start_local_ray, worker_env

    for var, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(var, value)
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # Ray's socket paths stay short
    s3_endpoint.bucket(BUCKET)
    try:
        with FaultProxy(s3_endpoint.endpoint) as proxy:
            clean_cfg = _tiny(f"s3://{BUCKET}/clean", s3_endpoint.endpoint, "ingest,noise,train")
            faulty_cfg = _tiny(f"s3://{BUCKET}/faulty", proxy.endpoint, "ingest,noise,train")
            # one Ray for both runs, with the runtime env `diffinf run` gives it (credentials
            # included), its start tried 5 times as the ray_local fixture does on a loaded box
            start_local_ray(2, attempts=5, temp_dir=f"{ray_tmp}/r", log_to_driver=True,
                            runtime_env={"env_vars": worker_env()})
            with ray_session(clean_cfg):
                started = time.perf_counter()
                run_pipeline(clean_cfg)
                clean_s = time.perf_counter() - started
                proxy.plan = FaultPlan(rate=0.1, seed=0, slow_s=0.2)
                started = time.perf_counter()
                run_pipeline(faulty_cfg)
                faulty_s = time.perf_counter() - started
            counts = proxy.counts
        print(f"\nfault-free {clean_s:.1f} s, through 10 % faults {faulty_s:.1f} s: {counts}")
        clean = _run_outputs(open_run_root(clean_cfg))
        faulty = _run_outputs(open_run_root(_tiny(f"s3://{BUCKET}/faulty", s3_endpoint.endpoint,
                                                  "ingest")))
        assert faulty == clean
        assert len(clean["manifest"]) == clean_cfg.data.synthfaces.num_samples
        assert clean["checkpoints"] == ["epoch_0001"]
        assert set(clean["done"].values()) == {"done"}
        assert sum(counts.get(kind, 0) for kind in FAULT_KINDS) > 0, counts
        texts = {f"s3://{BUCKET}/{k}": v for k, v in _bucket_objects(s3_endpoint, BUCKET).items()}
        texts.update(_files_below(ray_tmp))
        assert any("/session_" in path for path in texts), "Ray's logs were not searched"
        assert _leaks(texts) == []
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)

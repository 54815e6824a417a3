"""The whole method with its run root on s3:// (moto's S3 server on 127.0.0.1): the production
code path, Ray started by the pipeline itself (as `diffinf run` does). The endpoint reaches the
code from `AWS_ENDPOINT_URL_S3` and from `storage.endpoint_override` here, from the run root's
URI query in test_ingest.py and test_experiment.py."""

import pyarrow.parquet as pq
import pytest

from diffinf_ray.models.checkpoint import list_checkpoints, load_all
from diffinf_ray.pipeline import open_run_root, run_pipeline

STAGES = ("[ingest,noise,train,evaluate,influence,removal,autoencoder,predictor,lossnets,edit,"
          "refine,retrain,report]")


@pytest.mark.timeout(2400)
def test_the_whole_method_on_s3(s3_endpoint, monkeypatch):
    """Every stage of the method (noisy baseline, TracIn, removal, autoencoder, predictor, loss
    networks, edit actors, refine, retrain, report) with the run root on S3, the endpoint from
    `AWS_ENDPOINT_URL_S3` alone (Ray's workers inherit it); then the same run again with the
    endpoint from `storage.endpoint_override` alone finds every stage done on S3 and skips it.
    The synthfaces-only judges are left out: they read and write S3 as the other Ray Train
    stages do, and cost two more fits."""
    pytest.importorskip("ray")
    from test_diffinf_pipeline import tiny_diffinf

    s3_endpoint.bucket("runs")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint.endpoint)
    settings = ["ray.num_cpus=2", "train.epochs=2", "autoencoder.steps=10", "predictor.epochs=5",
                "edit.iterations=1", f"stages={STAGES}"]
    cfg = tiny_diffinf("s3://runs/whole", *settings)
    results = run_pipeline(cfg)
    assert list(results) == list(cfg.stages)
    root = open_run_root(cfg)
    assert root.display == "s3://runs/whole"
    flagged = results["influence"]["high_influence_rows"]
    edits = root.child("edits", "edits.parquet").read_table()
    quarantined = root.child("edits", "quarantine.parquet").read_table().num_rows
    assert edits.num_rows + quarantined == flagged > 0  # every flagged row, edited or quarantined
    # refined/ on S3: every noisy row kept (edited or not) or listed as removed
    refined = pq.read_table(root.child("refined").path, filesystem=root.fs).to_pandas()
    removed = root.child("refined", "_removed.parquet").read_table().to_pandas()
    noisy = pq.read_table(root.noisy_manifest.path, filesystem=root.fs, columns=["sample_id"])
    assert sorted([*refined.sample_id, *removed.sample_id]) == sorted(
        noisy.column("sample_id").to_pylist())
    assert int(refined.is_edited.sum()) == results["refine"]["edited_rows"] > 0
    metrics = root.child("retrain", "evaluation", "metrics.json").read_json()
    assert 0.0 <= metrics["accuracy"] <= 100.0
    assert root.child("report", "report.md").exists()
    keys = {o["Key"] for o in s3_endpoint.client.list_objects_v2(
        Bucket="runs", Prefix="whole/")["Contents"]}
    assert any(k.startswith("whole/retrain/checkpoints/") for k in keys)
    assert "whole/evaluation/metrics.json" in keys
    assert any(k.startswith("whole/manifest/") and k.endswith(".parquet") for k in keys)

    # checkpoints are listed and loaded back from S3, with epoch and learning rate
    found = list_checkpoints(root.checkpoints)
    assert [c.display for c in found] == [
        "s3://runs/whole/checkpoints/epoch_0001/checkpoint.pt",
        "s3://runs/whole/checkpoints/epoch_0002/checkpoint.pt",
    ]
    loaded = load_all(root.checkpoints)
    assert [(c.epoch, c.learning_rate) for c in loaded] == [(1, cfg.train.lr), (2, cfg.train.lr)]
    assert loaded[-1].build_model().num_classes == len(cfg.class_names)
    assert root.evaluation.child("metrics.json").read_json()["accuracy"] == \
        results["evaluate"]["accuracy"]
    manifest = pq.read_table(root.manifest.path, filesystem=root.fs)
    assert manifest.num_rows == cfg.data.synthfaces.num_samples
    # the influence stage read its checkpoints from S3 and wrote its table there
    scores = root.child("influence", "influence.parquet").read_table().to_pandas()
    assert len(scores) == results["influence"]["train_rows"] > 0
    assert scores.is_high.sum() == flagged

    # the endpoint from the config alone: a second run finds every stage done on S3
    records = {stage: root.stage_record(stage) for stage in cfg.stages}
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    again_cfg = tiny_diffinf("s3://runs/whole", *settings,
                             f"storage.endpoint_override={s3_endpoint.endpoint}")
    run_pipeline(again_cfg)
    again_root = open_run_root(again_cfg)
    assert {stage: again_root.stage_record(stage) for stage in cfg.stages} == records

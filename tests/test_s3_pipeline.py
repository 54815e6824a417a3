"""The tiny pipeline with its run root on s3:// (moto's S3 server on 127.0.0.1): the production
code path, Ray started by the pipeline itself (as `diffinf run` does)."""

import pyarrow.parquet as pq
import pytest

from diffinf_ray.config import load_config
from diffinf_ray.models.checkpoint import list_checkpoints, load_all
from diffinf_ray.pipeline import open_run_root, run_pipeline


def test_pipeline_on_s3(s3_endpoint, tmp_path):
    pytest.importorskip("ray")
    root_uri = s3_endpoint.bucket("runs")
    base, query = root_uri.split("?")
    cfg = load_config("jobs/configs/tiny.yaml",
                      [f"run.root={base}/tiny?{query}", "ray.num_cpus=2",
                       "stages=[ingest,noise,train,evaluate,influence]"])
    results = run_pipeline(cfg)

    root = open_run_root(cfg)
    assert root.display == "s3://runs/tiny"
    # checkpoints are listed and loaded back from S3, with epoch and learning rate
    found = list_checkpoints(root.checkpoints)
    assert [c.display for c in found] == [
        "s3://runs/tiny/checkpoints/epoch_0001/checkpoint.pt",
        "s3://runs/tiny/checkpoints/epoch_0002/checkpoint.pt",
    ]
    loaded = load_all(root.checkpoints)
    assert [(c.epoch, c.learning_rate) for c in loaded] == [(1, cfg.train.lr), (2, cfg.train.lr)]
    model = loaded[-1].build_model()
    assert model.num_classes == 4

    keys = {o["Key"] for o in s3_endpoint.client.list_objects_v2(Bucket="runs")["Contents"]}
    assert "tiny/evaluation/metrics.json" in keys
    assert any(k.startswith("tiny/manifest/") and k.endswith(".parquet") for k in keys)
    assert root.evaluation.child("metrics.json").read_json()["accuracy"] == results["evaluate"]["accuracy"]
    manifest = pq.read_table(root.manifest.path, filesystem=root.fs)
    assert manifest.num_rows == cfg.data.synthfaces.num_samples

    # the influence stage read its checkpoints from S3 and wrote its table there
    scores = root.child("influence", "influence.parquet").read_table().to_pandas()
    assert len(scores) == results["influence"]["train_rows"] > 0
    assert scores.is_high.sum() == results["influence"]["high_influence_rows"]

    # a second run finds every stage done on S3 and skips it
    again = run_pipeline(cfg)
    assert again["evaluate"]["accuracy"] == results["evaluate"]["accuracy"]

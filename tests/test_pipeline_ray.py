"""End to end on a real local Ray: ingest -> noise -> train (Ray Train) -> evaluate."""

import json

import pyarrow.parquet as pq
import pytest

from diffinf_ray.config import load_config
from diffinf_ray.models.checkpoint import list_checkpoints, load_checkpoint
from diffinf_ray.pipeline import open_run_root, run_pipeline
from diffinf_ray.stages.train import train_classifier

TINY = "jobs/configs/tiny.yaml"


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config(TINY, [f"run.root={root}"])
    results = run_pipeline(cfg)
    return cfg, root, results


def test_pipeline_outputs(tiny_run):
    cfg, root, results = tiny_run
    manifest = pq.read_table(root / "manifest")
    assert manifest.num_rows == cfg.data.synthfaces.num_samples
    assert len(set(manifest.column("sample_id").to_pylist())) == manifest.num_rows
    noisy = pq.read_table(root / "manifest_noisy").to_pandas()
    train = noisy[noisy.split == "train"]
    assert noisy.shape[0] == manifest.num_rows  # no row dropped
    assert train.is_corrupted.sum() == round(cfg.noise.rate * len(train))
    assert not noisy[noisy.split != "train"].is_corrupted.any()
    assert (noisy.label != noisy.label_clean).sum() == train.is_corrupted.sum()

    ckpts = list_checkpoints(open_run_root(cfg).checkpoints)
    assert [load_checkpoint(c).epoch for c in ckpts] == [1, 2]
    for c in ckpts:
        ck = load_checkpoint(c)
        assert ck.learning_rate == pytest.approx(cfg.train.lr)
        assert ck.architecture["num_classes"] == 4

    metrics = json.loads((root / "evaluation" / "metrics.json").read_text())
    assert metrics == results["evaluate"]
    assert 0 <= metrics["accuracy"] <= 100
    assert set(metrics["per_class_accuracy"]) == set(cfg.class_names)
    assert metrics["n"] == (manifest.column("split").to_numpy(zero_copy_only=False) == "test").sum()


def test_rerun_skips_done_stages(tiny_run):
    cfg, root, _ = tiny_run
    stamps = {p: p.stat().st_mtime_ns for p in (root / "checkpoints").rglob("checkpoint.pt")}
    run_pipeline(cfg)
    assert stamps == {p: p.stat().st_mtime_ns for p in (root / "checkpoints").rglob("checkpoint.pt")}
    record = json.loads((root / "stages" / "train.json").read_text())
    assert record["status"] == "done"


def test_influence_and_removal_stages(tiny_run):
    """The Ray Data influence stage gives the compute core's scores; removal retrains without
    the flagged set."""
    import numpy as np

    from diffinf_ray.data.images import to_tensor_batch
    from diffinf_ray.influence.grad_norms import SelfInfluenceScorer

    cfg, root, _ = tiny_run
    more = load_config(TINY, [f"run.root={root}",
                              "stages=[ingest,noise,train,evaluate,influence,removal]"])
    results = run_pipeline(more)
    scores = pq.read_table(root / "influence" / "influence.parquet").to_pandas().set_index("sample_id")
    noisy = pq.read_table(root / "manifest_noisy").to_pandas()
    train = noisy[noisy.split == "train"].set_index("sample_id")
    assert sorted(scores.index) == sorted(train.index)  # every training row scored once
    assert scores.is_high.sum() == round(more.influence.tau * len(train))
    assert (scores.score[scores.is_high].min() >= scores.score[~scores.is_high].max())

    direct = SelfInfluenceScorer(str(root / "checkpoints"), device="cpu")(
        to_tensor_batch(list(train.image)), train.label.to_numpy(np.int64))
    np.testing.assert_allclose(scores.loc[train.index, "score"], direct["score"], rtol=1e-4)
    assert len(scores.per_checkpoint.iloc[0]) == 2

    detection = json.loads((root / "influence" / "detection.json").read_text())
    assert set(detection) == {"tracin", "loss"}
    assert (root / "influence" / "score_hist.png").stat().st_size > 0
    removal = json.loads((root / "removal" / "evaluation" / "metrics.json").read_text())
    assert removal["removed_rows"] == scores.is_high.sum()
    assert results["removal"]["accuracy"] == removal["accuracy"]


def test_train_resumes_from_last_checkpoint(tiny_run):
    """A second fit on the same checkpoints folder continues after the last saved epoch."""
    cfg, root, _ = tiny_run
    location = open_run_root(cfg).checkpoints
    before = {c.path: c.read_bytes() for c in list_checkpoints(location)}
    longer = load_config(TINY, [f"run.root={root}", "train.epochs=3"])
    metrics = train_classifier(longer, open_run_root(longer).noisy_manifest, location, 4)
    after = list_checkpoints(location)
    assert [load_checkpoint(c).epoch for c in after] == [1, 2, 3]
    for c in after[:2]:  # the earlier epochs were not retrained
        assert c.read_bytes() == before[c.path]
    assert metrics["epoch"] == 3

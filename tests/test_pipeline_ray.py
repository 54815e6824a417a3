"""End to end on a real local Ray: ingest -> noise -> train (Ray Train) -> evaluate."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from diffinf_ray.config import load_config
from diffinf_ray.models.checkpoint import list_checkpoints, load_checkpoint
from diffinf_ray.models.training import train_classifier
from diffinf_ray.pipeline import open_run_root, run_pipeline

TINY = "jobs/configs/tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config(TINY, [f"run.root={root}"])
    results = run_pipeline(cfg)
    yield cfg, root, results
    shutil.rmtree(root, ignore_errors=True)  # hundreds of MB of checkpoints: the CI disk is small


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
    # best-validation selection: the epoch whose reported val accuracy (saved beside its
    # checkpoint) is highest, the earliest on a tie; evaluated on the same test rows
    vals = [json.loads((Path(c.path).parent / "metrics.json").read_text())["val_accuracy"]
            for c in ckpts]
    best = metrics["best_val"]
    assert (best["epoch"], best["val_accuracy"]) == (1 + int(vals[1] > vals[0]), max(vals))
    if best["epoch"] == 2:
        assert best["accuracy"] == metrics["accuracy"]


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

    scorer = SelfInfluenceScorer(str(root / "checkpoints"), device="cpu")
    direct = scorer(to_tensor_batch(list(train.image)), train.label.to_numpy(np.int64))
    np.testing.assert_allclose(scores.loc[train.index, "score"], direct["score"], rtol=1e-4)
    assert len(scores.per_checkpoint.iloc[0]) == 2
    np.testing.assert_allclose(scores.loc[train.index, "score_last"],
                               direct["per_checkpoint_last"] @ scorer.learning_rates, rtol=1e-4)
    # the checkpoints up to the best validation accuracy on the assigned labels, by epoch
    peak = results["influence"]["validation_peak_checkpoint"]
    weighted = np.stack(scores.loc[train.index, "per_checkpoint"].to_numpy())
    np.testing.assert_allclose(scores.loc[train.index, "score_early"],
                               weighted[:, :peak + 1].sum(1), rtol=1e-12)

    detection = json.loads((root / "influence" / "detection.json").read_text())
    assert set(detection) == {"tracin", "tracin_last", "tracin_early", "loss", "aum", "oracle"}
    np.testing.assert_allclose(scores.loc[train.index, "aum"], direct["margin"].mean(1),
                               rtol=1e-5)
    assert (root / "influence" / "score_hist.png").stat().st_size > 0
    removal = json.loads((root / "removal" / "evaluation" / "metrics.json").read_text())
    assert removal["removed_rows"] == scores.is_high.sum()
    assert results["removal"]["accuracy"] == removal["accuracy"]


def test_influence_on_empty_training_split_is_a_clear_error(tiny_run, tmp_path):
    import pyarrow.compute as pc

    from diffinf_ray.stages.influence import score_training_set
    from diffinf_ray.storage import Location

    cfg, root, _ = tiny_run
    table = pq.read_table(root / "manifest_noisy")
    pq.write_table(table.filter(pc.field("split") != "train"), tmp_path / "part.parquet")
    with pytest.raises(ValueError, match="training split is empty"):
        score_training_set(cfg, Location(str(tmp_path)), open_run_root(cfg).checkpoints)


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


def _png(seed: int) -> bytes:
    import numpy as np

    from diffinf_ray.data.images import encode_png

    return encode_png(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8))


def test_ingest_user_table_quarantines_bad_rows(ray_local, tmp_path):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    rows = ["image,label,split"]
    for i in range(16):
        (data / "img" / f"ok{i}.png").write_bytes(_png(i))
        rows.append(f"img/ok{i}.png,{['cat', 'dog'][i % 2]},{['train', 'val', 'test', 'train'][i % 4]}")
    (data / "img" / "corrupt.png").write_bytes(b"this is not an image at all")
    (data / "img" / "cut.png").write_bytes(_png(99)[:200])
    (tmp_path / "outside.png").write_bytes(_png(100))
    rows += ["img/corrupt.png,cat,train", "img/cut.png,dog,train", "img/missing.png,cat,train",
             "img/ok0.png,bird,train", "../outside.png,cat,train"]
    (data / "labels.csv").write_text("\n".join(rows) + "\n")

    overrides = [f"run.root={tmp_path / 'run'}", "data.source=table",
                 f"data.path={data / 'labels.csv'}", "data.classes=[cat,dog]",
                 "data.image_size=32", "stages=[ingest]"]
    with pytest.raises(Exception, match="quarantin"):
        run_pipeline(load_config(TINY, overrides))  # 5 of 21 rows bad > the 5% default limit

    summary = run_pipeline(load_config(TINY, [*overrides, "data.max_quarantine_fraction=0.5"]))["ingest"]
    assert summary["input_rows"] == 21
    assert summary["manifest_rows"] + summary["quarantined_rows"] == 21
    quarantine = pq.read_table(tmp_path / "run" / "quarantine").to_pandas()
    reasons = " | ".join(sorted(quarantine.reason))
    # ok0.png appears twice (once with label "bird"): both copies share the id -> duplicates
    for expected in ("unreadable", "truncated", "missing file", "escapes", "duplicate"):
        assert expected in reasons, reasons
    manifest = pq.read_table(tmp_path / "run" / "manifest").to_pandas()
    assert set(manifest.label) <= {0, 1}
    assert not set(manifest.sample_id) & set(quarantine.sample_id)


def test_datasets_for_ray_train_run_without_progress_bars(ray_local):
    """Train executes its datasets in its workers, whose tqdm bars reach the driver as raw
    cursor moves; those datasets run with bars off, the driver's own datasets keep them."""
    import ray.data

    from diffinf_ray.ray_session import without_progress_bars

    driver_side = ray.data.range(4)
    datasets = without_progress_bars({"train": ray.data.range(8).map_batches(lambda b: b),
                                      "val": ray.data.range(4)})
    assert [ds.context.enable_progress_bars for ds in datasets.values()] == [False, False]
    assert datasets["train"].count() == 8  # still runs
    assert ray.data.DataContext.get_current().enable_progress_bars
    assert driver_side.context.enable_progress_bars


def test_manifest_reads_skip_ray_datas_footer_actors(tiny_run, monkeypatch, capfd):
    """`datasets.read_parquet` plans a V1 read (no ListFiles step: Ray 2.60's V2 reader starts
    32 footer-reading actors per read, seconds each time on a small box) and reads every row;
    its planning draws no tqdm bar, even with Ray Data's bars on, and leaves them on for the
    dataset's run; RAY_DATA_USE_DATASOURCE_V2 set by the user is left to Ray."""
    import ray

    from diffinf_ray.datasets import USE_DATASOURCE_V2_ENV, read_parquet

    cfg, _, _ = tiny_run
    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "use_datasource_v2", True)
    monkeypatch.setattr(context, "enable_progress_bars", True)
    monkeypatch.delenv(USE_DATASOURCE_V2_ENV, raising=False)
    capfd.readouterr()
    ds = read_parquet(open_run_root(cfg).manifest)
    assert "Parquet dataset sampling" not in "".join(capfd.readouterr())
    assert ds.context.enable_progress_bars and context.enable_progress_bars
    assert context.use_datasource_v2  # changed only while the read was planned
    ds = ds.materialize()
    assert ds.count() == cfg.data.synthfaces.num_samples
    assert "ListFiles" not in ds.stats() and "ReadParquet" in ds.stats()

    monkeypatch.setattr(context, "use_datasource_v2", True)
    monkeypatch.setenv(USE_DATASOURCE_V2_ENV, "1")
    read_parquet(open_run_root(cfg).manifest)
    assert context.use_datasource_v2

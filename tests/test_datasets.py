"""datasets.py without Ray: the split/id/fold selection, the driver-side split reader, and the
clear error every stage gives for a manifest that lacks a column it reads."""

from __future__ import annotations

import importlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffinf_ray.config import load_config
from diffinf_ray.datasets import check_manifest, fold_of, read_split, select_rows
from diffinf_ray.manifest import SCHEMA, ManifestError
from diffinf_ray.run_root import RunRoot
from diffinf_ray.storage import Location

TINY = "jobs/configs/tiny.yaml"


def manifest_table(n: int = 12, drop: tuple[str, ...] = ()) -> pa.Table:
    ids = [f"s{i:03d}" for i in range(n)]
    columns = {
        "sample_id": ids,
        "split": [("train", "val", "test")[i % 3] for i in range(n)],
        "label": np.arange(n, dtype=np.int32) % 4,
        "label_clean": np.arange(n, dtype=np.int32) % 4,
        "is_corrupted": [False] * n,
        "image": [b"png%d" % i for i in range(n)],
        "image_uri": [None] * n,
        "group": ["g"] * n,
        "identity": [f"p{i % 5}" for i in range(n)],
    }
    table = pa.table(columns, schema=SCHEMA)
    return table.drop_columns(list(drop))


def write_manifest(folder, table: pa.Table) -> Location:
    folder.mkdir(parents=True)
    half = table.num_rows // 2  # two files, as Ray Data writes a manifest
    pq.write_table(table.slice(0, half), folder / "part-0.parquet")
    pq.write_table(table.slice(half), folder / "part-1.parquet")
    return Location(str(folder))


def test_select_rows_by_split_ids_and_fold():
    batch = {k: np.asarray(v.to_pylist(), dtype=object) for k, v in
             zip(manifest_table().column_names, manifest_table().columns, strict=True)}
    train = select_rows(batch, "train")
    assert set(train["split"]) == {"train"} and len(train["sample_id"]) == 4
    assert list(select_rows(batch, "train", include_ids=frozenset({"s000", "s001", "s003"}))
                ["sample_id"]) == ["s000", "s003"]
    assert list(select_rows(batch, "train", exclude_ids=frozenset({"s000"}))["sample_id"]) == \
        ["s003", "s006", "s009"]
    inside = select_rows(batch, "train", fold=(0, 2, True))["sample_id"]
    outside = select_rows(batch, "train", fold=(0, 2, False))["sample_id"]
    assert sorted([*inside, *outside]) == sorted(train["sample_id"])
    assert (fold_of(inside, 2) == 0).all() and (fold_of(outside, 2) == 1).all()


def test_select_rows_relabels_only_the_named_rows_of_the_split():
    batch = {k: np.asarray(v.to_pylist(), dtype=object) for k, v in
             zip(manifest_table().column_names, manifest_table().columns, strict=True)}
    batch["label"] = batch["label"].astype(np.int32)
    # s001 is a val row: relabelling names train rows only, the others pass through
    rows = select_rows(batch, "train", exclude_ids=frozenset({"s000"}),
                       relabel={"s003": 0, "s009": 2, "s001": 3})
    assert list(rows["sample_id"]) == ["s003", "s006", "s009"]
    assert rows["label"].tolist() == [0, 2, 2] and rows["label"].dtype == np.int32
    assert batch["label"].tolist()[3] == 3  # the input batch is left as it was
    assert select_rows(batch, "val", relabel={"s003": 0})["label"].tolist() == [1, 0, 3, 2]


def test_oracle_relabelling_changes_exactly_the_wrong_labels_and_refuses_unknown_truth():
    import pandas as pd

    from diffinf_ray.stages.detectors import oracle_relabelling

    rows = pd.DataFrame({"sample_id": ["a", "b", "c"], "label": [0, 1, 2],
                         "label_clean": pd.array([1, 1, 0], dtype="Int32")})
    assert oracle_relabelling(rows) == {"a": 1, "c": 0}
    assert oracle_relabelling(rows.iloc[:0]) == {}
    rows["label_clean"] = pd.array([1, None, 0], dtype="Int32")
    with pytest.raises(ValueError, match=r"relabel: 1 flagged rows have no known clean label "
                                         r"\(e\.g\. b\)"):
        oracle_relabelling(rows)


def test_read_split_sorted_and_by_id(tmp_path):
    table = manifest_table()
    manifest = write_manifest(tmp_path / "m", table.take(np.arange(table.num_rows)[::-1]))
    df = read_split(manifest, "val", ["image", "identity"])
    assert list(df.columns) == ["sample_id", "image", "identity"]
    assert df["sample_id"].tolist() == ["s001", "s004", "s007", "s010"]
    assert df["image"].tolist() == [b"png1", b"png4", b"png7", b"png10"]
    picked = read_split(manifest, "val", ["label"], ids=["s010", "s001", "s002"])
    assert picked["sample_id"].tolist() == ["s001", "s010"]  # s002 is a test row
    none = read_split(manifest, "val", ["label"], ids=frozenset())  # e.g. nothing flagged
    assert none.empty and list(none.columns) == ["sample_id", "label"]


def test_check_manifest_names_the_stage_and_the_column(tmp_path):
    manifest = write_manifest(tmp_path / "m", manifest_table(drop=("image", "label_clean")))
    check_manifest(manifest, "noise", ("sample_id", "split", "label"))
    with pytest.raises(ManifestError, match=r"^noise stage: .*lacks column\(s\) label_clean"):
        check_manifest(manifest, "noise", ("sample_id", "split", "label", "label_clean"))
    with pytest.raises(ManifestError, match=r"train stage: .*lacks column\(s\) image\b"):
        check_manifest(manifest, "train", ("sample_id", "split", "image", "label"))


# stage -> (entry point, the manifest folder it reads, a column it needs)
STAGE_READS = {
    "noise": ("noise:run_noise", "manifest", "label_clean"),
    "train": ("train:run_train", "manifest_noisy", "image"),
    "evaluate": ("evaluate:run_evaluate", "manifest_noisy", "group"),
    "influence": ("influence:run_influence", "manifest_noisy", "is_corrupted"),
    "removal": ("detectors:run_removal", "manifest_noisy", "label"),
    "relabel": ("detectors:run_relabel", "manifest_noisy", "label_clean"),
    "baselines": ("baselines:run_baselines", "manifest_noisy", "is_corrupted"),
    "autoencoder": ("autoencoder:run_autoencoder", "manifest_noisy", "image"),
    "predictor": ("predictor:run_predictor", "manifest_noisy", "image"),
    "lossnets": ("lossnets:run_lossnets", "manifest", "image"),
    "edit": ("edit:run_edit", "manifest_noisy", "image"),
    "refine": ("refine:run_refine", "manifest_noisy", "image"),
    "oracle": ("oracle:run_oracle", "manifest_noisy", "label_clean"),
}


@pytest.mark.parametrize("stage", sorted(STAGE_READS))
def test_a_stage_fails_clearly_on_a_manifest_without_a_column_it_reads(stage, tmp_path):
    """Before any Ray work: the error names the stage and the missing column."""
    entry, folder, column = STAGE_READS[stage]
    module, _, name = entry.partition(":")
    run = getattr(importlib.import_module(f"diffinf_ray.stages.{module}"), name)
    write_manifest(tmp_path / "root" / folder, manifest_table(drop=(column,)))
    cfg = load_config(TINY, [f"run.root={tmp_path / 'root'}"])
    with pytest.raises(ManifestError, match=rf"^{stage} stage: .*lacks column\(s\) {column}\b"):
        run(cfg, RunRoot(str(tmp_path / "root")))

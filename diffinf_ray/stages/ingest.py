"""Ingest stage: build the manifest with Ray Data.

In:  synthfaces (generated in parallel from sample indices), or user data: an image folder or a
     CSV/parquet label table (local or s3://).
Out: <run root>/manifest/   manifest rows (manifest.py)
     <run root>/quarantine/ rows that could not be used: sample_id, source, stage, reason
Counts are conserved: input rows = manifest rows + quarantined rows; the stage fails when the
quarantined fraction passes `data.max_quarantine_fraction`.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from diffinf_ray.config import Config
from diffinf_ray.datasets import (
    read_parquet,
    synthfaces_dataset,
    write_dataset,
    write_dataset_or_empty,
)
from diffinf_ray.manifest import QUARANTINE_SCHEMA
from diffinf_ray.run_root import RunRoot

log = logging.getLogger(__name__)


def _ingest_table(batch: dict[str, np.ndarray], **kwargs) -> pa.Table:
    """`ingest_batch`, typed at once: a numpy hop between the two would turn null labels into
    NaN floats."""
    from diffinf_ray.data.ingest import ingest_batch, output_table

    return output_table(ingest_batch(batch, **kwargs))


def _manifest_part(table: pa.Table) -> pa.Table:
    from diffinf_ray.data.ingest import to_manifest_and_quarantine

    return to_manifest_and_quarantine(table)[0]


def _quarantine_part(table: pa.Table) -> pa.Table:
    from diffinf_ray.data.ingest import to_manifest_and_quarantine

    return to_manifest_and_quarantine(table)[1]


def _ingest_synthfaces(cfg: Config, root: RunRoot) -> None:
    write_dataset(synthfaces_dataset(cfg), root.manifest)
    root.quarantine.child("quarantine.parquet").write_table(QUARANTINE_SCHEMA.empty_table())


def _user_rows(cfg: Config):
    from diffinf_ray.data.ingest import list_image_folder, read_label_table
    from diffinf_ray.storage import Location

    source = Location(cfg.data.path, root_options(cfg))
    if cfg.data.source == "folder":
        return source, list_image_folder(source, cfg.data.classes)
    table = read_label_table(source)
    # relative image paths in a table are relative to the table's folder
    return source.parent(), table


def root_options(cfg: Config):
    from diffinf_ray.storage import StorageOptions

    return StorageOptions.of(cfg.storage)


def _ingest_user_data(cfg: Config, root: RunRoot) -> int:
    import ray

    from diffinf_ray.data.ingest import find_duplicate_ids

    dataset_root, rows = _user_rows(cfg)
    if rows.num_rows == 0:
        raise ValueError(f"{cfg.data.path}: no rows to ingest")
    duplicates = find_duplicate_ids(rows.column("sample_id").to_pylist())
    staged = root.child("_staging", "ingest")
    staged.delete()
    ray.data.from_arrow(rows).map_batches(
        _ingest_table,
        fn_kwargs={
            "dataset_root_uri": dataset_root.uri,
            "storage_options": root_options(cfg),
            "classes": cfg.class_names,
            "image_size": cfg.data.image_size,
            "duplicate_ids": duplicates,
            "split_fractions": tuple(cfg.data.split_fractions),
            "split_seed": cfg.run.seed,
        },
        batch_size=cfg.data.batch_size,
        batch_format="numpy",
    ).write_parquet(staged.path, filesystem=staged.fs)
    # one validation pass, then two streaming selections: memory stays flat in dataset size
    staged_ds = read_parquet(staged)
    write_dataset(staged_ds.map_batches(_manifest_part, batch_format="pyarrow"), root.manifest)
    write_dataset_or_empty(staged_ds.map_batches(_quarantine_part, batch_format="pyarrow"),
                           root.quarantine, QUARANTINE_SCHEMA.empty_table())
    staged.delete()
    return rows.num_rows


def run_ingest(cfg: Config, root: RunRoot) -> dict:
    root.manifest.delete()
    root.quarantine.delete()
    if cfg.data.source == "synthfaces":
        _ingest_synthfaces(cfg, root)
        n_input = cfg.data.synthfaces.num_samples
    else:
        n_input = _ingest_user_data(cfg, root)

    from diffinf_ray.data.ingest import check_counts_conserved, check_quarantine_fraction, summarise

    table = root.manifest.read_table(columns=["split", "label"])
    quarantined = root.quarantine.read_table()
    n_manifest, n_bad = table.num_rows, quarantined.num_rows
    check_counts_conserved(n_input, n_manifest, n_bad, root.display)
    reasons = summarise(quarantined.column("reason").to_pylist())
    labels = np.asarray(table.column("label").to_numpy(), dtype=np.int64)
    summary = {
        "input_rows": n_input,
        "manifest_rows": n_manifest,
        "quarantined_rows": n_bad,
        "quarantine_reasons": reasons,
        "split_counts": _count(table.column("split").to_pylist()),
        "class_counts": dict(zip(cfg.class_names,
                                 np.bincount(labels, minlength=len(cfg.class_names)).tolist(),
                                 strict=True)),
        "classes": cfg.class_names,
    }
    if n_bad:
        log.warning("ingest: %d of %d rows quarantined (%s); see %s", n_bad, n_input, reasons,
                    root.quarantine.display)
        check_quarantine_fraction(n_input, n_bad, cfg.data.max_quarantine_fraction,
                                  root.quarantine.display, reasons)
    return summary


def _count(values: list[str]) -> dict[str, int]:
    keys, counts = np.unique(np.asarray(values, dtype=str), return_counts=True)
    return {str(k): int(c) for k, c in zip(keys, counts, strict=True)}

"""The project's data in and out: the manifest's splits as Ray Datasets or driver tables, a
synthfaces draw as a Ray Dataset, and stage results written as parquet through `storage`.

Stages read a manifest folder (manifest/, manifest_noisy/, refined/, judges/manifest/) only
through these functions, so the split/fold/id selection lives in one place; `check_manifest`
turns a manifest that lacks a column a stage reads into a `ManifestError` naming the stage and
the column, before any Ray work starts.
"""

from __future__ import annotations

import zlib

import numpy as np

from diffinf_ray.manifest import require_columns
from diffinf_ray.storage import Location

# -- reading ----------------------------------------------------------------------------------

# Ray Data's parquet reader. Ray 2.60's default ("datasource V2") lists a folder, each time a
# dataset reading it runs, by starting 32 footer-reading actors and killing them after: on a
# 2-core box that cost 3-10 s per run whatever the folder's size (a 120-row split: 6.5 s, of
# which 54 ms on a CPU; the V1 reader: 0.2 s). V1 reads the footers when the read is planned,
# which suits this project's folders (tens of files, however many images). A value of
# RAY_DATA_USE_DATASOURCE_V2 in the environment wins.
USE_DATASOURCE_V2_ENV = "RAY_DATA_USE_DATASOURCE_V2"


def read_parquet(location: Location):
    """A parquet folder or file as a Ray Dataset (lazy), through the V1 reader unless
    RAY_DATA_USE_DATASOURCE_V2 says otherwise. Ray Data's settings are changed only while the
    read is planned: other reads in the process keep theirs."""
    import os

    import ray

    context = ray.data.DataContext.get_current()
    saved = context.use_datasource_v2, context.enable_progress_bars
    if USE_DATASOURCE_V2_ENV not in os.environ:
        context.use_datasource_v2 = False  # read_parquet picks its reader from this, here
    # V1 samples a few files while planning, under a raw tqdm bar whenever Ray Data's bars are
    # on (any stdout that is not a terminal): lines of carriage returns in logs and job output
    context.enable_progress_bars = False
    try:
        ds = ray.data.read_parquet(location.path, filesystem=location.fs)
    finally:
        context.use_datasource_v2, context.enable_progress_bars = saved
    ds.context.enable_progress_bars = saved[1]  # the dataset's own run keeps its progress
    return ds


def manifest_columns(manifest: Location) -> list[str]:
    """Column names of a manifest folder (the parquet schema; no row is read)."""
    import pyarrow.dataset as pads

    return pads.dataset(manifest.path, filesystem=manifest.fs, format="parquet").schema.names


def check_manifest(manifest: Location, stage: str, columns) -> None:
    """Fail with a `ManifestError` naming `stage` and the missing columns when the manifest
    at `manifest` lacks any of `columns` (the ones the stage reads)."""
    require_columns(manifest_columns(manifest), columns, stage, manifest.display)


def fold_of(sample_ids: np.ndarray, num_folds: int) -> np.ndarray:
    """Deterministic fold of each sample (crc32 of its id), independent of row order."""
    return np.array([zlib.crc32(str(s).encode()) % num_folds for s in sample_ids], dtype=np.int64)


def select_rows(batch: dict[str, np.ndarray], split: str, exclude_ids: frozenset | None = None,
                fold: tuple[int, int, bool] | None = None,
                include_ids: frozenset | None = None,
                relabel: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Rows of `split`, minus `exclude_ids` (only `include_ids` when given); with
    `fold=(k, K, inside)`, only the rows whose fold is k (inside=True) or is not k; with
    `relabel` ({sample_id: label}), those rows' `label` replaced (the oracle relabel control)."""
    keep = batch["split"] == split
    if exclude_ids:
        keep &= ~np.isin(batch["sample_id"].astype(str), list(exclude_ids))
    if include_ids is not None:
        keep &= np.isin(batch["sample_id"].astype(str), list(include_ids))
    if fold is not None:
        k, num_folds, inside = fold
        keep &= (fold_of(batch["sample_id"], num_folds) == k) == inside
    rows = {k: v[keep] for k, v in batch.items()}
    if relabel:
        ids = rows["sample_id"].astype(str)
        hit = np.isin(ids, list(relabel))
        labels = rows["label"].copy()
        labels[hit] = [relabel[i] for i in ids[hit]]
        rows["label"] = labels
    return rows


def split_dataset(manifest: Location, split: str, columns: list[str],
                  exclude_ids: frozenset | None = None, fold: tuple[int, int, bool] | None = None,
                  include_ids: frozenset | None = None, relabel: dict[str, int] | None = None):
    """Rows of one split of a manifest folder as a Ray Dataset (streaming, not materialised):
    `columns` plus `split` (and `sample_id` when selecting or relabelling by id or fold); the
    selection and `relabel` as in `select_rows`."""
    by_id = exclude_ids or fold or include_ids is not None or relabel
    needed = set(columns) | {"split"} | ({"sample_id"} if by_id else set())
    ds = read_parquet(manifest).select_columns(sorted(needed))
    return ds.map_batches(select_rows, batch_format="numpy", fn_kwargs={
        "split": split, "exclude_ids": exclude_ids, "fold": fold, "include_ids": include_ids,
        "relabel": relabel})


def read_split(manifest: Location, split: str, columns: list[str], ids=None):
    """Rows of one split (only the sample_ids `ids` when given) as a pandas DataFrame in the
    driver: `sample_id` (str) and `columns`, sorted by sample_id. For reads small enough for
    the driver (networks trained there, a few held-out images)."""
    wanted = ["sample_id", "split", *[c for c in columns if c not in ("sample_id", "split")]]
    filters = [("split", "=", split)]
    ids = None if ids is None else [str(i) for i in ids]
    if ids:  # an empty "in" list has no type for the filter to bind: filtered below
        filters.append(("sample_id", "in", ids))
    df = manifest.read_table(columns=wanted, filters=filters).to_pandas()
    df = df[df["split"] == split].drop(columns=[] if "split" in columns else ["split"])
    df["sample_id"] = df["sample_id"].astype(str)
    if ids is not None and not ids:
        df = df.iloc[:0]
    return df.sort_values("sample_id", kind="stable").reset_index(drop=True)


ORDER_KEY = "order"


def order_keys(sample_ids) -> np.ndarray:
    """A fixed int64 key per sample id (64 bits of its BLAKE2b hash): a numeric column to sort
    rows into one order whatever order Ray Data's tasks delivered them in (a string cannot
    travel through `iter_torch_batches`)."""
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(str(s).encode(), digest_size=8).digest(),
                                    "little", signed=True) for s in sample_ids], dtype=np.int64)


def decode_for_training(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data batch fn: PNG bytes -> float32 (B, 3, H, W) in [-1, 1]; keep label; with a
    `sample_id` column, its `order` key (`order_keys`) instead of it."""
    from diffinf_ray.data.images import to_tensor_batch

    out = {"image": to_tensor_batch(list(batch["image"])),
           "label": batch["label"].astype(np.int64)}
    if "sample_id" in batch:
        out[ORDER_KEY] = order_keys(batch["sample_id"])
    return out


# -- a synthfaces draw ------------------------------------------------------------------------


def synthfaces_spec(cfg):
    """The `SynthFacesSpec` of a config's data section (seed: run.seed)."""
    from diffinf_ray.data.synthfaces import SynthFacesSpec

    sf = cfg.data.synthfaces
    return SynthFacesSpec(
        task=cfg.data.task,
        resolution=sf.resolution,
        seed=cfg.run.seed,
        num_identities=sf.num_identities,
        age_bins=tuple(tuple(b) for b in cfg.data.age_bins),
        with_masks=sf.with_masks,
        split_fractions=tuple(sf.split_fractions),
        expression_gain=sf.expression_gain,
    )


def _generate(batch: dict[str, np.ndarray], spec) -> dict[str, np.ndarray]:
    from diffinf_ray.data.synthfaces import generate_batch

    return generate_batch(spec, batch["id"])


def synthfaces_dataset(cfg):
    """`data.synthfaces.num_samples` manifest rows generated in parallel from their indices."""
    import ray

    n = cfg.data.synthfaces.num_samples
    blocks = max(2, min(200, n // 500))
    return ray.data.range(n, override_num_blocks=blocks).map_batches(
        _generate, fn_kwargs={"spec": synthfaces_spec(cfg)}, batch_size=cfg.data.batch_size,
        batch_format="numpy",
    )


# -- writing ----------------------------------------------------------------------------------


def write_dataset(ds, out: Location) -> None:
    """Stream a Ray Dataset into the parquet folder `out` (its old contents deleted first), block
    by block from the workers: nothing is collected in the driver."""
    out.delete()
    ds.write_parquet(out.path, filesystem=out.fs)


def write_dataset_or_empty(ds, out: Location, empty_table) -> None:
    """`write_dataset`, and when no row came out (Ray Data writes no file then), one file of
    `empty_table`, so that readers still find the folder and its schema."""
    write_dataset(ds, out)
    if not out.list_files(".parquet"):
        out.child("part-empty.parquet").write_table(empty_table)

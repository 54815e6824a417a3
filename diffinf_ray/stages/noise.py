"""Noise stage: assign (possibly noisy) labels to the manifest with Ray Data.

In:  manifest/ (sample_id, split, label, label_clean, ...).
Out: manifest_noisy/: the same rows and columns, with `label` the assigned label, `label_clean`
     the label before injected noise (or the known truth), `is_corrupted` = label != label_clean
     where both are known. With rate 0 labels pass through unchanged (a user's own noisy data).
The noise draw (data/noise.py) runs once in the driver on three small columns; Ray Data then
applies it to the image-carrying rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from diffinf_ray.config import Config
from diffinf_ray.data.noise import inject_label_noise
from diffinf_ray.datasets import check_manifest, read_parquet, write_dataset
from diffinf_ray.run_root import RunRoot


def _apply(batch: pd.DataFrame, assigned: pd.DataFrame) -> pd.DataFrame:
    rows = assigned.loc[batch["sample_id"]]
    batch["label"] = rows["label"].to_numpy(np.int32)
    batch["label_clean"] = rows["label_clean"].astype("Int32").to_numpy()
    batch["is_corrupted"] = rows["is_corrupted"].astype("boolean").to_numpy()
    return batch


def run_noise(cfg: Config, root: RunRoot) -> dict:
    check_manifest(root.manifest, "noise", ("sample_id", "split", "label", "label_clean"))
    cols = root.manifest.read_table(columns=["sample_id", "split", "label", "label_clean"]).to_pandas()
    num_classes = len(cfg.class_names)
    if cfg.noise.rate > 0:
        noisy = inject_label_noise(cols["sample_id"].to_numpy(), cols["split"].to_numpy(),
                                   cols["label"].to_numpy(), num_classes, cfg.noise.rate,
                                   cfg.noise.kind, cfg.noise.seed)
        # the labels before noise are the truth for synthfaces; for user data they are the
        # best known labels, and injected noise is measured against them
        assigned = pd.DataFrame({"label": noisy.label, "label_clean": noisy.label_clean,
                                 "is_corrupted": noisy.is_corrupted}, index=cols["sample_id"])
    else:
        clean = cols["label_clean"].astype("Int32")
        assigned = pd.DataFrame({
            "label": cols["label"].to_numpy(np.int32),
            "label_clean": clean.to_numpy(),
            "is_corrupted": (cols["label"].astype("Int32") != clean).astype("boolean").to_numpy(),
        }, index=cols["sample_id"])

    write_dataset(read_parquet(root.manifest).map_batches(
        _apply, fn_kwargs={"assigned": assigned}, batch_format="pandas"), root.noisy_manifest)

    train = cols["split"].to_numpy() == "train"
    corrupted = assigned["is_corrupted"].to_numpy()[train]
    n_corrupted = int(np.nansum(corrupted.astype(float))) if len(corrupted) else 0
    return {
        "kind": cfg.noise.kind,
        "rate": cfg.noise.rate,
        "train_rows": int(train.sum()),
        "corrupted_train_rows": n_corrupted,
        "corrupted_other_rows": int(np.nansum(assigned["is_corrupted"].to_numpy()[~train]
                                              .astype(float))),
    }

"""Refine and retrain stages (METHOD.md stages 7-8).

refine
  In:  manifest_noisy/ (all splits), edits/edits.parquet (sample_id, image).
  Out: refined/   the manifest with each edited training image replaced by its edit:
                  D' = (D minus H) union {(x_hat_i, y_i)}. Same rows, same labels, same splits;
                  added columns `is_edited` (bool) and `image_original` (the replaced PNG, null
                  elsewhere). High-influence rows the edit stage quarantined keep their original
                  image (counted in the summary). The train split's row count is checked equal.
retrain
  In:  refined/; the train and evaluate sections (the baseline recipe, from scratch).
  Out: retrain/checkpoints/, retrain/evaluation/metrics.json + predictions.parquet (clean test).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from diffinf_ray.artifacts import edit_quarantine_rows, read_edits
from diffinf_ray.config import Config
from diffinf_ray.datasets import check_manifest, write_dataset
from diffinf_ray.run_root import RunRoot

REFINED = "refined"


def _replace_images(batch: pd.DataFrame, edits_ref) -> pd.DataFrame:
    import ray

    edits = ray.get(edits_ref)  # sample_id -> PNG of the edit
    ids = batch["sample_id"].astype(str)
    edited = ids.isin(edits.index).to_numpy() & (batch["split"] == "train").to_numpy()
    batch["image_original"] = pd.Series([None] * len(batch), dtype=object)
    if edited.any():
        batch.loc[edited, "image_original"] = batch.loc[edited, "image"]
        batch.loc[edited, "image"] = edits.loc[ids[edited]].to_numpy()
    batch["is_edited"] = edited
    return batch


def run_refine(cfg: Config, root: RunRoot) -> dict:
    import ray

    check_manifest(root.noisy_manifest, "refine", ("sample_id", "split", "image"))
    edits = read_edits(root, ["sample_id", "image"]).to_pandas()
    edits = pd.Series(edits["image"].to_numpy(), index=edits["sample_id"].astype(str))
    out = root.child(REFINED)
    write_dataset(ray.data.read_parquet(root.noisy_manifest.path, filesystem=root.fs).map_batches(
        _replace_images, fn_kwargs={"edits_ref": ray.put(edits)}, batch_format="pandas"), out)

    before = root.noisy_manifest.read_table(columns=["sample_id", "split"]).to_pandas()
    after = out.read_table(columns=["sample_id", "split", "is_edited"]).to_pandas()
    n_before = int((before["split"] == "train").sum())
    n_after = int((after["split"] == "train").sum())
    if n_before != n_after or len(before) != len(after):
        raise RuntimeError(f"refine: {len(before)} rows ({n_before} train) in, {len(after)} "
                           f"({n_after} train) out")
    n_quarantined = edit_quarantine_rows(root)
    return {"rows": len(after), "train_rows": n_after,
            "edited_rows": int(np.asarray(after["is_edited"], bool).sum()),
            "high_influence_kept_original": n_quarantined}


def run_retrain(cfg: Config, root: RunRoot) -> dict:
    # here, not at the top: Ray Data workers import this module for `_replace_images`
    from diffinf_ray.models.evaluation import PREDICT_COLUMNS, evaluate_checkpoints
    from diffinf_ray.models.training import TRAIN_COLUMNS, train_classifier

    refined = root.child(REFINED)
    check_manifest(refined, "retrain", TRAIN_COLUMNS + PREDICT_COLUMNS)
    out = root.child("retrain")
    train_classifier(cfg, refined, out.child("checkpoints"), len(cfg.class_names))
    return evaluate_checkpoints(cfg, refined, out.child("checkpoints"), out.child("evaluation"))

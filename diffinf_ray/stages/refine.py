"""Refine and retrain stages (METHOD.md stages 7-8).

refine
  In:  manifest_noisy/ (all splits); edits/edits.parquet (sample_id, label, image,
       identity_similarity, gate_prediction, gate_accepted); the setting edit.gate.fallback.
  Out: refined/   the manifest with each edited training image the gate accepted replaced by
                  its edit: D' = (D minus H) union {(x_hat_i, y_i)}. Same labels, same splits;
                  added columns `is_edited` (bool), `image_original` (the replaced PNG, null
                  elsewhere) and `gate_rejected` (bool: the gate rejected this row's edit and it
                  kept its original image). An edit the gate rejected falls back by
                  edit.gate.fallback: `keep` keeps the original image (is_edited False,
                  gate_rejected True); `remove` drops the row from refined/ and lists it in
       refined/_removed.parquet  (sample_id, reason): the rows that left; its `_` keeps it out
                  of every reader of the manifest folder (pyarrow and Ray Data skip such files).
                  High-influence rows the edit stage quarantined keep their original image
                  (counted in the summary). Checked: refined train rows + removed rows == noisy
                  train rows, and no other split changes (nothing lost, nothing duplicated).
retrain
  In:  refined/; the train and evaluate sections (the baseline recipe, from scratch).
  Out: retrain/checkpoints/, retrain/evaluation/metrics.json + predictions.parquet (clean test).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from diffinf_ray.artifacts import edit_quarantine_rows, read_edits
from diffinf_ray.config import Config
from diffinf_ray.datasets import check_manifest, read_parquet, write_dataset
from diffinf_ray.run_root import RunRoot

REFINED = "refined"
REMOVED_TABLE = "_removed.parquet"
REMOVED_SCHEMA = pa.schema([("sample_id", pa.string()), ("reason", pa.string())])
EDIT_COLUMNS = ["sample_id", "label", "image", "identity_similarity", "gate_prediction",
                "gate_accepted"]


def refine_batch(batch: pd.DataFrame, edits: pd.DataFrame, fallback: str) -> pd.DataFrame:
    """One manifest batch refined (module docstring): `edits` indexed by sample_id with the
    edit's `image` and `gate_accepted`; `fallback` "remove" or "keep" for rejected edits."""
    ids = batch["sample_id"].astype(str)
    train = (batch["split"] == "train").to_numpy()
    known = ids.isin(edits.index).to_numpy() & train
    accepted = np.zeros(len(batch), dtype=bool)
    accepted[known] = edits.loc[ids[known], "gate_accepted"].to_numpy(bool)
    rejected = known & ~accepted
    batch["image_original"] = pd.Series([None] * len(batch), dtype=object, index=batch.index)
    if accepted.any():
        batch.loc[accepted, "image_original"] = batch.loc[accepted, "image"]
        batch.loc[accepted, "image"] = edits.loc[ids[accepted], "image"].to_numpy()
    batch["is_edited"] = accepted
    batch["gate_rejected"] = rejected
    if fallback == "remove":
        batch = batch[~rejected].reset_index(drop=True)
    return batch


def refined_table(batch: pd.DataFrame, edits: pd.DataFrame, fallback: str) -> pa.Table:
    """`refine_batch` as an Arrow table whose `image_original` is typed as `image` is, also in a
    batch without an accepted edit (all None there: Arrow would infer null), so that refined/'s
    files, one per batch, read back as one table."""
    table = pa.Table.from_pandas(refine_batch(batch, edits, fallback), preserve_index=False)
    i = table.schema.get_field_index("image_original")
    image_type = table.schema.field("image").type
    return table.set_column(i, "image_original", table.column(i).cast(image_type))


def _refine_remote(batch: pd.DataFrame, edits_ref, fallback: str) -> pa.Table:
    import ray

    return refined_table(batch, ray.get(edits_ref), fallback)


def removal_reasons(edits: pd.DataFrame, class_names: list[str],
                    min_identity: float | None) -> pd.DataFrame:
    """(sample_id, reason) of each edit the gate rejected: what the gate said."""
    rejected = edits[~edits["gate_accepted"].to_numpy(bool)]
    reasons = []
    for sid, row in rejected.iterrows():
        said = []
        if int(row["gate_prediction"]) != int(row["label"]):
            said.append(f"gate classifier predicts {_name(row['gate_prediction'], class_names)}, "
                        f"not the label {_name(row['label'], class_names)}")
        if min_identity is not None and not row["identity_similarity"] >= min_identity:
            said.append(f"identity_similarity {row['identity_similarity']:.3f} below "
                        f"edit.gate.min_identity {min_identity}")
        reasons.append((str(sid), "; ".join(said) or "rejected by the gate"))
    return pd.DataFrame(sorted(reasons), columns=["sample_id", "reason"])


def _name(label, class_names: list[str]) -> str:
    i = int(label)
    return class_names[i] if 0 <= i < len(class_names) else str(i)


def check_rows(root: RunRoot, out, removed: pd.DataFrame) -> tuple[int, pd.DataFrame]:
    """(noisy train rows, refined rows): a RuntimeError unless refined train rows + removed ==
    noisy train rows (the same sample_ids, none twice, none both kept and removed) and the other
    splits are unchanged."""
    before = root.noisy_manifest.read_table(columns=["sample_id", "split"]).to_pandas()
    after = out.read_table(columns=["sample_id", "split", "is_edited", "gate_rejected"]
                           ).to_pandas()
    n_before = int((before["split"] == "train").sum())
    n_after = int((after["split"] == "train").sum())
    gone = set(removed["sample_id"])
    kept = after["sample_id"].astype(str)
    train_before = set(before.loc[before["split"] == "train", "sample_id"].astype(str))
    if (n_after + len(removed) != n_before or len(after) + len(removed) != len(before)
            or kept.duplicated().any() or len(gone) != len(removed)
            or not gone <= train_before or gone & set(kept)
            or set(kept) | gone != set(before["sample_id"].astype(str))):
        raise RuntimeError(f"refine: {len(before)} rows ({n_before} train) in, {len(after)} "
                           f"({n_after} train) out and {len(removed)} removed")
    return n_before, after


def run_refine(cfg: Config, root: RunRoot) -> dict:
    import ray

    check_manifest(root.noisy_manifest, "refine", ("sample_id", "split", "image"))
    gate = cfg.edit.gate
    edits = read_edits(root, EDIT_COLUMNS).to_pandas()
    edits.index = edits.pop("sample_id").astype(str)
    out = root.child(REFINED)
    write_dataset(read_parquet(root.noisy_manifest).map_batches(
        _refine_remote, fn_kwargs={"edits_ref": ray.put(edits[["image", "gate_accepted"]]),
                                   "fallback": gate.fallback}, batch_format="pandas"), out)
    removed = (removal_reasons(edits, cfg.class_names, gate.min_identity)
               if gate.fallback == "remove" else pd.DataFrame(columns=["sample_id", "reason"]))
    out.child(REMOVED_TABLE).write_table(
        pa.Table.from_pandas(removed, schema=REMOVED_SCHEMA, preserve_index=False))
    n_before, after = check_rows(root, out, removed)
    return {"rows": len(after), "train_rows": int((after["split"] == "train").sum()),
            "noisy_train_rows": n_before,
            "edited_rows": int(np.asarray(after["is_edited"], bool).sum()),
            "gate_fallback": gate.fallback,
            "gate_rejected_removed": len(removed),
            "gate_rejected_kept_original": int(np.asarray(after["gate_rejected"], bool).sum()),
            "high_influence_kept_original": edit_quarantine_rows(root)}


def run_retrain(cfg: Config, root: RunRoot) -> dict:
    # here, not at the top: Ray Data workers import this module for `_refine_remote`
    from diffinf_ray.models.evaluation import PREDICT_COLUMNS, evaluate_checkpoints
    from diffinf_ray.models.training import TRAIN_COLUMNS, train_classifier

    refined = root.child(REFINED)
    check_manifest(refined, "retrain", TRAIN_COLUMNS + PREDICT_COLUMNS)
    out = root.child("retrain")
    train_classifier(cfg, refined, out.child("checkpoints"), len(cfg.class_names), tag="retrain")
    return evaluate_checkpoints(cfg, refined, out.child("checkpoints"), out.child("evaluation"))

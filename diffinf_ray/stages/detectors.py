"""Detector stages beside TracIn: cleanlab on K-fold out-of-sample probabilities, and the
removal baseline (retrain without the high-influence set).

cleanlab
  In:  manifest_noisy/ train rows; the train section (each fold's classifier is trained like
       the baseline, with Ray Train).
  Out: cleanlab/fold_k/checkpoints/, cleanlab/label_issues.parquet (sample_id, label,
       self_confidence, is_label_issue, is_corrupted), cleanlab/detection.json.
removal
  In:  manifest_noisy/, influence/influence.parquet (is_high).
  Out: removal/checkpoints/, removal/evaluation/metrics.json (clean test split).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from diffinf_ray.artifacts import high_influence_ids
from diffinf_ray.config import Config
from diffinf_ray.datasets import check_manifest
from diffinf_ray.detectors import detection_reports
from diffinf_ray.models.evaluation import PREDICT_COLUMNS, evaluate_checkpoints, predict_split
from diffinf_ray.models.training import TRAIN_COLUMNS, train_classifier
from diffinf_ray.run_root import RunRoot


def run_cleanlab(cfg: Config, root: RunRoot) -> dict:
    from cleanlab.filter import find_label_issues

    from diffinf_ray.influence.detection import precision_recall
    from diffinf_ray.models.checkpoint import list_checkpoints

    check_manifest(root.noisy_manifest, "cleanlab", TRAIN_COLUMNS + PREDICT_COLUMNS)
    out = root.child("cleanlab")
    num_classes = len(cfg.class_names)
    K = cfg.cleanlab.folds
    parts = []
    for k in range(K):
        checkpoints = out.child(f"fold_{k}", "checkpoints")
        train_classifier(cfg, root.noisy_manifest, checkpoints, num_classes, fold=(k, K, False))
        parts.append(predict_split(cfg, root.noisy_manifest, list_checkpoints(checkpoints)[-1],
                                   "train", fold=(k, K, True)))
    import pandas as pd

    df = pd.concat(parts).sort_values("sample_id", kind="stable").reset_index(drop=True)
    labels = df["label"].to_numpy(np.int64)
    probs = np.stack(df["probs"].to_numpy())
    issues = find_label_issues(labels, probs)  # cleanlab's defaults (prune_by_noise_rate)
    self_confidence = probs[np.arange(len(labels)), labels]
    out.child("label_issues.parquet").write_table(pa.table({
        "sample_id": df["sample_id"].astype(str), "label": labels.astype(np.int32),
        "self_confidence": self_confidence, "is_label_issue": issues,
        "is_corrupted": pa.array(df["is_corrupted"].tolist(), pa.bool_()),
    }))
    summary = {"folds": K, "train_rows": len(df), "label_issues": int(issues.sum())}
    detection = detection_reports(root, "cleanlab", cfg.influence.tau, cfg.influence.per_class)
    if "cleanlab" in detection:
        report = detection["cleanlab"]
        precision, recall = precision_recall(issues, df["is_corrupted"].to_numpy(bool))
        report["find_label_issues"] = {"n_flagged": int(issues.sum()), "precision": precision,
                                       "recall": recall}
        out.child("detection.json").write_json({"cleanlab": report})
        summary["cleanlab"] = {"precision": precision, "recall": recall, "auroc": report["auroc"],
                               "top_tau_precision": report["precision"],
                               "top_tau_recall": report["recall"]}
    return summary


def run_removal(cfg: Config, root: RunRoot) -> dict:
    check_manifest(root.noisy_manifest, "removal", TRAIN_COLUMNS + PREDICT_COLUMNS)
    flagged = high_influence_ids(root)
    out = root.child("removal")
    train_classifier(cfg, root.noisy_manifest, out.child("checkpoints"), len(cfg.class_names),
                     exclude_ids=flagged)
    return evaluate_checkpoints(cfg, root.noisy_manifest, out.child("checkpoints"),
                                out.child("evaluation"), extra={"removed_rows": len(flagged)})

"""Detector stages beside TracIn: cleanlab on K-fold out-of-sample probabilities, EK-FAC
second-order self-influence, and the removal baseline (retrain without the high-influence set).

cleanlab
  In:  manifest_noisy/ train rows; the train section (each fold's classifier is trained like
       the baseline, with Ray Train).
  Out: cleanlab/fold_k/checkpoints/, cleanlab/label_issues.parquet (sample_id, label,
       self_confidence, is_label_issue, is_corrupted), cleanlab/detection.json.
ekfac
  In:  manifest_noisy/ train rows; checkpoints/ (the last, or all with ekfac.checkpoint=all).
  Out: ekfac/ekfac.parquet (sample_id, label, is_corrupted, score, per_checkpoint: the
       lr-weighted terms, one for `last`), ekfac/detection.json.
removal
  In:  manifest_noisy/, influence/influence.parquet (is_high).
  Out: removal/checkpoints/, removal/evaluation/metrics.json (clean test split).
relabel (the oracle relabel: a control of issue 15's factorial, where the truth is known)
  In:  manifest_noisy/ (label, label_clean), influence/influence.parquet (is_high).
  Out: relabel/relabelled.parquet (sample_id, label: the assigned one, label_clean,
       is_corrupted) for every flagged row; relabel/checkpoints/, relabel/evaluation/metrics.json:
       the baseline recipe retrained with each flagged row's label set to its known clean
       label (only the flagged corrupted rows change; images and every other row as they were).
       What a perfect relabeller of the flagged set gives: beside removal (drop them) and the
       oracle repair (redraw their images), the third thing a treatment can do with them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from diffinf_ray.artifacts import high_influence_ids
from diffinf_ray.config import Config
from diffinf_ray.datasets import check_manifest, read_split
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
        train_classifier(cfg, root.noisy_manifest, checkpoints, num_classes, fold=(k, K, False),
                         tag=f"cleanlab:fold{k + 1}of{K}")
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


def run_ekfac(cfg: Config, root: RunRoot) -> dict:
    """EK-FAC self-influence of every training row (influence/ekfac.py) in ONE Ray task: the
    factors are a reduction over the whole split (covariances, then eigendecompositions) that
    one process holds, so there is nothing for an actor pool to share; a task, not the driver,
    so that on a cluster it runs where a GPU is (ekfac.use_gpu) and not on the head node. It
    reads the manifest and checkpoints itself; only the per-row scores come back."""
    import ray

    from diffinf_ray.influence.ekfac import score_training_split

    check_manifest(root.noisy_manifest, "ekfac", ("sample_id", "split", "image", "label",
                                                  "is_corrupted"))
    s = cfg.ekfac
    task = ray.remote(num_cpus=1, num_gpus=1 if s.use_gpu else 0)(score_training_split)
    df, used = ray.get(task.remote(
        root.noisy_manifest, root.checkpoints, checkpoint=s.checkpoint, strategy=s.strategy,
        damping=s.damping, batch_size=s.batch_size, fisher=s.fisher, layers=s.layers,
        seed=cfg.run.seed, device="cuda" if s.use_gpu else "cpu"))
    out = root.child("ekfac")
    out.child("ekfac.parquet").write_table(pa.table({
        "sample_id": df["sample_id"].astype(str), "label": df["label"].astype(np.int32),
        "is_corrupted": pa.array(df["is_corrupted"].tolist(), pa.bool_()),
        "score": df["score"].to_numpy(np.float64),
        "per_checkpoint": pa.array(df["per_checkpoint"].tolist(), pa.list_(pa.float64()))}))
    detection = detection_reports(root, "ekfac", cfg.influence.tau, cfg.influence.per_class)
    out.child("detection.json").write_json(detection)
    summary = {"train_rows": len(df), "strategy": s.strategy, **used}
    if "ekfac" in detection:
        summary["ekfac"] = {k: detection["ekfac"][k] for k in ("precision", "recall", "auroc")}
    return summary


def run_removal(cfg: Config, root: RunRoot) -> dict:
    check_manifest(root.noisy_manifest, "removal", TRAIN_COLUMNS + PREDICT_COLUMNS)
    flagged = high_influence_ids(root)
    out = root.child("removal")
    train_classifier(cfg, root.noisy_manifest, out.child("checkpoints"), len(cfg.class_names),
                     exclude_ids=flagged, tag="removal")
    return evaluate_checkpoints(cfg, root.noisy_manifest, out.child("checkpoints"),
                                out.child("evaluation"), extra={"removed_rows": len(flagged)})


RELABEL_COLUMNS = ("label_clean", "is_corrupted")


def oracle_relabelling(flagged_rows) -> dict[str, int]:
    """{sample_id: clean label} of the flagged rows whose assigned label is wrong, from a frame
    of the flagged train rows (sample_id, label, label_clean); an unknown truth is an error, as a
    relabel that silently kept a label would pass for one that fixed it."""
    unknown = flagged_rows["label_clean"].isna()
    if unknown.any():
        raise ValueError(f"relabel: {int(unknown.sum())} flagged rows have no known clean label "
                         f"(e.g. {flagged_rows['sample_id'][unknown].iloc[0]}); the oracle "
                         "relabel needs data whose truth is known (synthfaces, or injected noise)")
    clean = flagged_rows["label_clean"].astype(np.int64).to_numpy()
    wrong = clean != flagged_rows["label"].to_numpy(np.int64)
    return dict(zip(flagged_rows["sample_id"].astype(str)[wrong], clean[wrong].tolist(),
                    strict=True))


def run_relabel(cfg: Config, root: RunRoot) -> dict:
    check_manifest(root.noisy_manifest, "relabel",
                   TRAIN_COLUMNS + PREDICT_COLUMNS + RELABEL_COLUMNS)
    flagged = high_influence_ids(root)
    rows = read_split(root.noisy_manifest, "train", ["label", *RELABEL_COLUMNS], ids=flagged)
    relabel = oracle_relabelling(rows)
    out = root.child("relabel")
    out.child("relabelled.parquet").write_table(pa.table({
        "sample_id": rows["sample_id"].astype(str), "label": rows["label"].astype(np.int32),
        "label_clean": rows["label_clean"].astype(np.int32),
        "is_corrupted": rows["is_corrupted"].astype(bool)}))
    train_classifier(cfg, root.noisy_manifest, out.child("checkpoints"), len(cfg.class_names),
                     relabel=relabel, tag="relabel")
    return evaluate_checkpoints(cfg, root.noisy_manifest, out.child("checkpoints"),
                                out.child("evaluation"),
                                extra={"flagged_rows": len(flagged), "relabelled_rows": len(relabel)})

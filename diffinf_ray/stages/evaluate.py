"""Evaluate stage: the last checkpoint on the clean test split.

In:  manifest_noisy/ (test rows: sample_id, image, label_clean/label, group), checkpoints/.
Out: evaluation/predictions.parquet (sample_id, label, pred, probs, group) and
     evaluation/metrics.json (metrics.py: accuracy, macro OvR AUROC, linear kappa, ECE,
     per-class and per-group accuracy). Test labels are never noised; `label_clean` is used
     where known.
Predictions run as a Ray Data actor pool (models/evaluation.py: the model is loaded once per
actor; a GPU per actor when `train.use_gpu`).
"""

from __future__ import annotations

from diffinf_ray.config import Config
from diffinf_ray.datasets import check_manifest
from diffinf_ray.models.evaluation import PREDICT_COLUMNS, evaluate_checkpoints


def run_evaluate(cfg: Config, root) -> dict:
    """Pipeline entry: the train stage's last checkpoint on the clean test split."""
    check_manifest(root.noisy_manifest, "evaluate", PREDICT_COLUMNS)
    return evaluate_checkpoints(cfg, root.noisy_manifest, root.checkpoints, root.evaluation)

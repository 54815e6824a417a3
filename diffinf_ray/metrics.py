"""Classification metrics on the clean test split (compute core, no Ray).

accuracy, macro one-vs-rest AUROC (x100, as the paper reports it), Cohen's kappa with linear
weights, expected calibration error (equal-width confidence bins), per-class and per-group
accuracy. Checked against scikit-learn in tests/test_metrics.py.
"""

from __future__ import annotations

import numpy as np

# scikit-learn is imported where it is used: at module level it cost every Ray actor that loads
# a classifier (through models/evaluation.py) 2.5 s of start-up for metrics only the driver runs


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width bins of top-1 confidence."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right-closed bins, with confidence 0 in the first bin
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def macro_auroc(probs: np.ndarray, labels: np.ndarray) -> float | None:
    """Macro one-vs-rest AUROC x100; None when some class is absent from `labels`."""
    from sklearn.metrics import roc_auc_score

    num_classes = probs.shape[1]
    if len(np.unique(labels)) < num_classes:
        return None
    if num_classes == 2:
        return float(100 * roc_auc_score(labels, probs[:, 1]))
    return float(100 * roc_auc_score(labels, probs, multi_class="ovr", average="macro",
                                     labels=list(range(num_classes))))


def classification_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    groups: np.ndarray | None = None,
    ece_bins: int = 15,
) -> dict:
    """All evaluation metrics as a JSON-ready dict. `probs` (N, C) rows sum to 1."""
    from sklearn.metrics import cohen_kappa_score

    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0] or probs.shape[0] == 0:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} do not match (or are empty)")
    pred = probs.argmax(axis=1)
    correct = pred == labels
    out = {
        "n": int(len(labels)),
        "accuracy": float(100 * correct.mean()),
        "auroc_macro_ovr": macro_auroc(probs, labels),
        "kappa_linear": float(cohen_kappa_score(labels, pred, weights="linear",
                                                labels=list(range(len(class_names))))),
        "ece": expected_calibration_error(probs, labels, ece_bins),
        "per_class_accuracy": {
            name: (float(100 * correct[labels == c].mean()) if (labels == c).any() else None)
            for c, name in enumerate(class_names)
        },
    }
    if groups is not None:
        groups = np.asarray(groups).astype(str)
        out["per_group_accuracy"] = {
            g: float(100 * correct[groups == g].mean()) for g in sorted(set(groups.tolist()))
        }
    return out

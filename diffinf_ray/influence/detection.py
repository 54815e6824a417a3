"""How well a per-sample score finds the known corrupted (mislabelled) samples.

Plain arrays in, numbers out. Higher score = more suspicious. Rankings are deterministic: ties
in the score are broken by the lower sample index first.

- `flag_top_fraction(scores, tau)`: the high-influence set H, the top tau fraction of scores
  (round(tau * n) samples), optionally within each class.
- `precision_recall(flagged, is_corrupted)`, `auroc(scores, is_corrupted)`,
  `precision_at_k(scores, is_corrupted, ks)` and `detection_report`, all of them together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def _scores(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError(f"scores contain {int(np.isnan(s).sum())} NaN values")
    return s


def _mask(mask, n: int, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {m.shape}")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1)")
        m = m.astype(bool)
    return m


def ranking(scores) -> np.ndarray:
    """Sample indices from the highest score to the lowest; ties: lower index first."""
    s = _scores(scores)
    return np.lexsort((np.arange(s.size), -s))


def fraction_count(tau: float, n: int) -> int:
    """round(tau * n), halves rounded up: how many of n samples a fraction tau flags."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be a fraction in [0, 1], got {tau}")
    return min(n, int(math.floor(tau * n + 0.5 + 1e-9)))


def flag_top_fraction(scores, tau: float, labels=None, per_class: bool = False) -> np.ndarray:
    """Boolean mask of the top `tau` fraction of `scores` (round(tau * n) samples).

    per_class=True flags round(tau * n_c) samples within each class c of `labels`, so that every
    class keeps the same share of flagged samples.
    """
    s = _scores(scores)
    flagged = np.zeros(s.size, dtype=bool)
    if per_class:
        if labels is None:
            raise ValueError("per_class=True needs labels")
        y = np.asarray(labels)
        if y.shape != s.shape:
            raise ValueError(f"labels must have shape {s.shape}, got {y.shape}")
        for c in np.unique(y):
            members = np.flatnonzero(y == c)  # ascending, so ties stay index-ordered
            order = members[ranking(s[members])]
            flagged[order[: fraction_count(tau, members.size)]] = True
        return flagged
    flagged[ranking(s)[: fraction_count(tau, s.size)]] = True
    return flagged


def precision_recall(flagged, is_corrupted) -> tuple[float, float]:
    """(precision, recall) of a flagged mask against the truly corrupted mask.

    Precision is NaN when nothing is flagged, recall NaN when nothing is corrupted."""
    truth = np.asarray(is_corrupted)
    f = _mask(flagged, truth.size, "flagged")
    truth = _mask(truth, truth.size, "is_corrupted")
    hits = int((f & truth).sum())
    precision = hits / int(f.sum()) if f.any() else float("nan")
    recall = hits / int(truth.sum()) if truth.any() else float("nan")
    return precision, recall


def auroc(scores, is_corrupted) -> float:
    """Area under the ROC curve of the score for detecting corrupted samples (sklearn);
    NaN when only one of the two groups is present."""
    s = _scores(scores)
    truth = _mask(is_corrupted, s.size, "is_corrupted")
    if truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, s))


def precision_at_k(scores, is_corrupted, ks: Sequence[int]) -> np.ndarray:
    """Fraction of corrupted samples among the k highest scores, for each k in `ks`."""
    s = _scores(scores)
    truth = _mask(is_corrupted, s.size, "is_corrupted")
    hits = np.cumsum(truth[ranking(s)])
    out = []
    for k in ks:
        if not 1 <= int(k) <= s.size:
            raise ValueError(f"k must be in [1, {s.size}], got {k}")
        out.append(hits[int(k) - 1] / int(k))
    return np.asarray(out, dtype=np.float64)


def k_grid(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> np.ndarray:
    """Distinct k = max(1, round(f * n)) for each fraction f, ascending."""
    return np.unique([max(1, fraction_count(f, n)) for f in fractions])


def detection_report(scores, is_corrupted, tau: float = 0.1, labels=None,
                     per_class: bool = False, ks: Sequence[int] | None = None) -> dict:
    """All detection numbers for one score: the flagged set of `flag_top_fraction`, its
    precision/recall, the score's AUROC and a precision@k curve (default k grid: `k_grid`)."""
    s = _scores(scores)
    flagged = flag_top_fraction(s, tau, labels=labels, per_class=per_class)
    precision, recall = precision_recall(flagged, is_corrupted)
    ks = k_grid(s.size) if ks is None else np.asarray(ks, dtype=int)
    return {
        "n": int(s.size),
        "n_corrupted": int(_mask(is_corrupted, s.size, "is_corrupted").sum()),
        "tau": float(tau),
        "n_flagged": int(flagged.sum()),
        "precision": precision,
        "recall": recall,
        "auroc": auroc(s, is_corrupted),
        "precision_at_k": {"k": ks.tolist(), "precision": precision_at_k(s, is_corrupted, ks).tolist()},
    }

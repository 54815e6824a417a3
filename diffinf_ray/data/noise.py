"""Label noise on the training split (compute core, no Ray).

Symmetric noise at rate n changes exactly round(n * N_train) training labels, each to a
uniformly drawn *different* class; pair-flip noise sends class c to (c + 1) mod C (the usual
asymmetric benchmark). Validation, test and holdout rows are never touched. The choice depends
only on (seed, the set of training sample_ids), not on row order, so the same manifest always
gets the same noise however Ray Data ordered its blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NoisyLabels:
    label: np.ndarray  # int32, assigned labels after noise
    label_clean: np.ndarray  # int32, the labels before noise
    is_corrupted: np.ndarray  # bool


def inject_label_noise(
    sample_ids: np.ndarray,
    splits: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    rate: float,
    kind: str = "symmetric",
    seed: int = 0,
) -> NoisyLabels:
    """Noisy labels for the rows given (aligned with the inputs)."""
    labels = np.asarray(labels, dtype=np.int64)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}")
    if kind not in ("symmetric", "pairflip"):
        raise ValueError(f"unknown noise kind {kind!r} (symmetric or pairflip)")
    sample_ids = np.asarray(sample_ids).astype(str)
    if len(np.unique(sample_ids)) != len(sample_ids):
        raise ValueError("sample_id must be unique to inject noise reproducibly")

    train_rows = np.flatnonzero(np.asarray(splits) == "train")
    # Sort by id so the draw is independent of row order.
    train_rows = train_rows[np.argsort(sample_ids[train_rows], kind="stable")]
    n_flip = int(round(rate * len(train_rows)))
    rng = np.random.default_rng(seed)
    flipped = rng.permutation(train_rows)[:n_flip]

    noisy = labels.copy()
    if kind == "symmetric":
        offsets = rng.integers(1, num_classes, size=n_flip)  # never 0: always another class
        noisy[flipped] = (labels[flipped] + offsets) % num_classes
    else:
        noisy[flipped] = (labels[flipped] + 1) % num_classes
    corrupted = np.zeros(len(labels), dtype=bool)
    corrupted[flipped] = True
    return NoisyLabels(noisy.astype(np.int32), labels.astype(np.int32), corrupted)

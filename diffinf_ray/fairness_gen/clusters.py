"""k-means of a cell's semantic codes: one fine-tune per cluster, so that one model is not asked
to cover a group's whole variety (Basu et al., 2025).

Clustering runs on z standardised per dimension over the cell (k-means is scale-sensitive, and
z's dimensions have very different spreads). A cluster must hold `min_size` images (a fine-tune
and a z prior need a few): k is lowered until every cluster does, down to 1 (no split).
"""

from __future__ import annotations

import numpy as np


def cluster_codes(z: np.ndarray, k: int, seed: int = 0, min_size: int = 2) -> np.ndarray:
    """Cluster index (N,) in [0, k') of each code, k' <= k, clusters ordered by size
    (largest first) so indices are stable across runs with the same data and seed."""
    from sklearn.cluster import KMeans

    z = np.asarray(z, dtype=np.float64)
    n = len(z)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scaled = (z - z.mean(0)) / np.maximum(z.std(0), 1e-8)
    for kk in range(min(k, n // max(min_size, 1)), 1, -1):
        assign = KMeans(n_clusters=kk, n_init=10, random_state=seed).fit_predict(scaled)
        sizes = np.bincount(assign, minlength=kk)
        if sizes.min() >= min_size:
            order = np.argsort(-sizes, kind="stable")
            return np.argsort(order)[assign]
    return np.zeros(n, dtype=np.int64)

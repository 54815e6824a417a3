"""What a frozen representation carries: linear probes and identity retrieval on held-out people.

    probe_accuracy(train_x, train_y, test_x, test_y)   standardised features -> scikit-learn
                                                       LogisticRegression, test accuracy
    retrieval_top1(x, identity)                        nearest neighbour (cosine, standardised)
                                                       among the other images: same identity?

The caller splits by identity (no person in both train and test), so a probe measures what
generalises to new faces rather than memorised people. Used on z = E(x) and on raw pixels.
"""

from __future__ import annotations

import numpy as np


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean = train.mean(0, keepdims=True)
    std = train.std(0, keepdims=True) + 1e-6
    return [(a - mean) / std for a in (train, *others)]


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                   test_y: np.ndarray, *, c: float = 1.0, max_iter: int = 2000) -> float:
    """Accuracy on (test_x, test_y) of a multinomial logistic regression fit on the train set
    (features standardised with the train set's mean/std)."""
    from sklearn.linear_model import LogisticRegression

    train_s, test_s = _standardise(np.asarray(train_x, np.float64), np.asarray(test_x, np.float64))
    clf = LogisticRegression(C=c, max_iter=max_iter)
    clf.fit(train_s, np.asarray(train_y))
    return float((clf.predict(test_s) == np.asarray(test_y)).mean())


def retrieval_top1(x: np.ndarray, identity: np.ndarray, reference: np.ndarray | None = None) -> float:
    """Share of queries whose nearest other image (cosine similarity of features standardised
    with `reference`'s statistics, default `x`'s) shows the same person. Only images whose
    person has another image in `x` count as queries."""
    identity = np.asarray(identity)
    ref = np.asarray(x if reference is None else reference, np.float64)
    (feats,) = _standardise(ref, np.asarray(x, np.float64))[1:]
    feats = feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12)
    sim = feats @ feats.T
    np.fill_diagonal(sim, -np.inf)
    _, counts = np.unique(identity, return_counts=True)
    has_pair = np.isin(identity, np.unique(identity)[counts > 1])
    nearest = sim.argmax(1)
    hits = identity[nearest] == identity
    if not has_pair.any():
        raise ValueError("no person has two images: retrieval is undefined")
    return float(hits[has_pair].mean())

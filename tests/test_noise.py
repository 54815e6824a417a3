import numpy as np
import pytest

from diffinf_ray.data.noise import inject_label_noise


def make(n=1000, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.array([f"s{i:05d}" for i in range(n)])
    splits = rng.choice(["train", "val", "test"], size=n, p=[0.7, 0.15, 0.15])
    labels = rng.integers(0, classes, size=n)
    return ids, splits, labels


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.3, 0.333, 1.0])
def test_exact_count_train_only_different_class(rate):
    ids, splits, labels = make()
    out = inject_label_noise(ids, splits, labels, 4, rate, "symmetric", seed=1)
    train = splits == "train"
    assert out.is_corrupted.sum() == round(rate * train.sum())
    assert not out.is_corrupted[~train].any()
    assert (out.label[~train] == labels[~train]).all()
    changed = out.label != labels
    assert (changed == out.is_corrupted).all()  # every corrupted label is a different class
    assert (out.label_clean == labels).all()


def test_symmetric_targets_are_uniform_over_other_classes():
    ids, splits, labels = make(n=20000)
    out = inject_label_noise(ids, splits, labels, 4, 0.5, "symmetric", seed=3)
    offsets = (out.label - labels)[out.is_corrupted] % 4
    counts = np.bincount(offsets, minlength=4)
    assert counts[0] == 0
    assert counts[1:].min() / counts[1:].max() > 0.9


def test_pairflip():
    ids, splits, labels = make()
    out = inject_label_noise(ids, splits, labels, 4, 0.2, "pairflip", seed=0)
    c = out.is_corrupted
    assert (out.label[c] == (labels[c] + 1) % 4).all()


def test_seeded_and_order_independent():
    ids, splits, labels = make()
    a = inject_label_noise(ids, splits, labels, 4, 0.3, seed=5)
    perm = np.random.default_rng(0).permutation(len(ids))
    b = inject_label_noise(ids[perm], splits[perm], labels[perm], 4, 0.3, seed=5)
    assert (a.label[perm] == b.label).all()
    c = inject_label_noise(ids, splits, labels, 4, 0.3, seed=6)
    assert (a.is_corrupted != c.is_corrupted).any()


def test_bad_input():
    ids, splits, labels = make(n=10)
    with pytest.raises(ValueError, match="rate"):
        inject_label_noise(ids, splits, labels, 4, 1.5)
    with pytest.raises(ValueError, match="labels must be"):
        inject_label_noise(ids, splits, labels + 10, 4, 0.1)
    with pytest.raises(ValueError, match="unique"):
        inject_label_noise(np.array(["a"] * 10), splits, labels, 4, 0.1)

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score, roc_auc_score

from diffinf_ray.metrics import classification_metrics, expected_calibration_error


def fixed_inputs(n=300, c=3, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c))
    labels = rng.integers(0, c, size=n)
    logits[np.arange(n), labels] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


def test_metrics_equal_sklearn():
    probs, labels = fixed_inputs()
    pred = probs.argmax(1)
    groups = np.where(np.arange(len(labels)) % 2 == 0, "a", "b")
    m = classification_metrics(probs, labels, ["x", "y", "z"], groups)
    assert m["accuracy"] == pytest.approx(100 * accuracy_score(labels, pred))
    assert m["auroc_macro_ovr"] == pytest.approx(100 * roc_auc_score(labels, probs, multi_class="ovr"))
    assert m["kappa_linear"] == pytest.approx(cohen_kappa_score(labels, pred, weights="linear"))
    for c, name in enumerate("xyz"):
        assert m["per_class_accuracy"][name] == pytest.approx(100 * accuracy_score(labels[labels == c], pred[labels == c]))
    assert m["per_group_accuracy"]["b"] == pytest.approx(100 * accuracy_score(labels[1::2], pred[1::2]))


def test_ece_matches_direct_definition():
    probs, labels = fixed_inputs(n=1000, seed=1)
    conf, pred = probs.max(1), probs.argmax(1)
    ece = 0.0
    for lo, hi in zip(np.linspace(0, 1, 11)[:-1], np.linspace(0, 1, 11)[1:], strict=True):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs((pred[sel] == labels[sel]).mean() - conf[sel].mean())
    assert expected_calibration_error(probs, labels, 10) == pytest.approx(ece)


def test_perfect_and_missing_class():
    labels = np.array([0, 1, 1, 0])
    probs = np.eye(3)[labels]
    m = classification_metrics(probs, labels, ["a", "b", "c"])
    assert m["accuracy"] == 100 and m["kappa_linear"] == pytest.approx(1.0)
    assert m["auroc_macro_ovr"] is None  # class "c" absent: undefined, not a made-up number
    assert m["per_class_accuracy"]["c"] is None


def test_shape_mismatch():
    with pytest.raises(ValueError):
        classification_metrics(np.ones((3, 2)) / 2, np.array([0, 1]), ["a", "b"])

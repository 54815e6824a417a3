"""Best-validation model selection (models/checkpoint.best_validation_checkpoint) and the
predictor that scores the best-validation checkpoint beside the last one in one pass
(models/evaluation.Predictor with `second_uri`). On real Ray: tests/test_pipeline_ray.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffinf_ray.data.images import encode_png
from diffinf_ray.models.checkpoint import (
    CHECKPOINT_FILE,
    EPOCH_METRICS_FILE,
    best_validation_checkpoint,
    checkpoint_dir_name,
    classifier_payload,
    to_bytes,
)
from diffinf_ray.models.classifier import build_classifier
from diffinf_ray.models.evaluation import Predictor
from diffinf_ray.storage import Location

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_checkpoints(folder, val_accuracies, figures=True) -> list[Location]:
    found = []
    for epoch, val in enumerate(val_accuracies, start=1):
        torch.manual_seed(epoch)
        d = folder / checkpoint_dir_name(epoch)
        d.mkdir(parents=True)
        (d / CHECKPOINT_FILE).write_bytes(to_bytes(classifier_payload(
            [build_classifier(3, 8)], epoch, 1e-3)))
        if figures:
            (d / EPOCH_METRICS_FILE).write_text(json.dumps({"epoch": epoch, "val_accuracy": val}))
        found.append(Location(str(d / CHECKPOINT_FILE)))
    return found


def test_best_validation_checkpoint_is_the_highest_val_accuracy_earliest_on_ties(tmp_path):
    found = write_checkpoints(tmp_path / "a", [40.0, 55.0, 50.0, 55.0])
    best, figures = best_validation_checkpoint(found)
    assert best.path == found[1].path and figures == {"epoch": 2, "val_accuracy": 55.0}
    old = write_checkpoints(tmp_path / "b", [40.0, 55.0], figures=False)
    assert best_validation_checkpoint(old) is None  # saved before the figures were kept
    assert best_validation_checkpoint([]) is None


def test_predictor_with_a_second_checkpoint_gives_both_checkpoints_probabilities_in_one_pass(tmp_path):
    last, second = write_checkpoints(tmp_path, [1.0, 2.0])
    rng = np.random.default_rng(0)
    images = np.array([encode_png(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
                       for _ in range(5)], dtype=object)
    batch = {"sample_id": np.array([f"s{i}" for i in range(5)]), "image": images,
             "label": np.zeros(5, np.int32)}
    both = Predictor(last.uri, None, False, second_uri=second.uri)(dict(batch))
    alone = Predictor(last.uri, None, False)(dict(batch))
    other = Predictor(second.uri, None, False)(dict(batch))
    np.testing.assert_allclose(both["probs"], alone["probs"], rtol=1e-6)
    np.testing.assert_allclose(both["probs_second"], other["probs"], rtol=1e-6)
    assert not np.allclose(both["probs"], both["probs_second"])  # two different networks

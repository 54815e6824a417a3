"""Train stage: fit the classifier with Ray Train and keep its checkpoints in the run root.

Columns in (manifest_noisy/): sample_id, split, label (assigned), image.
Out: <run root>/checkpoints/epoch_NNNN/checkpoint.pt every `train.checkpoint_every` epochs and
at the last epoch (weights, optimizer, epoch, learning rate in force; models/checkpoint.py).

Resume: Ray Train V2 restores a run from `(storage_path, name)`; the loop then continues from
the latest checkpoint's epoch. The same loop (models/training.py) trains the removal baseline
and the refined set, on another `checkpoints` folder.
"""

from __future__ import annotations

from diffinf_ray.config import Config
from diffinf_ray.datasets import check_manifest
from diffinf_ray.models.training import TRAIN_COLUMNS, train_classifier


def run_train(cfg: Config, root) -> dict:
    """Pipeline entry: the classifier on the noisy manifest's train split."""
    check_manifest(root.noisy_manifest, "train", TRAIN_COLUMNS)
    return train_classifier(cfg, root.noisy_manifest, root.checkpoints, len(cfg.class_names))

"""The Ray-free training loop of the fairness methods, and prediction.

In:  rows with `image` (PNG bytes), `label` (int) and `group` (name); the group names in a
     fixed order (`group_names`) define the group index a method sees.
Out: a trained method (its `eval_model()` predicts) and the per-epoch training metrics.

The loop is baselines/base.py's epoch contract (`run_epoch`) over in-memory tensors: shuffled
batches (or, for `upsample`, `balanced_epoch`'s rows) with the harness's flip augmentation and
learning-rate schedule (models/harness.py), so a cell trained here and one trained through Ray
Train (ray_train.py) run the same method code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffinf_ray.baselines.base import run_epoch
from diffinf_ray.config import TrainSection
from diffinf_ray.data.images import to_tensor_batch
from diffinf_ray.fairness.reweighting import balanced_epoch
from diffinf_ray.models.harness import learning_rate_at, random_hflip


def group_names(groups: Sequence[str]) -> list[str]:
    """The sorted distinct group names (a group's index is its position)."""
    return sorted({str(g) for g in groups})


def group_index(groups: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """int64 index of each row's group in `names`; an unknown group is a ValueError."""
    lookup = {n: i for i, n in enumerate(names)}
    missing = sorted({str(g) for g in groups} - set(lookup))
    if missing:
        raise ValueError(f"groups {missing} are not among the training groups {list(names)}")
    return np.asarray([lookup[str(g)] for g in groups], dtype=np.int64)


def decode_images(pngs: Sequence[bytes]) -> torch.Tensor:
    """PNG bytes -> float32 (N, 3, H, W) in [-1, 1] (the classifier's input)."""
    return torch.from_numpy(to_tensor_batch(list(pngs)))


def _epoch_rows(n: int, groups: np.ndarray, upsample: bool, rng: np.random.Generator):
    return balanced_epoch(groups, rng) if upsample else rng.permutation(n)


def fit_local(method, images: torch.Tensor, labels: np.ndarray, groups: np.ndarray,
              train: TrainSection, seed: int, first_epoch: int = 1) -> list[dict]:
    """Train `method` for epochs first_epoch..train.epochs on the given tensors (groups: int64
    indices); returns each epoch's metrics {epoch, learning_rate, loss, accuracy}."""
    labels_t = torch.as_tensor(np.array(labels, dtype=np.int64))  # a copy: may be read-only
    groups_t = torch.as_tensor(np.asarray(groups), dtype=torch.int64)
    upsample = bool(getattr(method, "upsample", False))
    history = []
    for epoch in range(first_epoch, train.epochs + 1):
        torch.manual_seed(seed + 1000 * epoch)
        rng = np.random.default_rng([seed, epoch])
        rows = torch.as_tensor(_epoch_rows(len(labels_t), np.asarray(groups), upsample, rng))
        lr = learning_rate_at(train, epoch)
        method.set_lr(lr)

        def batches(rows=rows):
            for start in range(0, len(rows), train.batch_size):
                idx = rows[start:start + train.batch_size]
                if len(idx) < 2:  # BatchNorm cannot train on one sample
                    continue
                x = images[idx]
                yield {"image": random_hflip(x) if train.augment else x,
                       "label": labels_t[idx], "group": groups_t[idx], "index": idx}

        metrics = run_epoch(method, batches, epoch)
        history.append({"epoch": epoch, "learning_rate": lr, **metrics})
    return history


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Predicted class of each image (model in eval mode)."""
    model.eval()
    out = [model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)]
    return torch.cat(out).cpu().numpy() if out else np.zeros(0, dtype=np.int64)

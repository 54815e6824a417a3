"""ERM, group reweighting and group upsampling: the simple baselines of the fairness comparison.

- `erm`: mean cross-entropy (the groups are read, not used);
- `reweight`: each sample's loss weighted by w_g = N / (G n_g), inverse to its group's training
  frequency (mean weight over the training set 1); the batch loss is mean_i(w_i loss_i), an
  unbiased estimate of the group-balanced loss;
- `upsample`: ERM's loss on an epoch drawn by `balanced_epoch`: every group's rows, plus
  draws with replacement from the group until each group has as many rows as the largest one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffinf_ray.fairness.group_dro import GroupMethodBase


def inverse_frequency_weights(group_counts: Sequence[int]) -> np.ndarray:
    """w_g = N / (G n_g) for the G groups' training counts n_g (N = sum n_g); a group without
    samples gets weight 0 (it contributes no loss)."""
    counts = np.asarray(group_counts, dtype=np.float64)
    total, present = counts.sum(), counts > 0
    weights = np.zeros_like(counts)
    weights[present] = total / (present.sum() * counts[present])
    return weights


def balanced_epoch(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one upsampled epoch, shuffled: every row once, plus rows drawn with
    replacement from each smaller group up to the largest group's size."""
    groups = np.asarray(groups)
    names, counts = np.unique(groups, return_counts=True)
    target = counts.max()
    parts = []
    for name, count in zip(names, counts, strict=True):
        rows = np.flatnonzero(groups == name)
        parts += [rows, rng.choice(rows, size=target - count, replace=True)]
    out = np.concatenate(parts)
    rng.shuffle(out)
    return out


class GroupERM(GroupMethodBase):
    name = "erm"


class GroupUpsampled(GroupMethodBase):
    """ERM's loss; the runner draws its epochs with `balanced_epoch` (`upsample = True`)."""

    name = "upsample"
    upsample = True


class GroupReweighted(GroupMethodBase):
    name = "reweight"

    def __init__(self, num_classes, group_counts, cfg, model_factory, lr):
        super().__init__(num_classes, group_counts, cfg, model_factory, lr)
        self.weights = torch.as_tensor(inverse_frequency_weights(group_counts),
                                       dtype=torch.float32)

    def _loss(self, per_sample, groups):
        return (self.weights[groups] * per_sample).mean()

"""`standard`: plain cross-entropy on the assigned labels, one network (the noisy baseline).

It is the same recipe as `models/training.py` behind the common method interface, so that every
comparison in METHOD.md stage 9 goes through one training loop. No method-specific keys.
"""

from __future__ import annotations

import torch.nn.functional as F

from diffinf_ray.baselines.base import Batch, MethodBase


class Standard(MethodBase):
    name = "standard"

    def __init__(self, num_classes, num_samples, cfg, model_factory, lr):
        super().__init__(num_classes, num_samples, cfg, model_factory, lr)
        self.net = model_factory()
        self._nets = [self.net]
        self._optimizers = [self._make_optimizer(self.net.parameters())]

    def training_step(self, batch: Batch, epoch: int, step: int) -> dict[str, float]:
        x, y = self._xy(batch)
        self.net.train()
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        return self._single_step(loss, logits, y)

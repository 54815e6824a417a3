"""`proselflc`: progressive self label correction (Wang, Hua, Kodirov, Clifton & Robertson,
CVPR 2021, "ProSelfLC: Progressive Self Label Correction for Training Robust Deep Neural
Networks"; code XinshaoAmosWang/ProSelfLC-AT, `src/proselflc/slices/losses/proselflc.py`).

One network; the loss is cross-entropy against a corrected target
    q~ = (1 - eps) y + eps p,      eps = g(t) * l(p),
    global trust   g(t) = 1 / (1 + exp(-B (t / T - Gamma)))   (logistic in training progress),
    local trust    l(p) = 1 - H(p) / H(u),   H the entropy, u the uniform distribution,
so a confident (low-entropy) prediction late in training overrides its given label. eps is
computed without gradient; the target keeps the prediction p as produced (no detach), exactly
as the official loss does: the gradient then carries an extra eps-weighted entropy-minimising
term (the paper's "low-entropy state"); `detach_target=True` treats q~ as a constant instead.
During the burn-in epochs (epoch <= burn_in_epochs) eps = 0: plain cross-entropy.

Time. With `steps_per_epoch` the counter is the iteration (the official default,
t = (epoch - 1) * steps_per_epoch + step + 1, T = epochs * steps_per_epoch); without it, the
epoch (t = epoch, T = epochs).

Defaults and sources:
- exp_base B = 6: the official ProSelfLC-AT run (params.csv: exp_base 6, CIFAR-100, sym 0.2);
- transit_time_ratio Gamma = 0.5: the CVPR paper's g(t) = h(t/T - 0.5, B) (the AT run used 0.3);
- burn_in_epochs: project choice, max(1, epochs // 10) when not given (the logistic g is
  already small early on, g(0) = 0.047 for B = 6, but not 0; the burn-in makes it exactly 0);
- epochs: required (the total T); steps_per_epoch: None (epoch counter);
- detach_target: False (official code).
Uses log_softmax for log p (the official code uses log(p + 1e-6)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffinf_ray.baselines.base import Batch, MethodBase, MethodError


def global_trust(progress: float, exp_base: float, transit: float) -> float:
    """g = 1 / (1 + exp(-B (progress - Gamma)))."""
    return 1.0 / (1.0 + math.exp(-exp_base * (progress - transit)))


def local_trust(probs: torch.Tensor) -> torch.Tensor:
    """l(p) = 1 - H(p) / log(K), per row; 1 for a one-hot p, 0 for the uniform p."""
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=1)
    return 1.0 - entropy / math.log(probs.shape[1])


class ProSelfLC(MethodBase):
    name = "proselflc"

    def __init__(self, num_classes, num_samples, cfg, model_factory, lr):
        super().__init__(num_classes, num_samples, cfg, model_factory, lr)
        self.epochs = int(self._required("epochs"))
        if self.epochs < 1:
            raise MethodError(f"proselflc: epochs must be positive, got {self.epochs}")
        burn = self.config["burn_in_epochs"]
        self.burn_in_epochs = max(1, self.epochs // 10) if burn is None else int(burn)
        self.config["burn_in_epochs"] = self.burn_in_epochs
        if not self.config["exp_base"] >= 0:
            raise MethodError("proselflc: exp_base must be >= 0")
        self.net = model_factory()
        self._nets = [self.net]
        self._optimizers = [self._make_optimizer(self.net.parameters())]

    def progress(self, epoch: int, step: int) -> float:
        """t / T in [0, 1]."""
        if not 1 <= epoch <= self.epochs:
            raise MethodError(f"proselflc: epoch {epoch} outside 1..{self.epochs}")
        spe = self.config["steps_per_epoch"]
        if spe:
            return min(((epoch - 1) * spe + step + 1) / (self.epochs * spe), 1.0)
        return epoch / self.epochs

    def epsilon(self, probs: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """Per-sample eps (no gradient); zeros during the burn-in."""
        with torch.no_grad():
            if epoch <= self.burn_in_epochs:
                return torch.zeros(probs.shape[0], device=probs.device)
            g = global_trust(self.progress(epoch, step), float(self.config["exp_base"]),
                             float(self.config["transit_time_ratio"]))
            return g * local_trust(probs.detach())

    def training_step(self, batch: Batch, epoch: int, step: int) -> dict[str, float]:
        x, y = self._xy(batch)
        self.net.train()
        logits = self.net(x)
        log_p = F.log_softmax(logits, dim=1)
        p = log_p.exp()
        eps = self.epsilon(p, epoch, step)[:, None]
        p_target = p.detach() if self.config["detach_target"] else p
        target = (1 - eps) * F.one_hot(y, self.num_classes).float() + eps * p_target
        loss = -(target * log_p).sum(dim=1).mean()
        return {**self._single_step(loss, logits, y), "epsilon_mean": float(eps.mean())}

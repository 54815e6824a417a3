"""`elr_plus`: ELR+ (Liu, Niles-Weed, Razavian & Fernandez-Granda, NeurIPS 2020, "Early-Learning
Regularization Prevents Memorization of Noisy Labels"; code shengliu66/ELR, `ELR_plus/`).

ELR regulariser. With p_i = clamp(softmax(z_i), 1e-4, 1 - 1e-4) and a per-sample target t_i,
    R = mean_i log(1 - <t_i, p_i>),
added with weight lambda to the cross-entropy. Its gradient w.r.t. the logits is
    dR_i/dz_ij = -p_ij (t_ij - <t_i, p_i>) / (1 - <t_i, p_i>)
(within the clamp): it pulls p_i towards the target t_i, i.e. towards what the network
predicted early in training, which counters the cross-entropy gradient of a memorised wrong
label. The targets t are constants (no gradient).

ELR+ (as in `ELR_plus/trainer/trainer.py`, `model/loss.py`), per batch and for each of the two
networks k in {1, 2} with its weight-averaged (EMA) copy:
1. mixup: lambda ~ Beta(alpha, alpha), lambda = max(lambda, 1 - lambda), a random permutation;
   inputs and one-hot labels are mixed;
2. temporal ensembling of the PEER's EMA network on the un-mixed inputs:
   t_i <- beta t_i + (1 - beta) p_peer_ema(x_i) for the batch's samples (t starts at 0), and
   the targets are mixed with the same lambda and permutation;
3. loss = mean(-sum y_mix log softmax(z)) + ramp(step) * lambda_elr * R(z, t_mix);
4. optimiser step, then EMA update of the network's own copy with decay
   ema_alpha * sigmoid_rampup(step + 1, ema_step) (parameters only; the EMA copies run in train
   mode like the repo's, so their batch-norm statistics are their own).
Test-time prediction: the mean of the two networks' logits (the repo's `_test_epoch`).

Defaults and sources (`ELR_plus/config_cifar10.json`, INFLUENCE_NOTES 5.2):
- beta 0.7 (temporal-ensembling momentum) and lam 3.0 (regulariser weight): the CIFAR-10
  symmetric-noise values (the README: lambda needs tuning, beta is robust in 0.7-0.99; CIFAR-100
  uses beta 0.9, lambda 7);
- mixup_alpha 1.0; ema_alpha 0.997; ema_step 40000 (EMA decay ramp length in steps);
- coef_step 0 (ramp length of lambda in steps; 0 = full weight from the start);
- clamp 1e-4 (probability clamp in R).
The papers' SGD (lr 0.02, momentum 0.9, wd 5e-4, 200 epochs) is replaced by the project's
optimiser unless configured (base.py). With few steps per epoch, `ema_step` = 40000 keeps the
EMA decay near 0 (EMA = current weights) for the whole run; scale it to the run length if an
averaged teacher is wanted (e.g. ~40 % of the total steps, as in the CIFAR-10 run).

Differences from the repo (documented, deliberate):
- both networks train on the same batch, one after the other (the repo runs a whole epoch of
  network 1, with its own data order, before network 2's epoch);
- the EMA copies start as copies of their networks (the repo initialises them independently at
  random; with the decay ramp they converge to the network within the first steps either way);
- no CIFAR-100 label re-weighting (`y_labeled * q` for 100 classes) and no warm-up (CIFAR-10
  config: warmup 0).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from diffinf_ray.baselines.base import (
    Batch,
    LogitAverage,
    MethodBase,
    ema_update,
    mixup_coefficient,
    sigmoid_rampup,
    soft_cross_entropy,
)


def elr_regularizer(logits: torch.Tensor, targets: torch.Tensor, clamp: float = 1e-4) -> torch.Tensor:
    """Per-sample log(1 - <t_i, clamp(softmax(z_i))>), shape (B,); `targets` get no gradient."""
    probs = torch.clamp(F.softmax(logits, dim=1), clamp, 1.0 - clamp)
    return torch.log(1.0 - (targets.detach() * probs).sum(dim=1))


class ELRPlus(MethodBase):
    name = "elr_plus"

    def __init__(self, num_classes, num_samples, cfg, model_factory, lr):
        super().__init__(num_classes, num_samples, cfg, model_factory, lr)
        self.net1, self.net2 = model_factory(), model_factory()
        self.ema1, self.ema2 = copy.deepcopy(self.net1), copy.deepcopy(self.net2)
        for ema in (self.ema1, self.ema2):
            for p in ema.parameters():
                p.requires_grad_(False)
        self._nets = [self.net1, self.net2]
        self._extra_modules = [self.ema1, self.ema2]
        self._optimizers = [self._make_optimizer(n.parameters()) for n in self._nets]
        # per-sample temporal-ensembling targets, one table per network (the repo's pred_hist)
        self.targets = [torch.zeros(num_samples, num_classes) for _ in range(2)]
        self.global_step = 0
        self._eval = LogitAverage(self._nets)

    def _one_network_step(self, k: int, x, y_onehot, idx, step: int) -> torch.Tensor:
        c = self.config
        net, ema_own, ema_peer = self._nets[k], self._extra_modules[k], self._extra_modules[1 - k]
        opt, table = self._optimizers[k], self.targets[k]
        net.train()
        ema_own.train()
        ema_peer.train()
        if c["mixup_alpha"] > 0:
            lam = mixup_coefficient(c["mixup_alpha"])
            perm = torch.randperm(x.shape[0]).to(x.device)
        else:
            lam, perm = 1.0, torch.arange(x.shape[0], device=x.device)
        x_mix = lam * x + (1 - lam) * x[perm]
        y_mix = lam * y_onehot + (1 - lam) * y_onehot[perm]
        logits = net(x_mix)
        with torch.no_grad():
            p_peer = F.softmax(ema_peer(x), dim=1)
            p_peer = p_peer / p_peer.sum(dim=1, keepdim=True)
            table[idx] = c["beta"] * table[idx] + (1 - c["beta"]) * p_peer
            t_batch = table[idx]
            t_mix = lam * t_batch + (1 - lam) * t_batch[perm]
        ce = soft_cross_entropy(logits, y_mix).mean()
        reg = elr_regularizer(logits, t_mix, c["clamp"]).mean()
        loss = ce + sigmoid_rampup(step, c["coef_step"]) * c["lam"] * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = sigmoid_rampup(step + 1, c["ema_step"]) * c["ema_alpha"]
        ema_update(net, ema_own, decay)
        return loss.detach()

    def training_step(self, batch: Batch, epoch: int, step: int) -> dict[str, float]:
        x, y = self._xy(batch)
        idx = self._index(batch)
        y_onehot = F.one_hot(y, self.num_classes).float()
        global_step = self.global_step + 1  # the repo's global_step + local_step (1-based)
        losses = [self._one_network_step(k, x, y_onehot, idx, global_step) for k in (0, 1)]
        self.global_step = global_step
        # how often the ensembled target already disagrees with the given label (ELR's detector)
        disagree = (self.targets[0][idx].argmax(1) != y).float().mean()
        return {"loss": float(torch.stack(losses).mean()), "target_disagreement": float(disagree)}

    def eval_model(self):
        return self._eval

    def _extra_state(self):
        return {"targets": [t.clone() for t in self.targets], "global_step": self.global_step}

    def _load_extra_state(self, state):
        self.targets = [t.clone().to(self.device) for t in state["targets"]]
        self.global_step = int(state["global_step"])

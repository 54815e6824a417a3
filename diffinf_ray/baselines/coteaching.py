"""`small_loss`: Co-teaching (Han et al., NeurIPS 2018; code bhanML/Co-teaching, `loss.py`,
`main.py`).

Two networks see the same mini-batch. Each ranks the batch by its own per-sample cross-entropy
and keeps its R(T) share of smallest-loss samples; each network is then updated on the samples
its PEER kept ("cross-update"), so the two filter each other's errors.

Schedule. The forget rate after T completed epochs is
    forget(T) = tau * min(T / T_k, 1) ** c,    R(T) = 1 - forget(T)   (the kept share)
which is the paper's R(T) = 1 - min(T tau / T_k, tau) for c = 1. Epochs here are 1-based, so
T = epoch - 1: the first epoch keeps everything and the full rate tau is reached after T_k
epochs. Per batch of B samples, ceil(R(T) * B) samples are kept (at least 1).

Defaults and sources:
- forget_rate tau: the noise-rate estimate (the repo's `--forget_rate` defaults to the noise
  rate); give `forget_rate`, or `noise_rate` and it is used as tau. Required.
- num_gradual T_k = 10 epochs, exponent c = 1 (repo `--num_gradual 10`, `--exponent 1`).
- co_teaching = True (two networks, cross-update). False gives the single-network small-loss
  selection (a network trains on its own small-loss share, MentorNet/self-paced style).
- eval_net = "net1": the repo reports both networks; network 1 is evaluated here ("mean"
  averages the two networks' logits instead).

Differences from the repo (documented, deliberate):
- kept count: ceil(R(T) * B) instead of the repo's int(R(T) * B) (floor): one sample more
  whenever R(T) * B is not an integer, and a batch never keeps 0 samples.
- the update loss is the mean CE over the kept samples; the repo divides that mean again by the
  kept count (`torch.sum(mean) / num_remember`), which only rescales the step (Adam is nearly
  invariant to it).
- the repo's schedule is `linspace(0, tau ** c, T_k)` indexed by its 0-based epoch; the paper's
  formula above is used instead (same end points up to one epoch).
- ties in the loss are broken by batch position (stable sort), so selection is deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffinf_ray.baselines.base import Batch, LogitAverage, MethodBase, MethodError, ceil_count


def forget_rate(epoch: int, tau: float, num_gradual: int, exponent: float = 1.0) -> float:
    """tau * min((epoch - 1) / T_k, 1) ** c for 1-based `epoch` (the share of a batch dropped)."""
    if epoch < 1:
        raise MethodError(f"epochs are 1-based, got {epoch}")
    done = epoch - 1
    ramp = 1.0 if num_gradual <= 0 else min(done / num_gradual, 1.0)
    return float(tau * ramp ** exponent)


def keep_count(batch_size: int, rate: float) -> int:
    """ceil((1 - forget rate) * B) samples kept of a batch of B, at least 1 (0 for B = 0)."""
    if batch_size == 0:
        return 0
    return min(batch_size, max(1, ceil_count(1.0 - rate, batch_size)))


def small_loss_indices(losses: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest losses (ties: lower position first)."""
    order = torch.sort(losses.detach(), stable=True).indices
    return order[:k]


class CoTeaching(MethodBase):
    name = "small_loss"

    @classmethod
    def run_options(cls, given, epochs, noise_rate):
        if given.get("forget_rate") is not None or given.get("noise_rate") is not None:
            return given, []
        # the Co-teaching repo's default forget rate is the noise rate; here it is known
        warnings = [] if noise_rate != 0 else [
            "small_loss: noise.rate is 0, so Co-teaching forgets nothing; set "
            "baselines.options.small_loss.forget_rate for data with real noise"]
        return {**given, "noise_rate": noise_rate}, warnings

    def __init__(self, num_classes, num_samples, cfg, model_factory, lr):
        super().__init__(num_classes, num_samples, cfg, model_factory, lr)
        c = self.config
        tau = c["forget_rate"] if c["forget_rate"] is not None else c["noise_rate"]
        if tau is None:
            raise MethodError("small_loss: set forget_rate (or noise_rate, used as the forget rate)")
        if not 0.0 <= float(tau) < 1.0:
            raise MethodError(f"small_loss: forget rate must be in [0, 1), got {tau}")
        if c["eval_net"] not in ("net1", "mean"):
            raise MethodError(f"small_loss: eval_net must be 'net1' or 'mean', got {c['eval_net']!r}")
        self.tau = float(tau)
        self.net1 = model_factory()
        self._nets = [self.net1]
        if c["co_teaching"]:
            self.net2 = model_factory()
            self._nets.append(self.net2)
        self._optimizers = [self._make_optimizer(n.parameters()) for n in self._nets]
        self._eval = (LogitAverage(self._nets) if c["eval_net"] == "mean" and len(self._nets) == 2
                      else self.net1)

    def forget_rate(self, epoch: int) -> float:
        return forget_rate(epoch, self.tau, int(self.config["num_gradual"]),
                           float(self.config["exponent"]))

    def training_step(self, batch: Batch, epoch: int, step: int) -> dict[str, float]:
        x, y = self._xy(batch)
        rate = self.forget_rate(epoch)
        k = keep_count(len(y), rate)
        for net in self._nets:
            net.train()
        losses = [F.cross_entropy(net(x), y, reduction="none") for net in self._nets]
        kept = [small_loss_indices(loss, k) for loss in losses]
        # co-teaching: network i learns from its peer's selection; alone: from its own
        peers = [1, 0] if len(self._nets) == 2 else [0]
        updates = [losses[i][kept[peers[i]]].mean() for i in range(len(self._nets))]
        for opt, loss in zip(self._optimizers, updates, strict=True):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        metrics = {"loss": float(torch.stack([u.detach() for u in updates]).mean()),
                   "forget_rate": rate, "kept_fraction": k / max(1, len(y))}
        metrics.update(self._label_precision(batch, kept[0]))
        return metrics

    def eval_model(self):
        return self._eval

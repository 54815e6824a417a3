"""Training core of the diffusion autoencoder, free of Ray: the loss, one optimiser step, EMA.

DiffAE trains encoder and UNet jointly with the plain eps-prediction loss (L_simple): sample
t ~ U{0..T-1} and eps ~ N(0, I), form x_t, and regress eps_theta(x_t, t, E(x_0), c) onto eps.
The encoder gets no other loss. Official settings: Adam lr 1e-4, no weight decay, gradient
clipping at 1.0, EMA decay 0.9999 (the EMA weights are the ones used for inference).

A Ray Train loop calls `train_step` per batch; nothing here knows about workers or storage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffinf_ray.diffae.labels import NULL_LABEL
from diffinf_ray.diffae.schedule import NoiseSchedule


def diffusion_loss(
    model,
    x0: torch.Tensor,
    label: torch.Tensor | None = None,
    schedule: NoiseSchedule | None = None,
    *,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    cond_drop_prob: float = 0.0,
) -> torch.Tensor:
    """MSE between eps and eps_theta(x_t, t, E(x0), label), averaged over the batch.

    x0: (B, C, H, W) in [-1, 1]; label: (B,) ints or None. `t` and `noise` are drawn (from
    `generator`, a CPU generator, when given) unless passed. With `cond_drop_prob` > 0 each label
    is replaced by `NULL_LABEL` with that probability (classifier-free training).
    """
    schedule = schedule if schedule is not None else NoiseSchedule.linear()
    batch, device = x0.shape[0], x0.device
    if t is None:
        t = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    t, noise = t.to(device), noise.to(device)
    if label is not None and cond_drop_prob > 0:
        drop = (torch.rand(batch, generator=generator) < cond_drop_prob).to(device)
        label = torch.where(drop, torch.full_like(label, NULL_LABEL), label)
    x_t = schedule.add_noise(x0, noise, t)
    # one call that also encodes x0, so a DDP wrapper sees the whole graph in one forward
    return F.mse_loss(model(x_t, t, None, label, x_start=x0), noise)


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers.

    `update(model)` after each optimiser step: shadow = decay * shadow + (1 - decay) * param.
    `copy_to(model)` writes the averages into a model (for evaluation or export).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        floats, targets = [], []
        for key, value in model.state_dict().items():
            shadow = self.shadow[key]
            if value.is_floating_point():
                floats.append(shadow)
                targets.append(value.detach())
            else:
                shadow.copy_(value)
        if floats:  # one fused kernel per dtype/device rather than one per tensor
            torch._foreach_lerp_(floats, targets, 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow, strict=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)


def train_step(
    model,
    optimizer: torch.optim.Optimizer,
    x0: torch.Tensor,
    label: torch.Tensor | None = None,
    schedule: NoiseSchedule | None = None,
    *,
    ema: EMA | None = None,
    grad_clip: float | None = 1.0,
    generator: torch.Generator | None = None,
    cond_drop_prob: float = 0.0,
) -> float:
    """One optimiser step on the diffusion loss of a batch; returns the loss value.

    `model` may be wrapped in DistributedDataParallel (the loss is a single forward call); the
    EMA tracks the unwrapped module (`model.module` when wrapped).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = diffusion_loss(model, x0, label, schedule, generator=generator,
                          cond_drop_prob=cond_drop_prob)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if ema is not None:
        ema.update(getattr(model, "module", model))
    return float(loss.detach())

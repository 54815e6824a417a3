"""Noise schedule and deterministic DDIM (eta = 0) for the diffusion autoencoder.

Forward process (DDPM, linear betas 1e-4..0.02 over T = 1000 steps, as the official DiffAE):

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps

DDIM step (METHOD.md, stage 5), from noise level abar_t to abar_prev:

    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps

The same formula run towards *more* noise (abar_next < abar_t) is the DDIM inversion step.

Timestep spacing is diffusers' `DDIMScheduler(timestep_spacing="leading", steps_offset=0,
set_alpha_to_one=True)`: with S steps and ratio k = T // S the model is evaluated at
t = (S-1)k, ..., k, 0 and the last step lands on abar = 1 (the clean image). For S dividing
1000 (20, 50, 100, 250, ...) these are exactly the official `space_timesteps(1000, "ddim{S}")`
timesteps. Inversion walks the same grid upwards (diffusers' `DDIMInverseScheduler`): from
abar = 1 through abar_0, abar_k, ... to abar_{(S-1)k}, the level where decoding starts, so
x_T is exactly what `decode` expects. (The official `ddim_reverse_sample_loop` instead evaluates
the model at the source timestep and ends at abar = 0; the two differ by one grid offset at
both ends.)

All schedule arithmetic is float64; step coefficients are cast to the sample's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


def linear_betas(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
) -> torch.Tensor:
    """DDPM linear betas (float64), scaled like the official code when T != 1000."""
    scale = 1000.0 / num_train_timesteps
    return torch.linspace(
        beta_start * scale, beta_end * scale, num_train_timesteps, dtype=torch.float64
    )


def _as_coefficient(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample (B,) noise level, broadcastable against `like` (B, C, H, W)."""
    value = torch.as_tensor(value, dtype=torch.float64, device=like.device)
    if value.ndim == 1:
        value = value.view(-1, *([1] * (like.ndim - 1)))
    return value


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    abar_t: torch.Tensor | float,
    abar_prev: torch.Tensor | float,
    clip_x0: bool = False,
) -> torch.Tensor:
    """One deterministic DDIM update of `x_t` at noise level `abar_t` to level `abar_prev`.

    `eps` is the model's noise prediction at (x_t, t). With `clip_x0` the predicted clean image
    is clamped to [-1, 1] and eps is re-derived from it, as the official DiffAE sampler does
    (`clip_denoised=True`; diffusers: `clip_sample=True, use_clipped_model_output=True`); leave it
    off when gradients must flow through x0_hat everywhere.
    """
    a_t = _as_coefficient(abar_t, x_t)
    a_prev = _as_coefficient(abar_prev, x_t)
    sqrt_a_t = a_t.sqrt().to(x_t.dtype)
    sqrt_1m_a_t = (1 - a_t).sqrt().to(x_t.dtype)
    x0_hat = (x_t - sqrt_1m_a_t * eps) / sqrt_a_t
    if clip_x0:
        x0_hat = x0_hat.clamp(-1, 1)
        eps = (x_t - sqrt_a_t * x0_hat) / sqrt_1m_a_t
    return a_prev.sqrt().to(x_t.dtype) * x0_hat + (1 - a_prev).sqrt().to(x_t.dtype) * eps


def ddim_inversion_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    abar_from: torch.Tensor | float,
    abar_to: torch.Tensor | float,
) -> torch.Tensor:
    """One DDIM inversion update from noise level `abar_from` up to the noisier `abar_to`.

    It is the DDIM step run the other way: x0_hat from (x, eps) at `abar_from`, then re-noised
    with the same eps to `abar_to`. `abar_from` may be 1 (the clean image, x0_hat = x).
    """
    return ddim_step(x, eps, abar_from, abar_to)


@dataclass(frozen=True)
class DDIMStep:
    """One step of a DDIM loop: evaluate the model at `timestep`, move `abar_from` -> `abar_to`."""

    timestep: int
    abar_from: float
    abar_to: float


class NoiseSchedule:
    """The discrete DDPM schedule: betas, abar_t = prod_{s<=t}(1 - beta_s), and DDIM grids."""

    def __init__(self, betas: torch.Tensor):
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        self.betas = betas.to(torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    @classmethod
    def linear(
        cls,
        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
        beta_start: float = BETA_START,
        beta_end: float = BETA_END,
    ) -> NoiseSchedule:
        return cls(linear_betas(num_train_timesteps, beta_start, beta_end))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t for integer timesteps `t` (any shape), float64 on t's device."""
        return self.alphas_cumprod.to(t.device)[t.long()]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t of shape (B,)."""
        a = _as_coefficient(self.abar(t), x0)
        return a.sqrt().to(x0.dtype) * x0 + (1 - a).sqrt().to(x0.dtype) * noise

    def ddim_timesteps(self, steps: int) -> torch.Tensor:
        """Sampling timesteps, descending: (S-1)k, ..., k, 0 with k = T // S ("leading")."""
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"steps must be in [1, {self.num_train_timesteps}], got {steps}")
        ratio = self.num_train_timesteps // steps
        return torch.arange(steps - 1, -1, -1, dtype=torch.long) * ratio

    def _abar_or_one(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else 1.0

    def sampling_steps(self, steps: int) -> Iterator[DDIMStep]:
        """The decode loop: from abar_{(S-1)k} down to abar = 1."""
        ratio = self.num_train_timesteps // steps
        for t in self.ddim_timesteps(steps).tolist():
            yield DDIMStep(t, self._abar_or_one(t), self._abar_or_one(t - ratio))

    def inversion_steps(self, steps: int) -> Iterator[DDIMStep]:
        """The inversion loop, the sampling grid walked upwards: abar = 1 -> abar_{(S-1)k}.

        Each step is evaluated at the timestep of its destination, like decoding's step between
        the same two levels, so inversion then decoding is exact up to eps(x) changing between
        neighbouring grid points.
        """
        ratio = self.num_train_timesteps // steps
        for t in reversed(self.ddim_timesteps(steps).tolist()):
            yield DDIMStep(t, self._abar_or_one(t - ratio), self._abar_or_one(t))

"""Noise schedule and the official DiffAE deterministic DDIM (eta = 0) loops.

Forward process (DDPM, linear betas 1e-4..0.02 over T = 1000 steps, as the official DiffAE):

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps

Timesteps (official `space_timesteps(T, "ddimS")`, `timesteps.ddim_timesteps`): tau = range(0,
T, k) for the smallest integer stride k giving exactly S values, tau_0 = 0 < ... < tau_{S-1}.
S = 20 gives 0, 50, ..., 950; S = 30 gives 0, 34, ..., 986; S with no such stride (1, 45,
501..999, ... for T = 1000) are refused, as the official code refuses them.

One DDIM step (official `ddim_sample` / `ddim_reverse_sample`, `clip_denoised=True`), with the
model evaluated at the *source* level abar_t:

    x0_hat = clamp(sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps, -1, 1)
    eps'   = (sqrt(1/abar_t) x_t - x0_hat) / sqrt(1/abar_t - 1)
    x_to   = sqrt(abar_to) x0_hat + sqrt(1 - abar_to) eps'

Decoding (`render`) runs it at t = tau_{S-1}, ..., tau_0 with abar_to = abar_{tau_{i-1}}, and
abar = 1 after tau_0. Inversion (`encode_stochastic`, `ddim_reverse_sample_loop`) starts from
the clean image taken as x at tau_0 and runs it at t = tau_0, ..., tau_{S-1} with abar_to =
abar_{tau_{i+1}}, and abar = 0 after tau_{S-1}: x_T is the last eps'. Decoding then starts from
x_T at tau_{S-1}, as the official code does (so one step count S should govern both).

All schedule arithmetic is float64; step coefficients are cast to the sample's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from diffinf_ray.diffae.timesteps import NUM_TRAIN_TIMESTEPS, ddim_timesteps

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
    abar_to: torch.Tensor | float,
    clip_x0: bool = True,
) -> torch.Tensor:
    """One deterministic DDIM update of `x_t` from noise level `abar_t` to `abar_to` (either way).

    `eps` is the model's noise prediction at (x_t, t). `clip_x0` (the official
    `clip_denoised=True`; diffusers: `clip_sample=True, use_clipped_model_output=True`) clamps
    x0_hat to [-1, 1] and re-derives eps from it; the clamp passes gradients inside the range.
    `abar_to` = 1 gives x0_hat, `abar_to` = 0 gives eps'.
    """
    a_t = _as_coefficient(abar_t, x_t)
    a_to = _as_coefficient(abar_to, x_t)
    recip = (1 / a_t).sqrt().to(x_t.dtype)  # sqrt(1 / abar_t)
    recipm1 = (1 / a_t - 1).sqrt().to(x_t.dtype)  # sqrt(1 / abar_t - 1)
    x0_hat = recip * x_t - recipm1 * eps
    if clip_x0:
        x0_hat = x0_hat.clamp(-1, 1)
        eps = (recip * x_t - x0_hat) / recipm1
    return a_to.sqrt().to(x_t.dtype) * x0_hat + (1 - a_to).sqrt().to(x_t.dtype) * eps


def ddim_inversion_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    abar_t: torch.Tensor | float,
    abar_next: torch.Tensor | float,
    clip_x0: bool = True,
) -> torch.Tensor:
    """One step of the official DDIM inversion (`ddim_reverse_sample`): x at level `abar_t`,
    where the model gave `eps`, re-noised to the noisier `abar_next` (0 on the last step)."""
    return ddim_step(x, eps, abar_t, abar_next, clip_x0=clip_x0)


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
        """The official sampling timesteps, descending: tau_{S-1}, ..., tau_0 = 0."""
        return torch.tensor(ddim_timesteps(steps, self.num_train_timesteps)[::-1], dtype=torch.long)

    def _levels(self, steps: int) -> tuple[list[int], list[float]]:
        taus = ddim_timesteps(steps, self.num_train_timesteps)
        return taus, [float(self.alphas_cumprod[t]) for t in taus]

    def sampling_steps(self, steps: int, depth: int | None = None) -> Iterator[DDIMStep]:
        """The official decode loop (`ddim_sample_loop`): at tau_{S-1}, ..., tau_0, each step
        to the level of the next timestep down, the last to abar = 1.

        `depth` k < S (not in the official code: partial inversion, as SDEdit) starts at the
        level of tau_k instead, where `inversion_steps(steps, k)` ends: k + 1 steps."""
        taus, abars = self._levels(steps)
        top = len(taus) if depth is None else _check_depth(depth, len(taus)) + 1
        for i in reversed(range(top)):
            yield DDIMStep(taus[i], abars[i], abars[i - 1] if i > 0 else 1.0)

    def inversion_steps(self, steps: int, depth: int | None = None) -> Iterator[DDIMStep]:
        """The official inversion loop (`ddim_reverse_sample_loop`): at tau_0, ..., tau_{S-1},
        each step from its own level to the next timestep's, the last to abar = 0.

        `depth` k < S stops after the first k steps, at the level of tau_k (partial inversion:
        the decode keeps more of the image, the label changes less)."""
        taus, abars = self._levels(steps)
        stop = len(taus) if depth is None else _check_depth(depth, len(taus))
        for i in range(stop):
            yield DDIMStep(taus[i], abars[i], abars[i + 1] if i + 1 < len(taus) else 0.0)


def _check_depth(depth: int, steps: int) -> int:
    if not 1 <= depth < steps:
        raise ValueError(f"partial inversion depth must be in [1, {steps - 1}] for {steps} steps, "
                         f"got {depth} (leave it unset for the full loop)")
    return depth

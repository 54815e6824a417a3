"""Encode an image to (z, x_T) and decode (z, x_T, label) back, with gradients through decoding.

    z, x_T = encode(model, x, steps)              semantic code + deterministic DDIM inversion
    x0     = decode(model, z, x_T, label, steps)  deterministic DDIM sampling (eta = 0)

Both loops are the official DiffAE ones (schedule.py): `encode` is `encode_stochastic`
(`ddim_reverse_sample_loop`), `decode` is `render` before its map to [0, 1] (`ddim_sample_loop`),
with the official timesteps and x0_hat clamped at every step. Inversion ends at abar = 0 and
decoding starts at the last timestep of *its* grid, so x_T is what `decode` expects when both
use the same S; for the official model they reproduce the official outputs (tests/
test_diffae_official.py, golden vectors to ~1e-5).

`model` is anything with `encode(images) -> z` and `model(x_t, t, z, label) -> eps`: our
`DiffAEModel` or the official architecture in `diffinf_ray.diffae.official` (label None).

The decode loop is differentiable in z, x_T (and the model's weights, if they require grad).
Each step runs under `torch.utils.checkpoint.checkpoint(use_reentrant=False)`, so only the
step's inputs are kept for backward and activation memory is that of one UNet pass whatever the
number of steps; backward recomputes each step's forward once. `checkpoint=False` keeps every
step's activations instead (faster backward, memory linear in steps). Both loops run under the
caller's autograd mode: wrap them in `torch.no_grad()` when no gradients are needed, and put a
frozen generator in `eval()` mode (dropout).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from diffinf_ray.diffae.labels import NULL_LABEL
from diffinf_ray.diffae.schedule import DDIMStep, NoiseSchedule, ddim_inversion_step, ddim_step

DEFAULT_STEPS = 20  # the official T_eval; its reconstruction metric inverts with the same S


def _default_schedule(schedule: NoiseSchedule | None) -> NoiseSchedule:
    return schedule if schedule is not None else NoiseSchedule.linear()


def predict_eps(
    model,
    x: torch.Tensor,
    timestep: int,
    z: torch.Tensor,
    label: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """eps at (x, t) for a batch; with guidance_scale != 1, classifier-free guidance:
    eps_null + s * (eps_label - eps_null), both in one batched call."""
    t = torch.full((x.shape[0],), timestep, dtype=torch.long, device=x.device)
    if guidance_scale == 1.0 or label is None:
        return model(x, t, z, label)
    null = torch.full_like(label, NULL_LABEL)
    both = model(
        torch.cat([x, x]), torch.cat([t, t]), torch.cat([z, z]), torch.cat([label, null])
    )
    eps_label, eps_null = both.chunk(2)
    return eps_null + guidance_scale * (eps_label - eps_null)


def _sampling_step(model, x, z, label, step: DDIMStep, guidance_scale: float):
    eps = predict_eps(model, x, step.timestep, z, label, guidance_scale)
    return ddim_step(x, eps, step.abar_from, step.abar_to)


def _inversion_step(model, x, z, label, step: DDIMStep):
    eps = predict_eps(model, x, step.timestep, z, label)
    return ddim_inversion_step(x, eps, step.abar_from, step.abar_to)


def _run(fn, use_checkpoint: bool, *args):
    if use_checkpoint and torch.is_grad_enabled():
        return _checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def invert(
    model,
    images: torch.Tensor,
    z: torch.Tensor,
    label: torch.Tensor | None = None,
    steps: int = DEFAULT_STEPS,
    schedule: NoiseSchedule | None = None,
    checkpoint: bool = True,
    depth: int | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion of `images` (B, C, H, W) in [-1, 1] conditioned on z: x_T
    (the official `ddim_reverse_sample_loop` with S steps; with `depth` k, only its first k
    steps: a partial inversion, `NoiseSchedule.inversion_steps`)."""
    schedule = _default_schedule(schedule)
    x = images
    for step in schedule.inversion_steps(steps, depth):
        x = _run(_inversion_step, checkpoint, model, x, z, label, step)
    return x


def encode(
    model,
    images: torch.Tensor,
    steps: int = DEFAULT_STEPS,
    label: torch.Tensor | None = None,
    schedule: NoiseSchedule | None = None,
    checkpoint: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, x_T): the semantic code E(x) and the DDIM-inverted noise of x under (z, label)."""
    z = model.encode(images)
    return z, invert(model, images, z, label, steps, schedule, checkpoint)


def decode(
    model,
    z: torch.Tensor,
    x_T: torch.Tensor,
    label: torch.Tensor | None = None,
    steps: int = DEFAULT_STEPS,
    schedule: NoiseSchedule | None = None,
    checkpoint: bool = True,
    guidance_scale: float = 1.0,
    depth: int | None = None,
) -> torch.Tensor:
    """Deterministic DDIM sampling from x_T (B, C, H, W) given z (B, z_dim): x_0 (the official
    `ddim_sample_loop` with S steps; x_0 itself is not clamped).

    Differentiable in z and x_T; per-step gradient checkpointing unless `checkpoint=False`.
    Each step's x0_hat clamp passes gradients inside [-1, 1]; for a pixel outside it the
    gradient reaches x_t through the re-derived eps only, not through the model's eps.
    With `depth` k, x_T is a partial inversion of depth k (`invert(..., depth=k)`).
    """
    schedule = _default_schedule(schedule)
    x = x_T
    for step in schedule.sampling_steps(steps, depth):
        x = _run(_sampling_step, checkpoint, model, x, z, label, step, guidance_scale)
    return x


class DiffusionAutoencoder:
    """A frozen model and its schedule, with step counts fixed once:
    `ae.encode(x) -> (z, x_T)`, `ae.decode(z, x_T, label) -> x0`.

    `steps` governs inversion and decoding; `encode_steps` / `decode_steps` override one of
    them on purpose (the official manipulation demo inverts with 250 and renders with 100).
    """

    def __init__(
        self,
        model,
        schedule: NoiseSchedule | None = None,
        encode_steps: int | None = None,
        decode_steps: int | None = None,
        checkpoint: bool = True,
        steps: int = DEFAULT_STEPS,
    ):
        self.model = model.eval().requires_grad_(False)
        self.schedule = _default_schedule(schedule)
        self.encode_steps = encode_steps or steps
        self.decode_steps = decode_steps or steps
        self.checkpoint = checkpoint

    @torch.no_grad()
    def encode(self, images: torch.Tensor, label: torch.Tensor | None = None, steps: int | None = None):
        return encode(self.model, images, steps or self.encode_steps, label, self.schedule,
                      checkpoint=False)

    def decode(self, z, x_T, label=None, steps: int | None = None, **kwargs) -> torch.Tensor:
        return decode(self.model, z, x_T, label, steps or self.decode_steps, self.schedule,
                      checkpoint=kwargs.pop("checkpoint", self.checkpoint), **kwargs)


def saved_tensor_bytes(fn) -> int:
    """Bytes of tensors autograd keeps for backward while `fn` runs its forward (how much
    memory a decode holds; device independent)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total

"""Drawing new images from a (fine-tuned) diffusion autoencoder.

    z   ~ the generator's z prior (zprior.py: a Gaussian fitted to its images' codes)
    x_T ~ N(0, I)
    x_0 = DDIM decode(z, x_T, label) with S steps (autoencoder.decode, the official render),
          optionally with classifier-free guidance on the label; clamped to [-1, 1].

Each image has its own seed, which alone fixes its z and x_T: the same seed gives the same
image whatever the batch it is decoded in, so the synthesis actors may batch rows freely.
"""

from __future__ import annotations

import torch

from diffinf_ray.fairness_gen.zprior import ZPrior


def draw_noise(prior: ZPrior, seeds: list[int], image_shape: tuple[int, int, int]):
    """(z (n, d), x_T (n, C, H, W)) on the CPU, row i drawn from a generator seeded seeds[i]."""
    zs, xs = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        zs.append(prior.sample(1, gen))
        xs.append(torch.randn((1, *image_shape), generator=gen))
    return torch.cat(zs), torch.cat(xs)


@torch.no_grad()
def sample_images(model, prior: ZPrior, label: int, seeds: list[int], steps: int = 20,
                  guidance_scale: float = 1.0, device: str | torch.device = "cpu"):
    """(n, 3, H, W) float32 images in [-1, 1] on the CPU, one per seed, all with `label`
    (an int class of a label-conditional model; None for a model without labels)."""
    from diffinf_ray.diffae.autoencoder import decode

    if not seeds:
        size = model.config.image_size
        return torch.empty((0, 3, size, size))
    model.eval()
    size = model.config.image_size
    z, x_t = draw_noise(prior, seeds, (3, size, size))
    labels = None if label is None else torch.full((len(seeds),), int(label), dtype=torch.long)
    x0 = decode(model, z.to(device), x_t.to(device),
                None if labels is None else labels.to(device), steps,
                checkpoint=False, guidance_scale=guidance_scale)
    return x0.clamp(-1.0, 1.0).float().cpu()

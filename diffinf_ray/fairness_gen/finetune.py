"""The fine-tune loops of a group's (or cluster's) generator, on the DiffAE's own training loss
(diffae/training.py: L_simple, eps-prediction, with label dropout), conditioned on the cell's
label. Ray-free: `fit.py` runs them as Ray tasks.

- `finetune_lora`: LoRA adapters on the UNet (lora.py); one `training.train_step` per batch
  with an optimiser over the adapter weights only.
- `finetune_dreambooth`: every UNet weight (the semantic encoder frozen), loss
  L(group batch) + prior_weight * L(prior batch), the prior batch drawn from images the base
  model sampled before fine-tuning (`prior_images`), DreamBooth's prior preservation.
Batches are drawn with replacement from the images, from a generator seeded by settings.seed.
"""

from __future__ import annotations

import time

import torch

from diffinf_ray.diffae.training import diffusion_loss, train_step
from diffinf_ray.fairness_gen.lora import add_lora, count_parameters, lora_targets
from diffinf_ray.fairness_gen.settings import FinetuneSettings
from diffinf_ray.fairness_gen.zprior import ZPrior


def _batches(n: int, settings: FinetuneSettings):
    gen = torch.Generator().manual_seed(settings.seed)
    for _ in range(settings.steps):
        yield torch.randint(0, n, (min(settings.batch_size, n),), generator=gen), gen


def _summary(losses: list[float], seconds: float, trainable: int, total: int) -> dict:
    k = max(1, len(losses) // 10)
    return {"steps": len(losses), "seconds": seconds,
            "seconds_per_step": seconds / len(losses) if losses else 0.0,
            "loss_first": sum(losses[:k]) / k if losses else None,
            "loss_last": sum(losses[-k:]) / k if losses else None,
            "trainable_parameters": trainable, "total_parameters": total}


def finetune_lora(model, images: torch.Tensor, label: int, settings: FinetuneSettings,
                  device: str | torch.device = "cpu"):
    """(model with trained adapters, summary). `images` (N, 3, H, W) in [-1, 1]."""
    targets = lora_targets(model, settings.include_embedding_linears)
    model = add_lora(model.to(device), settings.rank, settings.alpha, targets)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=settings.learning_rate)
    images = images.to(device)
    losses, start = [], time.perf_counter()
    for index, gen in _batches(len(images), settings):
        x0 = images[index.to(images.device)]
        labels = torch.full((len(x0),), label, dtype=torch.long, device=device)
        losses.append(train_step(model, optimizer, x0, labels, grad_clip=settings.grad_clip,
                                 generator=gen, cond_drop_prob=settings.cond_drop_prob))
    model.eval()
    return model, {**_summary(losses, time.perf_counter() - start, *count_parameters(model)),
                   "lora_targets": targets}


def prior_images(base, prior: ZPrior, label: int, settings: FinetuneSettings,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """`settings.prior_images` images the base model samples (before any fine-tune) with
    `label` and z from the label's prior: what the class looks like to the base model."""
    from diffinf_ray.fairness_gen.sampling import sample_images

    seeds = [settings.seed * 1_000_003 + i for i in range(settings.prior_images)]
    return sample_images(base.to(device), prior, label, seeds, settings.sample_steps,
                         device=device)


def _dreambooth_step(model, optimizer, x0, prior, label, settings, gen) -> float:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    dev = x0.device
    loss = diffusion_loss(model, x0, torch.full((len(x0),), label, device=dev), generator=gen,
                          cond_drop_prob=settings.cond_drop_prob)
    if prior is not None and settings.prior_weight > 0:
        loss = loss + settings.prior_weight * diffusion_loss(
            model, prior, torch.full((len(prior),), label, device=dev), generator=gen,
            cond_drop_prob=settings.cond_drop_prob)
    loss.backward()
    if settings.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                       settings.grad_clip)
    optimizer.step()
    return float(loss.detach())


def finetune_dreambooth(model, images: torch.Tensor, label: int, settings: FinetuneSettings,
                        prior: torch.Tensor | None, device: str | torch.device = "cpu"):
    """(fine-tuned model, summary): every weight outside the semantic encoder trained on
    `images` with `label`, plus prior preservation on `prior` (N', 3, H, W) when given."""
    model = model.to(device)
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith("encoder."))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=settings.learning_rate)
    images = images.to(device)
    prior = prior.to(device) if prior is not None else None
    losses, start = [], time.perf_counter()
    for index, gen in _batches(len(images), settings):
        prior_batch = None
        if prior is not None and len(prior):
            prior_batch = prior[torch.randint(0, len(prior), (len(index),), generator=gen)]
        losses.append(_dreambooth_step(model, optimizer, images[index.to(images.device)],
                                       prior_batch, label, settings, gen))
    model.eval().requires_grad_(False)
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    return model, _summary(losses, time.perf_counter() - start, trainable, total)

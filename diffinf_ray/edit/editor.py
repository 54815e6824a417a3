"""The editor (METHOD.md stage 6): optimise a sample's diffusion latents so that the decoded
image keeps identity and structure but stops looking high-influence under its assigned label.

    edit(images (B, 3, H, W) in [-1, 1], labels (B,) int64) -> dict of numpy arrays

Per batch, with every network frozen (eval mode, no parameter gradients):

1. (z, x_T) = encode(x): semantic code + the official deterministic DDIM inversion
   (`encode_steps`, by default `steps`), no grad, conditioned on the assigned label like the
   decode (label None for an unconditional model).
2. The latents named by `optimize` ("z", "xT" or "both") become leaves of one Adam optimiser.
   Each sample's loss depends only on its own latents, and Adam's state is per element, so the
   batched optimiser is exactly B independent ones.
3. Evaluation j = 0, 1, ..., K of the current latents L_j:
       x_hat = decode(z, x_T, label, decode_steps)       the official DDIM sampling loop,
                                                          differentiable, per-step checkpointing
       total = losses.combine(losses.terms(x_hat, x)) + w_si * h_w(g(x_hat), label)
   A sample whose p_high = h_w(g(x_hat), label) < stop_p_high, or that has reached j = K, is
   done: its L_j, x_hat and losses are kept and it leaves the batch (later decodes run on the
   remaining rows only). The others take one Adam step on total.sum() to L_{j+1}.
   `iterations` is j, the number of Adam steps behind the kept latents: 0 means the sample
   already read as low-influence in its reconstruction (stop_p_high = 1 stops every sample at
   j = 0). The K-th evaluation runs without gradients.

Choices the paper leaves open:
- The kept latents are each sample's *last* iterate, not its lowest-loss one: with early
  stopping the last iterate is the first that meets the stop criterion, and reporting exactly
  the image that was judged needs no store of K decodes.
- The loss networks see x_hat clamped to [-1, 1] (the saved edit) through a straight-through
  clamp: values are those of the saved image, gradients pass as if unclamped (a hard clamp
  would cut the pixel loss's pull on out-of-range pixels). So `loss_*` and `p_high_after` are
  exactly those of `edited`; `loss_si` (unweighted p_high) equals `p_high_after`.

Outputs (numpy, first axis B): edited (B, 3, H, W) float32 in [-1, 1]; loss_total, loss_id,
loss_struct, loss_perc, loss_pixel, loss_si (of the kept latents); loss_total_initial (of the
un-optimised latents); p_high_before (h_w on the original image); p_high_after; iterations
(int64); stopped (bool, p_high fell below stop_p_high); reconstruction_mse (decode(encode(x)) vs
x, unclamped: how well the inversion reproduces the image). With `return_latents`: z, x_T (kept)
and z_initial, x_T_initial.

Deterministic for `settings.seed` (decode is eta = 0; the seed is set inside a forked RNG so the
caller's RNG is untouched): bitwise on CPU; on GPU up to cuDNN's non-deterministic kernels unless
`torch.use_deterministic_algorithms(True)`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from diffinf_ray.diffae.autoencoder import DiffusionAutoencoder
from diffinf_ray.edit.losses import TERMS, EditLosses, LossWeights, Reference
from diffinf_ray.edit.predictor import InfluencePredictor
from diffinf_ray.models.classifier import AttributeClassifier

OPTIMIZE_CHOICES = ("z", "xT", "both")
LOSS_KEYS = (*TERMS, "si", "total")


@dataclass(frozen=True)
class EditSettings:
    """The optimisation knobs of `config.EditSection` (loss weights live in `LossWeights`)."""

    optimize: str = "both"  # "z" | "xT" | "both"
    iterations: int = 20  # K, Adam steps at most
    lr: float = 0.01
    steps: int = 10  # DDIM steps S of the inversion and of the differentiable decode
    encode_steps: int | None = None  # inversion steps, when not `steps` on purpose
    decode_steps: int | None = None  # decode steps, when not `steps` on purpose
    stop_p_high: float = 0.2  # a sample is done once its p_high falls below this
    checkpoint: bool = True  # per-step gradient checkpointing in the decode
    seed: int = 0

    def __post_init__(self):
        if self.optimize not in OPTIMIZE_CHOICES:
            raise ValueError(f"optimize must be one of {OPTIMIZE_CHOICES}, got {self.optimize!r}")
        # frozen: resolve the defaults once, so encode_steps / decode_steps are always ints
        for name in ("encode_steps", "decode_steps"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.steps)
        if self.iterations < 0 or min(self.steps, self.encode_steps, self.decode_steps) < 1:
            raise ValueError("iterations must be >= 0 and steps >= 1")
        if not 0.0 <= self.stop_p_high <= 1.0:
            raise ValueError(f"stop_p_high must be in [0, 1], got {self.stop_p_high}")

    @classmethod
    def from_section(cls, section) -> EditSettings:
        """From a `config.EditSection` (or anything with the same attribute names)."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)})


def loss_weights_from_section(section) -> LossWeights:
    """The image-term weights of a `config.EditSection` (w_si goes to `LatentEditor`)."""
    return LossWeights(w_id=section.w_id, w_reg=section.w_reg, terms=dict(section.loss_terms))


def straight_through_clamp(x: torch.Tensor) -> torch.Tensor:
    """x clamped to [-1, 1] in value, with the identity's gradient."""
    return x + (x.clamp(-1.0, 1.0) - x).detach()


def freeze_loss_networks(losses: EditLosses, device: torch.device) -> None:
    """The identity, parsing and perceptual networks of `losses`, frozen on `device`."""
    for name in ("identity", "parsing", "perceptual"):
        net = getattr(losses, name)
        if isinstance(net, nn.Module):
            freeze(net, device)


def freeze(module: nn.Module, device: torch.device) -> nn.Module:
    return module.to(device).eval().requires_grad_(False)


def check_edit_inputs(images: torch.Tensor, labels, image_size: int | None,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32, labels int64) on `device`, after checking their shapes (and the image
    size an autoencoder works at, when it has one): what every edit method's `edit` takes."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if image_size is not None and tuple(images.shape[2:]) != (image_size, image_size):
        raise ValueError(
            f"images are {images.shape[2]}x{images.shape[3]} px but the autoencoder works at "
            f"{image_size}x{image_size}: resize them before editing")
    labels = torch.as_tensor(labels)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
    return images.to(device, torch.float32), labels.to(device, torch.long)


class LatentEditor:
    """Latent optimisation through a frozen diffusion autoencoder (see the module docstring).

    The networks are moved to `device` and frozen in place (the caller's objects). The decoder
    is conditioned on the assigned label when its model has num_classes > 0.
    """

    def __init__(
        self,
        autoencoder: DiffusionAutoencoder,
        classifier: AttributeClassifier,
        predictor: InfluencePredictor,
        losses: EditLosses,
        w_si: float,
        settings: EditSettings,
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.autoencoder = autoencoder
        freeze(autoencoder.model, self.device)
        self.classifier = freeze(classifier, self.device)
        self.predictor = freeze(predictor, self.device)
        self.losses = losses
        freeze_loss_networks(losses, self.device)
        self.w_si = float(w_si)
        self.settings = settings
        config = getattr(autoencoder.model, "config", None)
        self.image_size: int | None = getattr(config, "image_size", None)
        num_classes = int(getattr(config, "num_classes", 0) or 0)
        self.conditional = num_classes > 0
        if self.conditional and num_classes != predictor.num_classes:
            raise ValueError(f"the autoencoder has {num_classes} classes, the predictor "
                             f"{predictor.num_classes}")
        if getattr(classifier, "num_classes", predictor.num_classes) != predictor.num_classes:
            raise ValueError(f"the classifier has {classifier.num_classes} classes, the predictor "
                             f"{predictor.num_classes}")

    # -- pieces (public so tests and benchmarks can drive them) ----------------------------
    def _decoder_label(self, labels: torch.Tensor) -> torch.Tensor | None:
        return labels if self.conditional else None

    def _inputs(self, images: torch.Tensor, labels: torch.Tensor):
        return check_edit_inputs(images, labels, self.image_size, self.device)

    @torch.no_grad()
    def invert(self, images: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, x_T) of images in [-1, 1] by the semantic encoder and DDIM inversion."""
        return self.autoencoder.encode(images, self._decoder_label(labels),
                                       steps=self.settings.encode_steps)

    def objective(
        self, z: torch.Tensor, x_T: torch.Tensor, labels: torch.Tensor, ref: Reference
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(x_hat unclamped, {id, struct, perc, pixel, si, total}), each term (B,) and
        differentiable w.r.t. z and x_T under the caller's autograd mode."""
        x_raw = self.autoencoder.decode(z, x_T, self._decoder_label(labels),
                                        steps=self.settings.decode_steps,
                                        checkpoint=self.settings.checkpoint)
        x_hat = straight_through_clamp(x_raw)
        terms = self.losses.terms(x_hat, ref)
        terms["si"] = self.predictor.p_high(self.classifier.features(x_hat), labels)
        terms["total"] = self.losses.combine(terms) + self.w_si * terms["si"]
        return x_raw, terms

    # -- the whole edit ---------------------------------------------------------------------
    def edit(self, images: torch.Tensor, labels: torch.Tensor,
             return_latents: bool = False) -> dict[str, np.ndarray]:
        """Edit a batch; see the module docstring for the procedure and the outputs."""
        x, y = self._inputs(images, labels)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.settings.seed)
            return self._edit(x, y, return_latents)

    def _edit(self, x: torch.Tensor, y: torch.Tensor, return_latents: bool) -> dict:
        s = self.settings
        batch = x.shape[0]
        with torch.no_grad():
            ref = self.losses.reference(x)
            p_before = self.predictor.p_high(self.classifier.features(x), y)
            z0, x_T0 = self.invert(x, y)
        z = z0.clone().requires_grad_(s.optimize in ("z", "both"))
        x_T = x_T0.clone().requires_grad_(s.optimize in ("xT", "both"))
        optimizer = torch.optim.Adam([t for t in (z, x_T) if t.requires_grad], lr=s.lr)

        edited = torch.empty_like(x)
        kept = {name: x.new_zeros(batch) for name in LOSS_KEYS}
        iterations = torch.zeros(batch, dtype=torch.long, device=x.device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=x.device)
        z_kept, x_T_kept = z0.clone(), x_T0.clone()
        active = torch.arange(batch, device=x.device)  # rows still being optimised

        for step in range(s.iterations + 1):
            last = step == s.iterations
            with torch.set_grad_enabled(not last):
                x_raw, terms = self.objective(z[active], x_T[active], y[active],
                                              ref.select(active))
            if step == 0:
                reconstruction_mse = (x_raw.detach() - x).pow(2).flatten(1).mean(dim=1)
                total_initial = terms["total"].detach().clone()
            below = terms["si"].detach() < s.stop_p_high
            done = below | last
            if bool(done.any()):
                rows = active[done]
                edited[rows] = x_raw.detach()[done].clamp(-1.0, 1.0)
                for name in LOSS_KEYS:
                    kept[name][rows] = terms[name].detach()[done]
                iterations[rows] = step
                stopped[rows] = below[done]
                z_kept[rows] = z.detach()[rows]
                x_T_kept[rows] = x_T.detach()[rows]
            if bool(done.all()):
                break
            optimizer.zero_grad(set_to_none=True)
            # Done rows are left out: their latents are already kept, whatever Adam's momentum
            # does to them afterwards is never read.
            terms["total"][~done].sum().backward()
            optimizer.step()
            active = active[~done]

        out = {"edited": edited, "p_high_before": p_before, "p_high_after": kept["si"],
               "iterations": iterations, "stopped": stopped,
               "reconstruction_mse": reconstruction_mse, "loss_total_initial": total_initial}
        out.update({f"loss_{name}": kept[name] for name in LOSS_KEYS})
        if return_latents:
            out.update(z=z_kept, x_T=x_T_kept, z_initial=z0, x_T_initial=x_T0)
        return {k: v.detach().cpu().numpy() for k, v in out.items()}

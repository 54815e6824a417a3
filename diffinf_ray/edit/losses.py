"""The edit objective's image terms, per sample (METHOD.md stage 6):

    L_id     = 1 - cos(F_id(x), F_id(x_ref))                       identity
    L_struct = mean over pixels of KL(P(x_ref) || P(x))           facial layout, P = softmax of
                                                                   the parsing net's region logits
    L_perc   = perceptual distance (LPIPS, or the stated fallback)
    L_pixel  = mean squared error in [-1, 1] pixels                (the reconstruction loss)

and the combination w_id*L_id + w_reg*(l_struct*L_struct + l_perc*L_perc + l_pixel*L_pixel);
the editor adds w_si * p_high from the influence predictor.

All networks are frozen (eval mode, no parameter gradients) and take images in [-1, 1]; every
term is (B,) and differentiable w.r.t. x. `reference(x_ref)` computes what the terms need of the
originals once per batch (the editor calls `terms` K times against it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TERMS = ("id", "struct", "perc", "pixel")


@dataclass(frozen=True)
class LossWeights:
    w_id: float = 1.0
    w_reg: float = 1.0
    l_struct: float = 1.0
    l_perc: float = 1.0
    l_pixel: float = 1.0


@dataclass
class Reference:
    """What the loss terms need of the original images: computed once, without gradients."""

    images: torch.Tensor
    identity: torch.Tensor | None  # (B, D) unit vectors
    parsing: torch.Tensor | None  # (B, R, H, W) region probabilities


def _freeze(module: nn.Module | None) -> nn.Module | None:
    if module is not None:
        module.eval().requires_grad_(False)
    return module


class EditLosses:
    """The image terms of the edit objective over frozen networks.

    identity:   x (B, 3, H, W) -> (B, D) embedding (normalised here), or None to skip L_id
    parsing:    x -> (B, R, h, w) region logits, or None to skip L_struct
    perceptual: (x, y) -> (B,) distance, or None to skip L_perc
    A skipped term is reported as zeros and contributes nothing.
    """

    def __init__(
        self,
        identity: nn.Module | None,
        parsing: nn.Module | None,
        perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
        weights: LossWeights = LossWeights(),
    ):
        self.identity = _freeze(identity)
        self.parsing = _freeze(parsing)
        if isinstance(perceptual, nn.Module):
            _freeze(perceptual)
        self.perceptual = perceptual
        self.weights = weights

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.identity(x).flatten(1), dim=1)

    @torch.no_grad()
    def reference(self, x_ref: torch.Tensor) -> Reference:
        return Reference(
            images=x_ref.detach(),
            identity=self._embed(x_ref) if self.identity is not None else None,
            parsing=self.parsing(x_ref).softmax(dim=1) if self.parsing is not None else None,
        )

    def terms(self, x: torch.Tensor, ref: Reference) -> dict[str, torch.Tensor]:
        """{id, struct, perc, pixel}: each (B,), differentiable w.r.t. x."""
        zeros = x.new_zeros(x.shape[0])
        out = {"pixel": (x - ref.images).pow(2).flatten(1).mean(dim=1)}
        out["id"] = (1.0 - (self._embed(x) * ref.identity).sum(dim=1)
                     if self.identity is not None else zeros)
        if self.parsing is not None:
            log_p = self.parsing(x).log_softmax(dim=1)
            p_ref = ref.parsing
            kl = (p_ref * (p_ref.clamp_min(1e-8).log() - log_p)).sum(dim=1)
            out["struct"] = kl.flatten(1).mean(dim=1)
        else:
            out["struct"] = zeros
        out["perc"] = (self.perceptual(x, ref.images).reshape(-1)
                       if self.perceptual is not None else zeros)
        return out

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """w_id*L_id + w_reg*(l_struct*L_struct + l_perc*L_perc + l_pixel*L_pixel): (B,)."""
        w = self.weights
        reg = w.l_struct * terms["struct"] + w.l_perc * terms["perc"] + w.l_pixel * terms["pixel"]
        return w.w_id * terms["id"] + w.w_reg * reg

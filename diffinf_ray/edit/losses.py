"""The edit objective's image terms over frozen networks, per sample (METHOD.md stage 6).

The terms themselves are registered by name in `loss_terms.py` (L_id, L_struct, L_perc, L_pixel
today; `edit.loss_terms` picks them and their weights); this module holds the networks they read
and combines them:

    w_id * sum(weight * L, identity group) + w_reg * sum(weight * L, regulariser group)

the editor adds w_si * p_high from the influence predictor.

All networks are frozen (eval mode, no parameter gradients) and take images in [-1, 1]; every
term is (B,) and differentiable w.r.t. x. `reference(x_ref)` computes what the terms need of the
originals once per batch (the editor calls `terms` K times against it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffinf_ray.edit.loss_terms import DEFAULT_WEIGHTS, LOSS_TERMS, check_loss_terms

# every registered term, in registry order: the `loss_<name>` columns of the edits
TERMS = tuple(LOSS_TERMS)


@dataclass(frozen=True)
class LossWeights:
    """w_id and w_reg scale the identity and the regulariser groups; `terms` weighs each term
    inside its group (a term not named has weight 0)."""

    w_id: float = 1.0
    w_reg: float = 1.0
    terms: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    def __post_init__(self):
        object.__setattr__(self, "terms", check_loss_terms(dict(self.terms)))


@dataclass
class Reference:
    """What the loss terms need of the original images: computed once, without gradients.
    `prepared[name]` is term `name`'s (None where its network is missing)."""

    images: torch.Tensor
    prepared: dict[str, torch.Tensor | None]

    def select(self, rows: torch.Tensor) -> Reference:
        """The reference of a subset of the batch's rows."""
        return Reference(self.images[rows],
                         {k: None if v is None else v[rows] for k, v in self.prepared.items()})


def _freeze(module: nn.Module | None) -> nn.Module | None:
    if module is not None:
        module.eval().requires_grad_(False)
    return module


class EditLosses:
    """The image terms of the edit objective over frozen networks.

    identity:   x (B, 3, H, W) -> (B, D) embedding (normalised here), or None to skip L_id
    parsing:    x -> (B, R, h, w) region logits, or None to skip L_struct
    perceptual: (x, y) -> (B,) distance, or None to skip L_perc
    A term whose network is None is reported as zeros and contributes nothing (`missing()`
    names the weighted ones, which the edit stage refuses).
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

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """F_id(x) as unit vectors, (B, D)."""
        return F.normalize(self.identity(x).flatten(1), dim=1)

    def _has(self, name: str) -> bool:
        needs = LOSS_TERMS[name].needs
        return needs is None or getattr(self, needs) is not None

    def missing(self) -> list[str]:
        """The weighted terms whose network is missing (they would silently count as zero)."""
        return [n for n in TERMS if self.weights.terms.get(n, 0.0) > 0 and not self._has(n)]

    @torch.no_grad()
    def reference(self, x_ref: torch.Tensor) -> Reference:
        x_ref = x_ref.detach()
        return Reference(images=x_ref, prepared={
            n: LOSS_TERMS[n].prepare(self, x_ref) if self._has(n) else None for n in TERMS})

    def terms(self, x: torch.Tensor, ref: Reference) -> dict[str, torch.Tensor]:
        """{name: (B,)} for every registered term, differentiable w.r.t. x; a term whose
        network is missing is zeros. Terms of weight 0 are computed too: the edits report them."""
        zeros = x.new_zeros(x.shape[0])
        return {n: LOSS_TERMS[n].value(self, x, ref.prepared[n]) if self._has(n) else zeros
                for n in TERMS}

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """w_id * (weighted identity terms) + w_reg * (weighted regulariser terms): (B,)."""
        w = self.weights
        groups = {"identity": 0.0, "regulariser": 0.0}
        for name in TERMS:
            weight = w.terms.get(name, 0.0)
            if weight:
                group = LOSS_TERMS[name].group
                groups[group] = groups[group] + weight * terms[name]
        return w.w_id * groups["identity"] + w.w_reg * groups["regulariser"]

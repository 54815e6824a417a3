"""The image terms of the edit objective by name: `edit.loss_terms` in the config holds one weight
per registered term (METHOD.md stage 6; weight 0 turns a term off):

    L_id     = 1 - cos(F_id(x), F_id(x_ref))                       identity
    L_struct = mean over pixels of KL(P(x_ref) || P(x))           facial layout, P = softmax of
                                                                   the parsing net's region logits
    L_perc   = perceptual distance (LPIPS, or the stated fallback)
    L_pixel  = mean squared error in [-1, 1] pixels                (the reconstruction loss)

    objective = w_id * sum(weight * L, identity group) + w_reg * sum(weight * L, regulariser group)

With the default weights (all 1) this is the paper's w_id*L_id + w_reg*(l_struct*L_struct +
l_perc*L_perc + l_pixel*L_pixel).

To add a term: a function `(losses, x, prepared) -> (B,)` (differentiable w.r.t. x; `losses` is
the `losses.EditLosses` holding the frozen networks, `prepared` what the term's `prepare` computed
of the originals once per batch) and one `LossTerm` line in `REGISTERED`. `edit.loss_terms.<name>` then sets its weight
(`default` where unset) and its `loss_<name>` column appears in the edit stage's output.

Torch-free at import (the functions only call tensor methods): config.py builds the
`edit.loss_terms` section from `REGISTERED`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class LossTerm:
    name: str  # the config key and the `loss_<name>` column
    group: Literal["identity", "regulariser"]  # scaled by edit.w_id, or by edit.w_reg
    # the EditLosses network it needs ("identity", "parsing", "perceptual"; None: none); without
    # that network the term is reported as zeros and contributes nothing
    needs: str | None
    value: Callable[[Any, Any, Any], Any]  # (losses, x, prepared) -> (B,)
    # (losses, x_ref) -> what value() needs of the originals, computed once without gradients
    prepare: Callable[[Any, Any], Any] = lambda losses, x_ref: x_ref
    default: float = 1.0  # its weight when the config does not set it (0: off unless asked for)


def _identity_prepare(losses, x_ref):
    return losses.embed(x_ref)


def _identity(losses, x, ref_embedding):
    return 1.0 - (losses.embed(x) * ref_embedding).sum(dim=1)


def _structure_prepare(losses, x_ref):
    return losses.parsing(x_ref).softmax(dim=1)


def _structure(losses, x, p_ref):
    log_p = losses.parsing(x).log_softmax(dim=1)
    kl = (p_ref * (p_ref.clamp_min(1e-8).log() - log_p)).sum(dim=1)
    return kl.flatten(1).mean(dim=1)


def _perceptual(losses, x, x_ref):
    return losses.perceptual(x, x_ref).reshape(-1)


def _pixel(losses, x, x_ref):
    return (x - x_ref).pow(2).flatten(1).mean(dim=1)


REGISTERED = (
    LossTerm("id", "identity", "identity", _identity, _identity_prepare),
    LossTerm("struct", "regulariser", "parsing", _structure, _structure_prepare),
    LossTerm("perc", "regulariser", "perceptual", _perceptual),
    LossTerm("pixel", "regulariser", None, _pixel),
)
LOSS_TERMS: dict[str, LossTerm] = {t.name: t for t in REGISTERED}
DEFAULT_WEIGHTS: dict[str, float] = {t.name: t.default for t in REGISTERED}


def check_loss_terms(weights: dict[str, float]) -> dict[str, float]:
    """The weights of `edit.loss_terms`: registered names, finite weights >= 0 (ValueError)."""
    unknown = sorted(set(weights) - set(LOSS_TERMS))
    if unknown:
        raise ValueError(f"unknown loss term(s) {unknown}; registered: {sorted(LOSS_TERMS)} "
                         "(diffinf_ray/edit/loss_terms.py)")
    bad = {k: v for k, v in weights.items() if not (0.0 <= float(v) < float("inf"))}
    if bad:
        raise ValueError(f"loss term weights must be finite and >= 0, got {bad}")
    return {k: float(v) for k, v in weights.items()}

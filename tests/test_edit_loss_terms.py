"""The edit objective's image terms as a registry with one weight each in config
(edit/loss_terms.py): the config section derives from the registry, the combination is the
paper's w_id*L_id + w_reg*(l_struct*L_struct + l_perc*L_perc + l_pixel*L_pixel), a weight of 0
turns a term off without hiding its value, and a weighted term without its network is refused."""

import pytest
import torch
from torch import nn

from diffinf_ray.config import ConfigError, EditSection, load_config
from diffinf_ray.edit.editor import loss_weights_from_section
from diffinf_ray.edit.loss_terms import LOSS_TERMS
from diffinf_ray.edit.losses import TERMS, EditLosses, LossWeights


class _Net(nn.Module):
    def __init__(self, out: int):
        super().__init__()
        self.conv = nn.Conv2d(3, out, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def _losses(weights: LossWeights, parsing: bool = True) -> EditLosses:
    torch.manual_seed(0)
    return EditLosses(_Net(8), _Net(4) if parsing else None,
                      lambda x, y: (x - y).abs().flatten(1).mean(dim=1), weights)


def _images(seed: int) -> torch.Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_config_section_has_one_weight_per_registered_term():
    assert tuple(EditSection().loss_terms.model_dump()) == tuple(LOSS_TERMS) == TERMS
    cfg = load_config("jobs/configs/demo.yaml", ["edit.loss_terms.perc=0"])
    # a dotted override sets one weight and keeps the others' defaults
    assert dict(cfg.edit.loss_terms) == {"id": 1.0, "struct": 1.0, "perc": 0.0, "pixel": 1.0}
    with pytest.raises(ConfigError, match="unknown config key 'edit.loss_terms.tv'"):
        load_config("jobs/configs/demo.yaml", ["edit.loss_terms.tv=1"])
    with pytest.raises(ConfigError, match="'edit.l_struct' is now 'edit.loss_terms.struct'"):
        load_config("jobs/configs/demo.yaml", ["edit.l_struct=0"])
    with pytest.raises(ConfigError, match="greater than or equal to 0"):
        load_config("jobs/configs/demo.yaml", ["edit.loss_terms.pixel=-1"])


def test_the_combination_is_the_papers_objective():
    section = EditSection(w_id=0.7, w_reg=2.5,
                          loss_terms={"id": 1.0, "struct": 0.3, "perc": 1.7, "pixel": 4.0})
    losses = _losses(loss_weights_from_section(section))
    x, x_ref = _images(1), _images(2)
    t = losses.terms(x, losses.reference(x_ref))
    expected = 0.7 * t["id"] + 2.5 * (0.3 * t["struct"] + 1.7 * t["perc"] + 4.0 * t["pixel"])
    torch.testing.assert_close(losses.combine(t), expected)
    # each term by hand
    e, e_ref = (nn.functional.normalize(losses.identity(v).flatten(1), dim=1) for v in (x, x_ref))
    torch.testing.assert_close(t["id"], 1 - (e * e_ref).sum(1))
    torch.testing.assert_close(t["pixel"], (x - x_ref).pow(2).flatten(1).mean(1))
    torch.testing.assert_close(t["perc"], (x - x_ref).abs().flatten(1).mean(1))
    p_ref = losses.parsing(x_ref).softmax(1)
    kl = (p_ref * (p_ref.log() - losses.parsing(x).log_softmax(1))).sum(1).flatten(1).mean(1)
    torch.testing.assert_close(t["struct"], kl)
    assert bool((t["struct"] > 0).all()) and bool((t["id"] > 0).all())


def test_a_zero_weight_removes_a_term_from_the_objective_and_its_gradient_but_not_the_report():
    losses = _losses(LossWeights(terms={"id": 1.0, "struct": 1.0, "perc": 0.0, "pixel": 1.0}))
    full = _losses(LossWeights())
    x = _images(3).requires_grad_(True)
    ref = losses.reference(_images(4))
    t = losses.terms(x, ref)
    assert float(t["perc"].detach().sum()) > 0  # still measured and reported
    torch.testing.assert_close(losses.combine(t), full.combine(t) - t["perc"])
    # only the pixel term left: the gradient is the pixel term's
    pixel_only = _losses(LossWeights(terms={"pixel": 1.0}))
    (grad,) = torch.autograd.grad(pixel_only.combine(pixel_only.terms(x, ref)).sum(), x)
    torch.testing.assert_close(grad, 2 * (x - ref.images).detach() / x[0].numel())


def test_a_weighted_term_without_its_network_is_named():
    assert _losses(LossWeights(), parsing=False).missing() == ["struct"]
    assert _losses(LossWeights(terms={"id": 1, "perc": 1, "pixel": 1}), parsing=False).missing() == []
    t = _losses(LossWeights(terms={"pixel": 1}), parsing=False)
    out = t.terms(_images(5), t.reference(_images(6)))
    assert float(out["struct"].abs().sum()) == 0.0  # reported as zeros
    with pytest.raises(ValueError, match="unknown loss term"):
        LossWeights(terms={"tv": 1.0})

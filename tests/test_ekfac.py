"""EK-FAC second-order self-influence (influence/ekfac.py), checked against computations that do
not go through kronfluence: without curvature (`identity`) it is our own TracIn squared gradient
norm; on one linear layer, `ekfac` and `kfac` equal an explicit eigendecomposition of the
Kronecker factors written here in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from diffinf_ray.influence.ekfac import (
    EkfacError,
    checkpoint_scores,
    self_influence,
    tracked_modules,
)
from diffinf_ray.influence.grad_norms import per_sample_grad_sq_norms


def _tiny_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def test_identity_strategy_is_our_squared_gradient_norm():
    """No curvature: I(z) = ||g_z||^2 over the conv and linear weights and biases, the TracIn
    core's one-pass ghost norms; batches of 5 over 12 rows (a ragged last batch)."""
    model = _tiny_convnet()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, 8, 8, generator=gen)
    y = torch.randint(0, 3, (12,), generator=gen)
    got = self_influence(model, TensorDataset(x, y), strategy="identity", batch_size=5)
    want = per_sample_grad_sq_norms(model, x, y).double().numpy()
    assert got.shape == (12,)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # the model itself is untouched (prepare_model wraps and freezes a copy)
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(model[0], nn.Conv2d)
    # only the output layer: its share of the norm
    head = self_influence(model, TensorDataset(x, y), strategy="identity", layers=["4"])
    np.testing.assert_allclose(head, per_sample_grad_sq_norms(model, x, y, layers=["4"])
                               .double().numpy(), rtol=1e-4)


def _explicit_linear_scores(layer: nn.Sequential, x: torch.Tensor, y: torch.Tensor,
                            damping: float | None, strategy: str) -> np.ndarray:
    """EK-FAC / K-FAC self-influence of a softmax-regression layer with the empirical Fisher,
    from its definition: A = E[a a^T] (a = [x, 1]), S = E[s s^T] (s = softmax - onehot(y)),
    Q_A, Q_S their eigenvectors, G_i = s_i a_i^T, P_i = Q_S^T G_i Q_A; Lambda = E[P_i^2]
    (EK-FAC) or eig(S) eig(A)^T (K-FAC); damping None = 0.1 mean(Lambda);
    I_i = sum P_i^2 / (Lambda + damping)."""
    w = layer[0].weight.detach().double()
    b = layer[0].bias.detach().double()
    x = x.double()
    n = x.shape[0]
    a = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    s = torch.softmax(x @ w.T + b, dim=1) - torch.nn.functional.one_hot(y, w.shape[0]).double()
    eig_a, q_a = torch.linalg.eigh(a.T @ a / n)
    eig_s, q_s = torch.linalg.eigh(s.T @ s / n)
    grads = s[:, :, None] * a[:, None, :]  # (N, k, d + 1) per-sample weight-and-bias gradients
    proj = q_s.T @ grads @ q_a
    lam = (proj ** 2).mean(0) if strategy == "ekfac" else torch.outer(eig_s, eig_a)
    lam = lam + (0.1 * lam.mean() if damping is None else damping)
    return ((proj ** 2) / lam).sum(dim=(1, 2)).numpy()


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
@pytest.mark.parametrize("damping", [None, 1e-2])
def test_ekfac_on_one_linear_layer_equals_the_explicit_eigendecomposition(strategy, damping):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(5, 3))
    x = torch.randn(40, 5)
    y = torch.randint(0, 3, (40,))
    got = self_influence(layer, TensorDataset(x, y), strategy=strategy, damping=damping,
                         fisher="empirical", batch_size=16)
    want = _explicit_linear_scores(layer, x, y, damping, strategy)
    np.testing.assert_allclose(got, want, rtol=2e-4)
    # curvature matters: not a rescaled squared gradient norm
    norms = per_sample_grad_sq_norms(layer, x, y).double().numpy()
    assert abs(np.corrcoef(got, norms)[0, 1]) < 0.999


def test_true_fisher_draws_labels_from_the_model_reproducibly():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(5, 3))
    x = torch.randn(30, 5)
    y = torch.randint(0, 3, (30,))
    ds = TensorDataset(x, y)
    first = self_influence(layer, ds, seed=3)
    np.testing.assert_array_equal(first, self_influence(layer, ds, seed=3))
    assert not np.allclose(first, self_influence(layer, ds, fisher="empirical"))
    assert not np.allclose(first, self_influence(layer, ds, seed=4))


def test_bad_settings_are_named():
    model = _tiny_convnet()
    ds = TensorDataset(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(EkfacError, match="a bare layer"):
        self_influence(nn.Linear(2, 2), TensorDataset(torch.randn(2, 2), torch.tensor([0, 1])))
    with pytest.raises(EkfacError, match="ekfac.strategy: 'ekfc'"):
        self_influence(model, ds, strategy="ekfc")
    with pytest.raises(EkfacError, match=r"unknown module names \['head'\]"):
        tracked_modules(model, ["head"])
    with pytest.raises(EkfacError, match="no Linear or Conv2d"):
        tracked_modules(model, ["1"])
    assert tracked_modules(model, [""]) == ["0", "4"]


def test_all_checkpoints_sum_the_learning_rate_weighted_scores(monkeypatch):
    """checkpoint=all is sum_t eta_t I_t(z), like TracIn; last is the last checkpoint alone;
    each is scored on its own first network (self_influence stubbed: the weighting is tested)."""
    import diffinf_ray.influence.ekfac as ekfac
    from diffinf_ray.models.checkpoint import ClassifierCheckpoint
    from diffinf_ray.models.classifier import build_classifier

    ckpts = []
    for epoch, lr in ((1, 1e-3), (2, 5e-4)):
        torch.manual_seed(epoch)
        net = build_classifier(3, head_hidden=8)
        ckpts.append(ClassifierCheckpoint(f"epoch_{epoch}", net.state_dict(), epoch, lr,
                                          net.architecture()))
    ckpts[1].peer_states = [build_classifier(3, head_hidden=8).state_dict()]
    seen = []

    def fake(model, dataset, **settings):
        assert settings == {"fisher": "empirical"} and not model.training
        seen.append(float(model.head[2].bias.sum()))
        return np.arange(len(dataset), dtype=np.float64) + len(seen)

    monkeypatch.setattr(ekfac, "self_influence", fake)
    ds = TensorDataset(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    every = checkpoint_scores(ckpts, ds, checkpoint="all", fisher="empirical")
    rows = np.arange(4.0)
    np.testing.assert_allclose(every["score"], 1e-3 * (rows + 1) + 5e-4 * (rows + 2))
    assert every["per_checkpoint"].shape == (4, 2) and every["epochs"] == [1, 2]
    assert seen == [float(c.model_state["head.2.bias"].sum()) for c in ckpts]
    last = checkpoint_scores(ckpts, ds, fisher="empirical")
    np.testing.assert_allclose(last["score"], rows + 3)  # unweighted: Eq. 4 as written
    assert last["epochs"] == [2] and last["learning_rates"] == [5e-4]
    with pytest.raises(EkfacError, match="ekfac.checkpoint: 'first'"):
        checkpoint_scores(ckpts, ds, checkpoint="first")

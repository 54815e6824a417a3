"""Noisy-label training methods (diffinf_ray/baselines): each method's defining mechanism checked
on hand-made cases, and each method's published behaviour on a small synthetic noisy problem.

The synthetic problem: 3 Gaussian blobs in 2-D rendered as 3x8x8 "images" (a fixed linear
embedding plus per-pixel noise, which gives a small MLP room to memorise), 600 training samples
with 40 % symmetric label noise (each flipped label is a different class), a clean test set.
Plain cross-entropy first learns the blobs, then memorises the wrong labels and its clean
accuracy falls; the methods are meant to prevent exactly that. Everything runs on one CPU
thread with fixed seeds.
"""

from __future__ import annotations

import copy
import io
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffinf_ray.baselines import METHODS, MethodError, build_method, method_defaults
from diffinf_ray.baselines.base import NoisyLabelMethod, run_epoch, sigmoid_rampup
from diffinf_ray.baselines.coteaching import forget_rate, keep_count, small_loss_indices
from diffinf_ray.baselines.elr import elr_regularizer
from diffinf_ray.baselines.promix import (
    classwise_small_loss,
    label_guessing,
    matched_high_confidence,
)
from diffinf_ray.baselines.proselflc import global_trust, local_trust

K = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TinyNet(nn.Module):
    """Flatten -> Linear -> ReLU (features) -> Linear (head); model(x) == head(features(x))."""

    def __init__(self, hidden: int = 64, in_dim: int = 3 * 8 * 8, num_classes: int = K):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def blobs(n: int, seed: int, noise_rate: float = 0.0) -> dict[str, torch.Tensor]:
    """Balanced 3-class blobs as (n, 3, 8, 8) images; symmetric noise flips round(rate * n)."""
    basis = torch.randn(192, 2, generator=torch.Generator().manual_seed(1234))
    basis = basis / basis.norm(dim=0)
    g = torch.Generator().manual_seed(seed)
    clean = torch.arange(n) % K
    angle = 2 * math.pi * clean.float() / K
    points = 3.0 * torch.stack([angle.cos(), angle.sin()], dim=1) + torch.randn(n, 2, generator=g)
    images = (points @ basis.T + 0.3 * torch.randn(n, 192, generator=g)).reshape(n, 3, 8, 8)
    label = clean.clone()
    flip = torch.randperm(n, generator=g)[: round(noise_rate * n)]
    label[flip] = (clean[flip] + torch.randint(1, K, (len(flip),), generator=g)) % K
    return {"image": images, "label": label, "clean": clean, "index": torch.arange(n),
            "is_corrupted": label != clean}


def loader(data: dict[str, torch.Tensor], batch_size: int):
    """A fresh shuffled pass per call (torch's global generator: seeded by the test)."""
    n = len(data["label"])

    def batches():
        order = torch.randperm(n)
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            yield {k: data[k][rows] for k in ("image", "label", "index", "is_corrupted")}

    return batches


def accuracy(method: NoisyLabelMethod, data) -> float:
    model = method.eval_model()
    model.eval()
    with torch.no_grad():
        return float((model(data["image"]).argmax(1) == data["clean"]).float().mean())


# ------------------------------------------------------------------ the synthetic noisy problem

EPOCHS, LR, N_TRAIN, BATCH, NOISE = 24, 1e-3, 600, 64, 0.4
# schedule lengths scaled to a 24-epoch run (the papers' values are for 200-600 epochs)
SANITY_CFG = {
    "standard": {},
    "small_loss": {"noise_rate": NOISE, "num_gradual": 4},
    "elr_plus": {"ema_step": 50},
    "proselflc": {"epochs": EPOCHS},
    "promix": {"epochs": EPOCHS, "pretrain_epochs": 4, "rampup_epochs": 6, "lga_epochs": 12},
}


@pytest.fixture(scope="module")
def sanity_runs():
    train, test = blobs(N_TRAIN, seed=1, noise_rate=NOISE), blobs(600, seed=2)
    runs = {}
    for name, cfg in SANITY_CFG.items():
        torch.manual_seed(0)
        method = build_method(name, K, N_TRAIN, cfg, TinyNet, LR)
        batches = loader(train, BATCH)
        history = []
        for epoch in range(1, EPOCHS + 1):
            metrics = run_epoch(method, batches, epoch)
            history.append({**metrics, "test_accuracy": accuracy(method, test)})
        runs[name] = history
    return runs


def test_problem_makes_standard_memorise(sanity_runs):
    hist = sanity_runs["standard"]
    peak = max(h["test_accuracy"] for h in hist)
    assert peak > 0.95  # the blobs are learnable...
    assert hist[-1]["test_accuracy"] < peak - 0.15  # ...and plain CE then memorises the noise
    assert hist[-1]["accuracy"] > 0.8  # it fits far more than the 60 % clean labels


@pytest.mark.parametrize("name", list(SANITY_CFG))
def test_training_loss_decreases(sanity_runs, name):
    hist = sanity_runs[name]
    # ProMix changes its loss after warm-up: compare within the selection phase
    first = SANITY_CFG["promix"]["pretrain_epochs"] if name == "promix" else 0
    assert hist[-1]["loss"] < hist[first]["loss"] - 0.1, [round(h["loss"], 3) for h in hist]


# published behaviour: under 40 % symmetric noise each method ends with a higher clean test
# accuracy than cross-entropy after the same epochs (Co-teaching, ELR+, ProMix by a wide margin;
# ProSelfLC's correction starts later and helps less). Measured: standard 0.757, small_loss
# 0.982, elr_plus 0.975, proselflc 0.823, promix 0.992.
@pytest.mark.parametrize(("name", "margin"), [("small_loss", 0.15), ("elr_plus", 0.15),
                                              ("proselflc", 0.04), ("promix", 0.15)])
def test_method_beats_standard_under_noise(sanity_runs, name, margin):
    standard = sanity_runs["standard"][-1]["test_accuracy"]
    ours = sanity_runs[name][-1]["test_accuracy"]
    assert ours > standard + margin, (name, ours, standard)


def test_selection_methods_pick_mostly_clean_labels(sanity_runs):
    # 60 % of the training labels are clean; the selected ones must be far cleaner
    # (measured: small_loss 0.943, promix 0.919 in the last epoch)
    assert sanity_runs["small_loss"][-1]["label_precision"] > 0.85
    assert sanity_runs["promix"][-1]["label_precision"] > 0.85


# ------------------------------------------------------------------ Co-teaching


def test_forget_rate_schedule():
    assert forget_rate(1, 0.3, 10) == 0.0
    assert forget_rate(6, 0.3, 10) == pytest.approx(0.15)
    assert forget_rate(11, 0.3, 10) == pytest.approx(0.3)
    assert forget_rate(50, 0.3, 10) == pytest.approx(0.3)
    assert forget_rate(6, 0.3, 10, exponent=2) == pytest.approx(0.3 * 0.25)
    with pytest.raises(MethodError):
        forget_rate(0, 0.3, 10)


@pytest.mark.parametrize(("rate", "batch"), [("0", 20), ("3/20", 20), ("3/10", 64), ("2/5", 7),
                                             ("1/3", 30), ("4/10", 128)])
def test_keep_count_is_exact_ceiling(rate, batch):
    exact = math.ceil((1 - Fraction(rate)) * batch)
    assert keep_count(batch, float(Fraction(rate))) == exact


def test_small_loss_indices_prefer_small_losses_with_stable_ties():
    losses = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3])
    assert small_loss_indices(losses, 3).tolist() == [1, 3, 4]


class FixedLogits(nn.Module):
    """logits = sign * x @ W with W = identity at start: per-sample losses known by hand."""

    def __init__(self, sign: float):
        super().__init__()
        self.sign = sign
        self.weight = nn.Parameter(torch.eye(K, dtype=torch.float64))

    def forward(self, x):
        return self.sign * x @ self.weight


def _two_net_factory():
    signs = iter([1.0, -1.0])
    return lambda: FixedLogits(next(signs))


def test_coteaching_keeps_exactly_ceil_and_the_smallest_losses():
    torch.manual_seed(0)
    x = torch.randn(20, K, dtype=torch.float64) * 3
    y = torch.randint(0, K, (20,))
    method = build_method("small_loss", K, 20, {"forget_rate": 0.3, "num_gradual": 2},
                          _two_net_factory(), 0.1)
    # epoch 2: forget rate 0.15, keep ceil(0.85 * 20) = 17
    expected_k = math.ceil((1 - Fraction(3, 20)) * 20)
    own_losses = F.cross_entropy(x, y, reduction="none")
    smallest = set(torch.argsort(own_losses)[:expected_k].tolist())
    # the precision metric reads is_corrupted: mark everything outside the expected set
    corrupted = torch.tensor([i not in smallest for i in range(20)])
    metrics = method.training_step({"image": x, "label": y, "is_corrupted": corrupted}, 2, 0)
    assert metrics["forget_rate"] == pytest.approx(0.15)
    assert round(metrics["kept_fraction"] * 20) == expected_k == 17
    assert metrics["label_precision"] == 1.0  # network 1 kept exactly its 17 smallest losses


def test_coteaching_updates_each_network_on_its_peers_selection():
    torch.manual_seed(0)
    x = torch.randn(10, K, dtype=torch.float64) * 3
    y = torch.randint(0, K, (10,))
    cfg = {"forget_rate": 0.4, "num_gradual": 1, "optimizer": "sgd", "momentum": 0.0}
    method = build_method("small_loss", K, 10, cfg, _two_net_factory(), 0.5)
    net1, net2 = (copy.deepcopy(m) for m in method.models())
    k = keep_count(10, 0.4)
    kept1 = torch.argsort(F.cross_entropy(net1(x), y, reduction="none"), stable=True)[:k]
    kept2 = torch.argsort(F.cross_entropy(net2(x), y, reduction="none"), stable=True)[:k]
    assert set(kept1.tolist()) != set(kept2.tolist())  # the case distinguishes the two rules
    method.training_step({"image": x, "label": y}, 2, 0)
    for net, peer_kept, trained in ((net1, kept2, method.models()[0]),
                                    (net2, kept1, method.models()[1])):
        loss = F.cross_entropy(net(x[peer_kept]), y[peer_kept])
        (grad,) = torch.autograd.grad(loss, net.weight)
        torch.testing.assert_close(trained.weight.detach(), net.weight.detach() - 0.5 * grad)


# ------------------------------------------------------------------ ELR / ELR+


def test_elr_regularizer_gradient_matches_closed_form():
    z = torch.tensor([[1.0, 0.5, -0.5], [0.2, -1.0, 2.0]], dtype=torch.float64,
                     requires_grad=True)
    t = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=torch.float64, requires_grad=True)
    reg = elr_regularizer(z, t)
    p = F.softmax(z.detach(), dim=1)
    tp = (t.detach() * p).sum(dim=1, keepdim=True)
    torch.testing.assert_close(reg, torch.log(1 - tp.squeeze(1)))
    reg.sum().backward()
    closed_form = -p * (t.detach() - tp) / (1 - tp)
    torch.testing.assert_close(z.grad, closed_form)
    assert t.grad is None  # the targets are constants
    # first row by hand: p = softmax([1, .5, -.5]), <t,p> = 0.2 p0 + 0.5 p1 + 0.3 p2
    e = [math.exp(1.0), math.exp(0.5), math.exp(-0.5)]
    p0, p1, p2 = (v / sum(e) for v in e)
    s = 0.2 * p0 + 0.5 * p1 + 0.3 * p2
    assert z.grad[0, 0].item() == pytest.approx(-p0 * (0.2 - s) / (1 - s))


def test_elr_plus_temporal_ensemble_from_peer_ema_and_ema_update():
    torch.manual_seed(0)
    data = blobs(16, seed=3, noise_rate=0.25)
    method = build_method("elr_plus", K, 16, {"ema_step": 10}, lambda: TinyNet(8), 1e-2)
    batch = {k: data[k][:8] for k in ("image", "label", "index")}
    ema2_before = copy.deepcopy(method.ema2)
    ema1_before = [p.detach().clone() for p in method.ema1.parameters()]
    method.training_step(batch, 1, 0)
    with torch.no_grad():
        p_peer = F.softmax(ema2_before(batch["image"]), dim=1)
    beta = method_defaults("elr_plus")["beta"]
    torch.testing.assert_close(method.targets[0][:8], (1 - beta) * p_peer)  # t starts at 0
    assert torch.count_nonzero(method.targets[0][8:]) == 0  # samples not in the batch untouched
    decay = 0.997 * sigmoid_rampup(2, 10)
    for before, ema, net in zip(ema1_before, method.ema1.parameters(),
                                method.net1.parameters(), strict=True):
        torch.testing.assert_close(ema, decay * before + (1 - decay) * net.detach())


def test_elr_plus_evaluates_the_average_of_both_networks():
    torch.manual_seed(0)
    method = build_method("elr_plus", K, 4, {}, TinyNet, 1e-3)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = (method.net1(x) + method.net2(x)) / 2
        torch.testing.assert_close(method.eval_model()(x), expected)


# ------------------------------------------------------------------ ProSelfLC


def test_proselflc_trust_terms():
    assert local_trust(torch.tensor([[1.0, 0.0, 0.0]])).item() == pytest.approx(1.0)
    assert local_trust(torch.full((1, K), 1 / K)).item() == pytest.approx(0.0, abs=1e-6)
    assert global_trust(0.5, 6.0, 0.5) == pytest.approx(0.5)
    assert global_trust(1.0, 6.0, 0.5) == pytest.approx(1 / (1 + math.exp(-3.0)))


def test_proselflc_epsilon_zero_in_burn_in_then_growing():
    method = build_method("proselflc", K, 10, {"epochs": 20, "burn_in_epochs": 4}, TinyNet, 1e-3)
    probs = torch.tensor([[0.8, 0.15, 0.05], [0.4, 0.3, 0.3]])
    for epoch in (1, 2, 3, 4):
        assert torch.count_nonzero(method.epsilon(probs, epoch, 0)) == 0
    eps = torch.stack([method.epsilon(probs, epoch, 0) for epoch in range(5, 21)])
    assert (eps > 0).all()
    assert (eps[1:] > eps[:-1]).all()  # grows with training time
    assert (eps[:, 0] > eps[:, 1]).all()  # and trusts the confident prediction more
    expected = global_trust(20 / 20, 6.0, 0.5) * local_trust(probs)
    torch.testing.assert_close(eps[-1], expected)


def test_proselflc_loss_uses_the_corrected_target():
    torch.manual_seed(0)
    data = blobs(12, seed=4)
    method = build_method("proselflc", K, 12, {"epochs": 10, "burn_in_epochs": 2}, TinyNet, 1e-3)
    batch = {k: data[k] for k in ("image", "label")}
    burn = method.training_step(batch, 2, 0)
    assert burn["epsilon_mean"] == 0.0
    with torch.no_grad():
        logits = method.net(batch["image"])
    p = F.softmax(logits, dim=1)
    eps = (global_trust(8 / 10, 6.0, 0.5) * local_trust(p))[:, None]
    target = (1 - eps) * F.one_hot(batch["label"], K) + eps * p
    expected = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    metrics = method.training_step(batch, 8, 0)
    assert metrics["epsilon_mean"] == pytest.approx(eps.mean().item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------ ProMix


def test_classwise_small_loss_selects_per_class():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    losses = torch.tensor([4., 1., 3., 2., 0.1, 0.2, 0.3, 0.4, 9., 8., 7., 6.])
    seen = torch.ones(12, dtype=torch.bool)
    sel = classwise_small_loss(losses, labels, seen, rho=0.5, num_classes=K)
    # ceil(0.5 * 12 / 3) = 2 per class, the smallest within each class (not globally)
    assert torch.nonzero(sel).flatten().tolist() == [1, 3, 4, 5, 10, 11]
    # a small class is capped at its size; unseen samples are never selected
    labels2 = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 2])
    seen2 = seen.clone()
    seen2[0] = False
    sel2 = classwise_small_loss(losses, labels2, seen2, rho=0.5, num_classes=K)
    per_class = [int((sel2 & (labels2 == j)).sum()) for j in range(K)]
    assert per_class == [2, 1, 2] and not sel2[0]


def test_matched_high_confidence_and_label_guessing():
    probs = torch.tensor([[0.995, 0.004, 0.001], [0.995, 0.004, 0.001], [0.2, 0.7, 0.1]])
    assert matched_high_confidence(probs, torch.tensor([0, 1, 1]), 0.99).tolist() == \
        [True, False, False]
    chosen = torch.tensor([True, False, False, False, False])
    score1 = torch.tensor([0.5, 0.999, 0.995, 0.999, 0.5])
    score2 = torch.tensor([0.5, 0.998, 0.999, 0.999, 0.999])
    match = torch.tensor([True, True, True, False, True])
    # 1/5 chosen < 0.9; candidates: rows 1, 2 (both confident, agreeing); room int(5*0.6)-1 = 2
    assert label_guessing(chosen, score1, score2, match, 0.99, 0.6).tolist() == \
        [True, True, True, False, False]
    # room for one only: the more confident candidate (row 1: mean 0.9985 > 0.997)
    assert label_guessing(chosen, score1, score2, match, 0.99, 0.4).tolist() == \
        [True, True, False, False, False]
    # enough already chosen: nothing added
    assert label_guessing(chosen, score1, score2, match, 0.99, 0.2).tolist() == chosen.tolist()


def test_promix_scans_then_selects_per_class_for_each_network():
    torch.manual_seed(0)
    n = 60
    data = blobs(n, seed=5, noise_rate=0.3)
    cfg = {"epochs": 4, "pretrain_epochs": 1, "rho_start": 0.5, "rho_end": 0.5}
    method = build_method("promix", K, n, cfg, TinyNet, 1e-2)
    batches = loader(data, 20)
    run_epoch(method, batches, 1)  # warm-up: no scan
    assert not method.needs_scan(1) and method.needs_scan(2)
    with pytest.raises(MethodError, match="scan"):
        method.training_step(next(iter(batches())), 2, 0)
    run_epoch(method, batches, 2)
    for sel in method.selected:
        per_class = [int((sel & (data["label"] == j)).sum()) for j in range(K)]
        assert per_class == [math.ceil(0.5 * n / K)] * K
    assert not torch.equal(method.selected[0], method.selected[1])  # each network its own


def test_promix_trains_a_batch_norm_network_when_a_single_row_of_a_batch_is_chosen():
    """A batch whose chosen set is one row (seen at 32 px, seed 1): its mixup term is 0 (a row
    mixed with itself is no mixup, and BatchNorm cannot train on one sample)."""

    class BNNet(TinyNet):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 64),
                                      nn.BatchNorm1d(64), nn.ReLU())

    torch.manual_seed(0)
    n = 30
    data = blobs(n, seed=5, noise_rate=0.3)
    cfg = {"epochs": 4, "pretrain_epochs": 1}
    method = build_method("promix", K, n, cfg, BNNet, 1e-2)
    run_epoch(method, loader(data, 10), 1)
    for net in method.models():
        net.train()
        one = data["image"][:1]
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            net(one)  # what the step used to do
        assert float(method._mixup_loss(net, one, F.one_hot(data["label"][:1], K).float(),
                                        method.pi[0], "primary")) == 0.0


def test_promix_pseudo_head_needs_features_and_head():
    with pytest.raises(MethodError, match="pseudo head"):
        build_method("promix", K, 4, {"epochs": 2}, lambda: nn.Linear(4, K), 1e-3)
    method = build_method("promix", K, 4, {"epochs": 2, "pseudo_head": False},
                          lambda: nn.Linear(4, K), 1e-3)
    assert method.models()[0].pseudo_head is None


# ------------------------------------------------------------------ all methods

SMALL_CFG = {
    "standard": {},
    "small_loss": {"noise_rate": 0.3, "num_gradual": 2},
    "elr_plus": {"ema_step": 20},
    "proselflc": {"epochs": 4, "burn_in_epochs": 1},
    "promix": {"epochs": 4, "pretrain_epochs": 1, "rampup_epochs": 2, "lga_epochs": 2},
}


def _train(name: str, seed: int, epochs: range, method=None):
    data = blobs(90, seed=6, noise_rate=0.3)
    torch.manual_seed(seed)
    if method is None:
        method = build_method(name, K, 90, SMALL_CFG[name], lambda: TinyNet(16), 1e-2)
    for epoch in epochs:
        run_epoch(method, loader(data, 30), epoch)
    return method


def _params(method) -> list[torch.Tensor]:
    return [p.detach().clone() for m in method.models() for p in m.parameters()]


def test_every_method_is_registered_and_follows_the_protocol():
    assert set(METHODS) == set(SMALL_CFG)
    for name in METHODS:
        method = build_method(name, K, 10, SMALL_CFG[name], TinyNet, 1e-3)
        assert isinstance(method, NoisyLabelMethod) and method.name == name
        assert len(method.models()) == (1 if name in ("standard", "proselflc") else 2)


@pytest.mark.parametrize("name", list(SMALL_CFG))
def test_deterministic_given_the_seed(name):
    a, b = _train(name, 3, range(1, 4)), _train(name, 3, range(1, 4))
    c = _train(name, 4, range(1, 4))
    for pa, pb in zip(_params(a), _params(b), strict=True):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(_params(a), _params(c), strict=True))


@pytest.mark.parametrize("name", list(SMALL_CFG))
def test_state_dict_round_trip_resumes_exactly(name):
    original = _train(name, 0, range(1, 3))
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    torch.manual_seed(99)  # a differently initialised method, then the state loaded into it
    resumed = build_method(name, K, 90, SMALL_CFG[name], lambda: TinyNet(16), 1e-2)
    resumed.load_state_dict(state)
    for pa, pb in zip(_params(original), _params(resumed), strict=True):
        assert torch.equal(pa, pb)
    _train(name, 7, range(3, 5), original)  # epochs 3-4 continue identically from the state
    _train(name, 7, range(3, 5), resumed)
    for pa, pb in zip(_params(original), _params(resumed), strict=True):
        assert torch.equal(pa, pb)
    other = "standard" if name != "standard" else "proselflc"
    with pytest.raises(MethodError):
        build_method(other, K, 90, SMALL_CFG[other], lambda: TinyNet(16), 1e-2) \
            .load_state_dict(state)


def test_set_lr_reaches_every_optimizer():
    for name in METHODS:
        method = build_method(name, K, 10, SMALL_CFG[name], TinyNet, 1e-3)
        method.set_lr(0.123)
        groups = [g for opt in method._optimizers for g in opt.param_groups]
        assert groups and all(g["lr"] == 0.123 for g in groups)


def test_configuration_errors_are_loud():
    with pytest.raises(MethodError, match="unknown method"):
        build_method("mentornet", K, 10, {}, TinyNet, 1e-3)
    with pytest.raises(MethodError, match="unknown config keys"):
        build_method("elr_plus", K, 10, {"lamda": 3.0}, TinyNet, 1e-3)
    with pytest.raises(MethodError, match="forget_rate"):
        build_method("small_loss", K, 10, {}, TinyNet, 1e-3)
    with pytest.raises(MethodError, match="epochs"):
        build_method("proselflc", K, 10, {}, TinyNet, 1e-3)
    data = blobs(6, seed=0)
    no_index = {"image": data["image"], "label": data["label"]}
    with pytest.raises(MethodError, match="index"):
        build_method("elr_plus", K, 6, {}, TinyNet, 1e-3).training_step(no_index, 1, 0)
    bad_label = {"image": data["image"], "label": data["label"] + K}
    with pytest.raises(MethodError, match="labels"):
        build_method("standard", K, 6, {}, TinyNet, 1e-3).training_step(bad_label, 1, 0)

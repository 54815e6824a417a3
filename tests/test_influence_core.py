"""Stage-3 core: per-sample gradient norms and TracIn self-influence are exact (against a
per-sample loop and Captum TracInCP), independent of the batch, and fail clearly on bad input;
detection metrics match hand-computed and sklearn values.

Exactness checks run in float64: in float32 a ReLU input within ~1e-7 of zero can change sign
between a batched and a single-sample forward, which legitimately moves one sample's gradient.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from diffinf_ray.influence.detection import (
    auroc,
    detection_report,
    flag_top_fraction,
    precision_at_k,
    precision_recall,
)
from diffinf_ray.influence.grad_norms import (
    GradNormError,
    SelfInfluenceScorer,
    compute_grad_sq_norms,
    per_sample_grad_sq_norms,
    self_influence_scores,
)
from diffinf_ray.models.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    checkpoint_dir_name,
    load_into,
    parse,
    to_bytes,
)
from diffinf_ray.models.classifier import build_classifier

RES, BATCH, CLASSES = 32, 6, 3
LRS = (1e-3, 5e-4, 1e-4)


def random_classifier(seed: int, num_classes: int = CLASSES) -> nn.Module:
    """Random ResNet-18 classifier with non-trivial BN running stats and affine parameters."""
    torch.manual_seed(seed)
    model = build_classifier(num_classes).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, RES, RES) * 1.5 + 0.3)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    return model.eval()


def naive_norms(model: nn.Module, images, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward/backward per sample in eval mode: (B,) totals and {module: (B,)} shares."""
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for i in range(images.shape[0]):
        loss = F.cross_entropy(model(images[i:i + 1]), labels[i:i + 1])
        grads = torch.autograd.grad(loss, list(params.values()))
        rows.append({n: g.pow(2).sum() for n, g in zip(params, grads, strict=True)})
    per_module: dict[str, torch.Tensor] = {}
    for name in params:
        module = name.rsplit(".", 1)[0]
        column = torch.stack([row[name] for row in rows])
        per_module[module] = per_module.get(module, 0) + column
    return torch.stack([sum(row.values()) for row in rows]), per_module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small single-sample kernels gain nothing from a second thread on a shared 2-core box,
    and OpenMP barriers stall when other jobs hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    images = (torch.rand(BATCH, 3, RES, RES) * 2 - 1).double()
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    return images, labels


@pytest.fixture(scope="module")
def models():
    return [random_classifier(seed).double() for seed in (10, 11, 12)]


@pytest.fixture(scope="module")
def naive(models, batch):
    """Per-sample loop for the first two checkpoints (float64 on CPU is slow)."""
    return [naive_norms(m, *batch) for m in models[:2]]


def assert_close(actual, expected, rtol):
    actual = torch.as_tensor(np.asarray(actual), dtype=torch.float64)
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    rel = ((actual - expected).abs() / expected.abs()).max().item()
    assert rel <= rtol, f"max relative difference {rel:.2e} > {rtol:.0e}"


def test_scores_equal_per_sample_loop_over_all_parameters(models, batch, naive):
    lrs = LRS[:2]
    scores, per_ckpt = self_influence_scores(
        list(zip(models[:2], lrs, strict=True)), *batch, per_checkpoint=True
    )
    expected = sum(lr * totals for lr, (totals, _) in zip(lrs, naive, strict=True))
    assert per_ckpt.shape == (BATCH, 2)
    assert_close(scores, expected, 1e-6)
    for t, (totals, _) in enumerate(naive):
        assert_close(per_ckpt[:, t], totals, 1e-6)


def test_state_dicts_load_into_the_given_model(models, batch):
    pairs = [(m.state_dict(), lr) for m, lr in zip(models[:2], LRS, strict=False)]
    holder = build_classifier(CLASSES).double()
    from_states = self_influence_scores(pairs, *batch, model=holder)
    from_models = self_influence_scores(list(zip(models[:2], LRS, strict=False)), *batch)
    assert_close(from_states, from_models, 1e-12)
    with pytest.raises(GradNormError, match="pass `model=`"):
        self_influence_scores(pairs, *batch)
    with pytest.raises(GradNormError, match="learning rate must be > 0"):
        self_influence_scores([(models[0], 0.0)], *batch)


def test_per_layer_norms_sum_to_total_and_match_each_module(models, batch, naive):
    result = compute_grad_sq_norms(models[0], *batch)
    _, expected = naive[0]
    assert set(result.per_layer) == set(expected)  # every parameterised module, none dropped
    assert_close(sum(result.per_layer.values()), result.sq_norms, 1e-9)
    for name, column in expected.items():
        assert_close(result.per_layer[name], column, 1e-6)
    assert result.losses.shape == (BATCH,)


def test_both_conv_branches_run_and_agree(models, batch, naive):
    auto = compute_grad_sq_norms(models[1], *batch)
    # 32 px: the stem conv (T = 16 x 16) materialises, the later convs use ghost norms
    assert auto.conv_branches["backbone.conv1"] == "materialize"
    assert auto.conv_branches["backbone.layer4.1.conv2"] == "ghost"
    assert len(auto.conv_branches) == 20  # all ResNet-18 convs
    totals, _ = naive[1]
    for mode in ("ghost", "materialize"):
        forced = compute_grad_sq_norms(models[1], *batch, conv_mode=mode)
        assert set(forced.conv_branches.values()) == {mode}
        assert_close(forced.sq_norms, totals, 1e-6)


def test_scores_equal_captum_tracincp(models, batch, tmp_path):
    """float32, and Captum's batch = ours, so both see the same forward numerics."""
    from captum.influence import TracInCP

    images, labels = batch[0].float(), batch[1]
    fp32 = [copy.deepcopy(m).float() for m in models]
    paths = []
    for t, (model, lr) in enumerate(zip(fp32, LRS, strict=True)):
        path = tmp_path / f"ckpt_{t}.pt"
        path.write_bytes(to_bytes({"model_state": model.state_dict(), "epoch": t + 1,
                                   "learning_rate": lr, "architecture": model.architecture()}))
        paths.append(str(path))

    def load(net: nn.Module, path: str) -> float:  # the real learning rate, not Captum's 1.0
        ckpt = parse(open(path, "rb").read(), path)
        load_into(net, ckpt)
        net.eval()
        return ckpt.learning_rate

    tracin = TracInCP(
        build_classifier(CLASSES).eval(), torch.utils.data.TensorDataset(images, labels), paths,
        checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(reduction="none"),
        sample_wise_grads_per_batch=False, batch_size=BATCH,
    )
    reference = tracin.self_influence(outer_loop_by_checkpoints=True)
    ours = self_influence_scores(list(zip(fp32, LRS, strict=True)), images, labels)
    assert_close(ours, reference, 1e-4)


def test_scores_do_not_depend_on_batch_composition(models, batch):
    images, labels = batch
    full = per_sample_grad_sq_norms(models[2], images, labels)
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    assert_close(per_sample_grad_sq_norms(models[2], images[perm], labels[perm]), full[perm], 1e-9)
    halves = torch.cat([per_sample_grad_sq_norms(models[2], images[s], labels[s])
                        for s in (slice(0, 2), slice(2, 6))])
    assert_close(halves, full, 1e-9)
    assert_close(per_sample_grad_sq_norms(models[2], images[3:4], labels[3:4]), full[3:4], 1e-9)


def test_layer_selection_restricts_the_parameters(models, batch):
    model = models[0]
    head, per_layer = per_sample_grad_sq_norms(model, *batch, layers=["head"], per_layer=True)
    assert set(per_layer) == {"head.0", "head.2"}
    head_params = [p for n, p in model.named_parameters() if n.startswith("head.")]
    expected = []
    for i in range(BATCH):
        loss = F.cross_entropy(model(batch[0][i:i + 1]), batch[1][i:i + 1])
        expected.append(sum(g.pow(2).sum() for g in torch.autograd.grad(loss, head_params)))
    assert_close(head, torch.stack(expected), 1e-6)
    last = compute_grad_sq_norms(model, *batch, layers=["backbone.layer4", "head"])
    full = compute_grad_sq_norms(model, *batch)
    assert len(last.per_layer) == 12  # 5 convs + 5 BNs of layer4, 2 head linears
    for name, column in last.per_layer.items():
        assert_close(column, full.per_layer[name], 1e-9)


class ToyNet(nn.Module):
    """Strides, padding, dilation, 'same'/'valid' padding, a frozen parameter, a sequence
    Linear and BatchNorm1d: the layer cases ResNet-18 does not exercise."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(4, 5, (3, 2), padding="same", dilation=(2, 1))
        self.conv_c = nn.Conv2d(5, 6, 2, stride=(1, 2), padding="valid", bias=False)
        self.seq = nn.Linear(6, 7)
        self.bn_b = nn.BatchNorm1d(7)
        self.out = nn.Linear(7, CLASSES)
        self.conv_b.bias.requires_grad_(False)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.conv_a(x)))
        x = torch.tanh(self.conv_c(torch.relu(self.conv_b(x))))
        x = torch.relu(self.seq(x.flatten(2).transpose(1, 2))).mean(1)  # (B, T, 6) -> (B, 7)
        return self.out(self.bn_b(x))


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # the asymmetric padding is the point
def test_toy_layers_match_per_sample_loop_in_both_branches():
    torch.manual_seed(3)
    model = ToyNet().double().train()
    with torch.no_grad():
        model(torch.randn(16, 3, 13, 11, dtype=torch.float64) + 0.5)
        model.bn_a.weight.uniform_(0.5, 1.5)
        model.bn_b.bias.normal_(0.0, 0.3)
    model.eval()
    images = torch.randn(5, 3, 13, 11, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0])
    totals, per_module = naive_norms(model, images, labels)
    for mode in ("ghost", "materialize"):
        result = compute_grad_sq_norms(model, images, labels, conv_mode=mode)
        assert set(result.conv_branches) == {"conv_a", "conv_b", "conv_c", "seq"}
        assert_close(result.sq_norms, totals, 1e-8)
        for name, column in per_module.items():
            assert_close(result.per_layer[name], column, 1e-8)


@pytest.mark.parametrize("bad, message", [
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(),
                           nn.LazyLinear(3)), r"'1' \(GroupNorm\)"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.Conv2d(4, 4, 3, groups=2),
                           nn.Flatten(), nn.LazyLinear(3)), "groups=2"),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                           nn.Flatten(), nn.LazyLinear(3)), "batch statistics"),
])
def test_unsupported_models_raise_clearly(bad, message):
    model = bad()
    model(torch.randn(2, 3, 8, 8))  # materialise the lazy layer
    with pytest.raises(GradNormError, match=message):
        per_sample_grad_sq_norms(model, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))


class Detached(nn.Module):
    """Input preprocessing outside autograd, then a linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.detach() * 2.0)))


class SideBranch(nn.Module):
    """`side` sees the input only through a detached path, so it is not upstream of `main`'s input."""

    def __init__(self):
        super().__init__()
        self.main = nn.Linear(4, 3)
        self.side = nn.Linear(4, 3)

    def forward(self, x):
        return self.main(x) + self.side(x.detach())


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


def test_models_with_detached_inputs_or_custom_layers():
    torch.manual_seed(4)
    images, labels = torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    model = Detached().double()
    assert_close(per_sample_grad_sq_norms(model, images, labels), naive_norms(model, images, labels)[0],
                 1e-10)
    # the first layer's output is changed in place (by ReLU): the backward stops at its input
    inplace = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    assert_close(per_sample_grad_sq_norms(inplace, images, labels),
                 naive_norms(inplace, images, labels)[0], 1e-10)
    with pytest.raises(GradNormError, match=r"\['side'\] are not between the loss"):
        per_sample_grad_sq_norms(SideBranch(), images.float(), labels)
    with pytest.raises(GradNormError, match="ScaledLinear"):
        per_sample_grad_sq_norms(ScaledLinear(4, 3), images.float(), labels)


def test_reused_layer_and_bad_selection_raise():
    shared = nn.Linear(4, 4)
    reused = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(GradNormError, match="ran twice"):
        per_sample_grad_sq_norms(reused, torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(GradNormError, match="unknown layer"):
        per_sample_grad_sq_norms(nn.Linear(4, 3), torch.randn(3, 4), torch.tensor([0, 1, 2]),
                                 layers=["fc"])


# -- the scorer on saved checkpoints -------------------------------------------------------------


def save_checkpoint(root, epoch: int, model: nn.Module, lr: float | None):
    raw = {"model_state": model.state_dict(), "epoch": epoch, "architecture": model.architecture()}
    if lr is not None:
        raw["learning_rate"] = lr
    path = root / checkpoint_dir_name(epoch) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(to_bytes(raw))
    return path


def test_scorer_loads_checkpoints_in_epoch_order_and_weights_by_learning_rate(models, batch, tmp_path):
    root = tmp_path / "checkpoints"
    fp32 = [copy.deepcopy(m).float() for m in models]
    for epoch, (model, lr) in reversed(list(enumerate(zip(fp32, LRS, strict=True), start=1))):
        save_checkpoint(root, epoch, model, lr)
    images, labels = batch[0].float(), batch[1]
    norms = [per_sample_grad_sq_norms(m, images, labels).double() for m in fp32]
    losses = F.cross_entropy(fp32[2](images), labels, reduction="none").detach()
    # last-layer TracIn's norms by plain autograd, one sample at a time: the output layer only
    last_layer = np.zeros((len(labels), 3))
    for t, m in enumerate(fp32):
        params = list(m.head[2].parameters())
        for i in range(len(labels)):
            loss = F.cross_entropy(m(images[i:i + 1]), labels[i:i + 1])
            last_layer[i, t] = sum(g.pow(2).sum().item()
                                   for g in torch.autograd.grad(loss, params))
    for keep_models in (True, False):
        scorer = SelfInfluenceScorer(str(root), device="cpu", keep_models=keep_models)
        out = scorer(images.numpy(), labels.numpy())
        assert out["score"].shape == (BATCH,) and out["per_checkpoint"].shape == (BATCH, 3)
        for t in range(3):
            assert_close(out["per_checkpoint"][:, t], norms[t], 1e-6)
        assert_close(out["score"], sum(lr * n for lr, n in zip(LRS, norms, strict=True)), 1e-6)
        np.testing.assert_allclose(out["loss"][:, 2], losses.numpy(), rtol=1e-5)
        np.testing.assert_allclose(out["per_checkpoint_last"], last_layer, rtol=1e-5)
        # the margin: the label's logit minus the largest other one
        logits = fp32[1](images).detach().numpy()
        others = np.where(np.eye(logits.shape[1], dtype=bool)[labels.numpy()], -np.inf, logits)
        np.testing.assert_allclose(out["margin"][:, 1],
                                   logits[np.arange(len(labels)), labels.numpy()]
                                   - others.max(1), rtol=1e-5, atol=1e-6)
    assert scorer.epochs == [1, 2, 3]
    assert scorer.learning_rates.tolist() == list(LRS)


def test_scorer_names_a_checkpoint_without_learning_rate(models, tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, models[0], 1e-4)
    bad = save_checkpoint(root, 2, models[1], None)
    with pytest.raises(CheckpointError, match="learning_rate") as err:
        SelfInfluenceScorer(str(root), device="cpu")
    assert str(bad) in str(err.value)


def test_scorer_names_a_checkpoint_of_another_architecture(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, build_classifier(CLASSES), 1e-4)
    bad = save_checkpoint(root, 2, build_classifier(CLASSES + 1), 1e-4)
    with pytest.raises(CheckpointError, match="architecture") as err:
        SelfInfluenceScorer(str(root), device="cpu")
    assert str(bad) in str(err.value)


def test_empty_or_mismatched_batch_is_a_clear_error(models, tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, models[0], 1e-4)
    scorer = SelfInfluenceScorer(str(root), device="cpu")
    with pytest.raises(GradNormError, match="empty batch"):
        scorer(torch.zeros(0, 3, RES, RES), torch.zeros(0, dtype=torch.long))
    with pytest.raises(GradNormError, match="labels must have shape"):
        scorer(torch.zeros(2, 3, RES, RES), torch.zeros(3, dtype=torch.long))
    with pytest.raises(GradNormError, match="out of range"):
        scorer(torch.zeros(2, 3, RES, RES), torch.tensor([0, CLASSES]))


# -- detection metrics ---------------------------------------------------------------------------

SCORES = np.array([0.1, 0.9, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8, 0.6, 0.4])
CORRUPT = np.array([0, 1, 0, 0, 1, 1, 0, 1, 0, 0], dtype=bool)


def test_flag_top_fraction_breaks_ties_by_index_and_respects_classes():
    assert np.flatnonzero(flag_top_fraction(SCORES, 0.3)).tolist() == [1, 3, 7]
    assert np.flatnonzero(flag_top_fraction(SCORES, 0.1)).tolist() == [1]  # tie 1 vs 3: index
    assert not flag_top_fraction(SCORES, 0.0).any()
    assert flag_top_fraction(SCORES, 1.0).all()
    labels = np.array([0] * 5 + [1] * 5)
    per_class = flag_top_fraction(SCORES, 0.4, labels=labels, per_class=True)
    assert np.flatnonzero(per_class).tolist() == [1, 3, 5, 7]
    with pytest.raises(ValueError, match="needs labels"):
        flag_top_fraction(SCORES, 0.1, per_class=True)
    with pytest.raises(ValueError, match="tau"):
        flag_top_fraction(SCORES, 1.5)


def test_detection_metrics_match_hand_and_sklearn_values():
    flagged = flag_top_fraction(SCORES, 0.3)  # samples 1, 3, 7: two of them corrupted
    assert precision_recall(flagged, CORRUPT) == pytest.approx((2 / 3, 2 / 4))
    # Mann-Whitney by hand: pairs (corrupted, clean) ranked correctly, ties count one half
    pos, neg = SCORES[CORRUPT], SCORES[~CORRUPT]
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert auroc(SCORES, CORRUPT) == pytest.approx(np.mean(pairs))
    assert auroc(SCORES, CORRUPT) == pytest.approx(roc_auc_score(CORRUPT, SCORES))
    # ranking 1, 3, 7, 5, 8, 2, 9, 4, 6, 0 -> corrupted 1, 0, 1, 1, 0, ...
    assert precision_at_k(SCORES, CORRUPT, [1, 2, 4, 10]).tolist() == pytest.approx(
        [1.0, 0.5, 0.75, 0.4])
    report = detection_report(SCORES, CORRUPT, tau=0.3)
    assert report["n_flagged"] == 3 and report["n_corrupted"] == 4
    assert report["precision_at_k"]["k"] == [1, 2, 3, 5]
    assert np.isnan(precision_recall(np.zeros(10, bool), CORRUPT)[0])
    assert np.isnan(auroc(SCORES, np.zeros(10, bool)))

"""The fairness cores (diffinf_ray/fairness/): group metrics against scikit-learn, Group-DRO's
weight update against a hand-computed case, inverse-frequency weights, the balanced sampler,
and the methods' training steps on a tiny network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from torch import nn

from diffinf_ray.baselines.base import MethodError
from diffinf_ray.config import TrainSection
from diffinf_ray.fairness.group_dro import GroupDROLoss, group_mean_losses
from diffinf_ray.fairness.methods import METHODS, build_method
from diffinf_ray.fairness.metrics import group_accuracy, per_group_table
from diffinf_ray.fairness.reweighting import balanced_epoch, inverse_frequency_weights
from diffinf_ray.fairness.training import fit_local, group_index, group_names, predict
from diffinf_ray.render import markdown_to_html

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_group_accuracy_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    pred = np.where(rng.random(500) < 0.7, y, rng.integers(0, 3, 500))
    groups = rng.choice(["a", "b", "c", "d"], 500, p=[0.5, 0.3, 0.15, 0.05])
    m = group_accuracy(y, pred, groups)
    assert m["accuracy"] == pytest.approx(100 * accuracy_score(y, pred))
    per = {g: 100 * accuracy_score(y[groups == g], pred[groups == g]) for g in "abcd"}
    for g, acc in per.items():
        assert m["per_group"][g] == {"n": int((groups == g).sum()), "accuracy": pytest.approx(acc)}
    assert m["worst_group_accuracy"] == pytest.approx(min(per.values()))
    assert m["worst_group"] == min(per, key=per.get)
    # with one group per class, the mean group accuracy is sklearn's balanced accuracy
    by_class = group_accuracy(y, pred, y.astype(str))
    assert by_class["mean_group_accuracy"] == pytest.approx(100 * balanced_accuracy_score(y, pred))
    table = per_group_table({"erm": m, "dro": m})
    assert table.count("\n") == 5 and "| d |" in table
    # a fairness group "<class>|<value>" stays one cell of the table and of its HTML page
    cell = group_accuracy(y, pred, np.char.add(groups.astype(str), "|tone"))
    html = markdown_to_html(per_group_table({"erm": cell}), "t")
    assert html.count("<tr>") == 5 and "<tr><td>a|tone</td>" in html
    assert all(row.count("<td>") == 3 for row in html.split("<tr>")[1:])
    with pytest.raises(ValueError):
        group_accuracy([], [], [])


def test_group_dro_weight_update_hand_computed():
    # three groups, losses (1, 2, 0.5), eta = 0.1, q0 = 1/3 each:
    # q1 = (e^0.1, e^0.2, e^0.05) / (1.105171 + 1.221403 + 1.051271 = 3.377845)
    dro = GroupDROLoss([10, 20, 40], step_size=0.1)
    q = dro.update(torch.tensor([1.0, 2.0, 0.5]))
    assert q.tolist() == pytest.approx([0.327182, 0.361592, 0.311225], abs=1e-6)
    # the robust loss from per-sample losses: group means (1, 2, 0.5) weighted by the new q
    dro = GroupDROLoss([10, 20, 40], step_size=0.1)
    per_sample = torch.tensor([0.5, 1.5, 2.0, 0.5])
    groups = torch.tensor([0, 0, 1, 2])
    loss = dro(per_sample, groups)
    assert float(loss) == pytest.approx(0.327182 * 1 + 0.361592 * 2 + 0.311225 * 0.5, abs=1e-5)
    # with the group adjustment C / sqrt(n_g), C = 1: q2 = q1 * exp(0.1 (l + 1/sqrt(n)))
    dro.adjustment = 1.0
    q2 = dro.update(torch.tensor([1.0, 2.0, 0.5]))
    assert q2.tolist() == pytest.approx([0.322499, 0.390270, 0.287231], abs=1e-6)
    # a group absent from the batch has loss 0 there (as in the official code)
    means, counts = group_mean_losses(torch.tensor([1.0, 3.0]), torch.tensor([0, 0]), 3)
    assert means.tolist() == [2.0, 0.0, 0.0] and counts.tolist() == [2.0, 0.0, 0.0]
    with pytest.raises(MethodError):
        GroupDROLoss([5, 0])


def test_inverse_frequency_weights_and_balanced_epoch():
    w = inverse_frequency_weights([90, 10, 0])
    assert w.tolist() == pytest.approx([100 / 180, 5.0, 0.0])
    assert float((w[:2] * np.array([90, 10])).sum()) / 100 == pytest.approx(1.0)
    groups = np.array(["a"] * 30 + ["b"] * 5 + ["c"] * 2)
    rows = balanced_epoch(groups, np.random.default_rng(0))
    assert set(range(37)) <= set(rows.tolist())  # every row at least once
    names, counts = np.unique(groups[rows], return_counts=True)
    assert names.tolist() == ["a", "b", "c"] and counts.tolist() == [30, 30, 30]


class Tiny(nn.Module):
    def __init__(self, num_classes=2):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, num_classes))

    def forward(self, x):
        return self.net(x)


def _data(n=80, seed=0):
    """Class = sign of the first pixel; a minority group of 10 %."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g)
    y = (x[:, 0, 0, 0] > 0).long().numpy()
    groups = np.array(["maj"] * (n - n // 10) + ["min"] * (n // 10))
    return x, y, groups


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_train_predict_and_keep_state(name):
    x, y, groups = _data()
    names = group_names(groups)
    gi = group_index(groups, names)
    counts = np.bincount(gi).tolist()
    torch.manual_seed(0)
    method = build_method(name, 2, counts, {}, lambda: Tiny(), lr=0.05)
    history = fit_local(method, x, y, gi, TrainSection(epochs=3, batch_size=16, augment=False,
                                                      lr=0.05), seed=0)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    acc = (predict(method.eval_model(), x) == y).mean()
    assert acc > 0.8
    state = method.state_dict()
    again = build_method(name, 2, counts, {}, lambda: Tiny(), lr=0.05)
    again.load_state_dict(state)
    if name == "group_dro":  # the online weights are part of the state, and moved off uniform
        assert not torch.allclose(again.robust.q, torch.full((2,), 0.5))
        assert torch.allclose(again.robust.q, method.robust.q)
        assert method.config["weight_decay"] == 1e-2  # strong L2 by default
    with pytest.raises(MethodError, match="group"):
        method.training_step({"image": x[:4], "label": torch.as_tensor(y[:4])}, 1, 0)


def test_reweight_loss_is_the_weighted_mean():
    x, y, groups = _data()
    gi = torch.as_tensor(group_index(groups, group_names(groups)))
    counts = np.bincount(gi.numpy()).tolist()
    method = build_method("reweight", 2, counts, {}, lambda: Tiny(), lr=0.05)
    per_sample = torch.arange(len(gi), dtype=torch.float32)
    w = torch.as_tensor(inverse_frequency_weights(counts), dtype=torch.float32)[gi]
    assert float(method._loss(per_sample, gi)) == pytest.approx(float((w * per_sample).mean()))
    with pytest.raises(ValueError, match="not among"):
        group_index(["maj", "other"], ["maj", "min"])
    with pytest.raises(MethodError, match="unknown fairness method"):
        build_method("nope", 2, counts, {}, lambda: Tiny(), lr=0.05)


def test_selection_takes_the_best_validation_worst_group_and_never_the_test():
    from diffinf_ray.fairness.report import selected_results, summary_rows

    def cell(method, seed, val_worst, test_worst):
        return {"method": method, "severity": 0.9, "seed": seed,
                "val": {"worst_group_accuracy": val_worst, "accuracy": 50.0},
                "test": {"worst_group_accuracy": test_worst, "accuracy": 60.0 + seed}}

    results = [cell("erm", 0, 10.0, 11.0), cell("dro_a", 0, 30.0, 5.0), cell("dro_b", 0, 20.0, 90.0),
               cell("erm", 1, 10.0, 12.0), cell("dro_a", 1, 25.0, 7.0), cell("dro_b", 1, 25.0, 80.0)]
    chosen = selected_results(results, {"dro_val": ["dro_a", "dro_b"]})
    # seed 0: dro_a's validation is better though its test is worse; seed 1: a tie, the first
    assert [(r["seed"], r["selected"], r["test"]["worst_group_accuracy"]) for r in chosen] == [
        (0, "dro_a", 5.0), (1, "dro_a", 7.0)]
    assert all(r["method"] == "dro_val" for r in chosen)
    row = next(r for r in summary_rows(results + chosen) if r["method"] == "dro_val")
    assert row["worst_group_accuracy_mean"] == 6.0
    assert row["worst_group_accuracy_diff_mean"] == pytest.approx(-5.5)  # paired with erm
    assert selected_results(results, {}) == []

"""The label-sensitivity diagnostic (diffae/label_sensitivity.py) and the partial inversion it
can use (NoiseSchedule.inversion_steps / sampling_steps with a depth)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffinf_ray.diffae.autoencoder import decode, invert
from diffinf_ray.diffae.family import build_family
from diffinf_ray.diffae.label_sensitivity import (
    _confusion,
    format_label_sensitivity,
    label_sensitivity,
    quantise,
)
from diffinf_ray.diffae.schedule import NoiseSchedule


def _tiny_labelled(num_classes: int = 3, seed: int = 0):
    model = build_family("tiny", num_classes=num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero everywhere: the official init zeroes the output convs
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _images(n: int = 6):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1


# -- partial inversion ------------------------------------------------------------------------

def test_partial_loops_are_the_ends_of_the_full_loops():
    schedule = NoiseSchedule.linear()
    full_inv, full_dec = list(schedule.inversion_steps(10)), list(schedule.sampling_steps(10))
    inv, dec = list(schedule.inversion_steps(10, 4)), list(schedule.sampling_steps(10, 4))
    assert inv == full_inv[:4]
    assert dec == full_dec[-5:]
    # the decode starts at the level where the partial inversion stopped, and ends at abar = 1
    assert dec[0].abar_from == inv[-1].abar_to
    assert dec[-1].abar_to == 1.0
    for bad in (0, 10, 11):
        with pytest.raises(ValueError, match="depth must be in"):
            list(schedule.inversion_steps(10, bad))


@torch.no_grad()
def test_a_shallower_inversion_keeps_more_of_the_image_under_another_label():
    model, x = _tiny_labelled(), _images(4)
    z = model.encode(x)
    source, target = torch.zeros(4, dtype=torch.long), torch.full((4,), 2, dtype=torch.long)
    errors = []
    for depth in (2, None):
        x_T = invert(model, x, z, source, 10, checkpoint=False, depth=depth)
        rec = decode(model, z, x_T, target, 10, checkpoint=False, depth=depth)
        errors.append(float(((rec - x) ** 2).mean()))
    assert errors[0] < errors[1]


# -- the diagnostic ---------------------------------------------------------------------------

def test_confusion_rows_are_shares_per_given_label():
    given = np.array([0, 0, 1, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0])
    assert _confusion(given, predicted, 3) == [[0.5, 0.5, 0.0], [0.0, 0.6667, 0.3333],
                                               [1.0, 0.0, 0.0]]


def test_quantise_matches_an_8_bit_round_trip():
    x = torch.tensor([-1.5, -1.0, -0.2001, 0.0, 0.9999, 1.2])
    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round()
    assert torch.equal(quantise(x), u8 / 127.5 - 1)


def test_a_label_blind_oracle_agrees_with_a_third_of_the_labels():
    """An oracle that always answers class 0 agrees with decode label 0 only: agreement 1/3 at
    every scale and depth, and the tables say so."""
    model, x = _tiny_labelled(), _images(6)
    truth = np.array([0, 1, 2, 0, 1, 2])
    calls = []

    def always_zero(images):
        calls.append(images.shape[0])
        return np.zeros(len(images), dtype=np.int64)

    result = label_sensitivity(model, x, truth, always_zero, 3, scales=(1.0, 3.0), steps=4,
                               depths=(None, 2), batch_size=4)
    assert result["oracle_on_originals"] == pytest.approx(1 / 3)
    assert [r["depth"] for r in result["runs"]] == [None, 2]
    for run in result["runs"]:
        assert run["reconstruction"] == pytest.approx(1 / 3)
        for s in run["scales"]:
            assert s["confusion"] == [[1.0, 0.0, 0.0]] * 3
            assert s["agreement"] == pytest.approx(1 / 3)
            assert s["agreement_changed"] == pytest.approx(1 / 3)  # class 0 only, always
    # originals once; per depth the reconstructions and 3 labels x 2 scales, 6 images each
    assert calls == [6] + [6] * (1 + 3 * 2) * 2
    text = format_label_sensitivity(result, ["young", "middle", "old"])
    assert "partial inversion, depth 2" in text and "guidance 3: agreement 0.33" in text


def test_an_oracle_that_keeps_reading_the_original_moved_nothing():
    """An oracle that always reports each image's true class (the decodes changed nothing it can
    see) agrees with the decode label on the images already of that class, a third here, and on
    none of the images that had to change: agreement_changed 0."""
    model, x = _tiny_labelled(), _images(6)
    truth = np.array([0, 1, 2, 0, 1, 2])
    result = label_sensitivity(model, x, truth, lambda images: truth.copy(), 3, scales=(3.0,),
                               steps=3, batch_size=6)
    scale = result["runs"][0]["scales"][0]
    assert scale["agreement"] == pytest.approx(1 / 3, abs=1e-3)  # the table's 4 decimals
    assert scale["agreement_changed"] == 0.0
    assert "(0.00 where the true class is another)" in format_label_sensitivity(result)


def test_distance_to_the_original_is_split_by_true_and_other_labels():
    """mse_true_label: each image's decode under its own class against the image; mse_other_labels:
    the mean over the other classes. Recomputed here from the same inversion and decodes."""
    from diffinf_ray.diffae.label_sensitivity import _decode_all, _invert_all

    model, x = _tiny_labelled(), _images(6)
    truth = np.array([0, 1, 2, 2, 1, 0])
    result = label_sensitivity(model, x, truth, lambda im: np.zeros(len(im), np.int64), 3,
                               scales=(3.0,), steps=4, depths=(2,), batch_size=4)
    z, x_T = _invert_all(model, x, 4, 2, 4)
    dist = np.stack([((_decode_all(model, z, x_T, c, 4, 3.0, 2, 4) - x) ** 2)
                     .flatten(1).mean(1).numpy() for c in range(3)], 1)
    own = dist[np.arange(6), truth]
    scale = result["runs"][0]["scales"][0]
    assert scale["mse_true_label"] == pytest.approx(own.mean(), rel=1e-5)
    assert scale["mse_other_labels"] == pytest.approx((dist.sum(1) - own).mean() / 2, rel=1e-5)
    assert scale["mse_true_label"] != pytest.approx(scale["mse_other_labels"])
    assert "under its true label" in format_label_sensitivity(result)


def test_models_without_a_label_path_are_refused():
    with pytest.raises(ValueError, match="no label path"):
        label_sensitivity(build_family("tiny"), _images(2), np.zeros(2), lambda x: x, 3)
    with pytest.raises(ValueError, match="judge different tasks"):
        label_sensitivity(_tiny_labelled(2), _images(2), np.zeros(2), lambda x: x, 3)

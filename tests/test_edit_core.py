"""The Ray-free edit cores: the influence predictor h_w and the latent editor.

Tiny random-init networks at 32 px: the tests check the mechanics (gradients, stopping,
determinism, which latents move), not edit quality.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffinf_ray.config import EditSection
from diffinf_ray.diffae.autoencoder import DiffusionAutoencoder
from diffinf_ray.diffae.model import build_model
from diffinf_ray.edit.editor import EditSettings, LatentEditor, loss_weights_from_section
from diffinf_ray.edit.losses import EditLosses
from diffinf_ray.edit.predictor import (
    InfluencePredictor,
    fit_predictor,
    load_predictor,
    partition,
    save_predictor,
)
from diffinf_ray.models.classifier import AttributeClassifier
from diffinf_ray.storage import Location

NUM_CLASSES = 3
SIZE = 32

torch.set_num_threads(1)


# -- predictor ---------------------------------------------------------------------------------
def _synthetic_influence(n: int = 600, seed: int = 0):
    """Backbone-like features (ReLU of 8 latent factors mixed into 512 dims, plus noise);
    is_high depends on two factors and the label, and the top 20% are high."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(n, 8))
    mixing = rng.normal(size=(8, 512)) / np.sqrt(8)
    features = np.maximum(factors @ mixing, 0) + 0.1 * rng.normal(size=(n, 512))
    labels = rng.integers(0, NUM_CLASSES, size=n)
    score = factors[:, 0] - factors[:, 1] + 1.0 * (labels == 2) + 0.3 * rng.normal(size=n)
    return features.astype(np.float32), labels, score > np.quantile(score, 0.8)


def _fit_small(seed: int = 0):
    features, labels, is_high = _synthetic_influence()
    fit_mask = partition([f"img{i}" for i in range(len(labels))], 0.5, seed=3)
    model, report = fit_predictor(features, labels, is_high, fit_mask, NUM_CLASSES, hidden=32,
                                  epochs=20, lr=3e-3, batch_size=128, seed=seed)
    return model, report, features, labels


def test_predictor_learns_influence_from_features_and_generalises_to_heldout_rows():
    model, report, _, _ = _fit_small()
    assert report["heldout_auroc"] > 0.8, report
    assert report["fit_rows"] + report["heldout_rows"] == 600
    assert report["fit_positives"] > 0 and report["heldout_positives"] > 0
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_predictor_fit_is_deterministic_for_a_seed():
    a, _, features, labels = _fit_small(seed=1)
    b, _, _, _ = _fit_small(seed=1)
    x, y = torch.from_numpy(features[:50]), torch.from_numpy(labels[:50])
    assert torch.equal(a(x, y), b(x, y))


def test_partition_is_seeded_order_independent_and_near_the_fraction():
    ids = [f"sample-{i}" for i in range(2000)]
    mask = partition(ids, 0.3, seed=5)
    assert mask.dtype == bool and mask.shape == (2000,)
    assert abs(mask.mean() - 0.3) < 0.04
    assert np.array_equal(partition(ids[::-1], 0.3, seed=5), mask[::-1])
    assert np.array_equal(partition(ids[:100], 0.3, seed=5), mask[:100])
    assert not np.array_equal(partition(ids, 0.3, seed=6), mask)


def test_predictor_save_load_round_trip_gives_identical_outputs(tmp_path):
    model, report, features, labels = _fit_small()
    x, y = torch.from_numpy(features[:40]), torch.from_numpy(labels[:40])
    for target in (str(tmp_path / "local"), Location(str(tmp_path / "loc")).child("predictor")):
        save_predictor(model, target, report)
        loaded = load_predictor(target)
        assert isinstance(loaded, InfluencePredictor) and not loaded.training
        assert torch.equal(loaded.p_high(x, y), model.p_high(x, y))


# -- editor --------------------------------------------------------------------------------------
def _perceptual(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for LPIPS: squared distance of 4x-downsampled images."""
    return (F.avg_pool2d(a, 4) - F.avg_pool2d(b, 4)).pow(2).flatten(1).mean(dim=1)


def _make_editor(settings: EditSettings, num_classes: int = NUM_CLASSES, w_si: float = 1.0,
                 image_size: int = SIZE) -> LatentEditor:
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=num_classes, image_size=image_size)
    classifier = AttributeClassifier(NUM_CLASSES, head_hidden=16)
    predictor = InfluencePredictor(NUM_CLASSES, hidden=16)
    identity = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                             nn.Flatten(), nn.Linear(32, 16))
    parsing = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
    losses = EditLosses(identity, parsing, _perceptual)
    return LatentEditor(DiffusionAutoencoder(model), classifier, predictor, losses, w_si,
                        settings, device="cpu")


SETTINGS = EditSettings(optimize="both", iterations=3, lr=0.05, encode_steps=3, decode_steps=2,
                        stop_p_high=0.0, checkpoint=True, seed=0)


def _batch(n: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, SIZE, SIZE, generator=gen) * 1.6 - 0.8
    labels = torch.arange(n) % NUM_CLASSES
    return images, labels


@pytest.fixture(scope="module")
def editor() -> LatentEditor:
    return _make_editor(SETTINGS)


def test_edit_settings_mirror_the_config_section():
    section = EditSection(optimize="z", iterations=7, lr=0.1, stop_p_high=0.3,
                          loss_terms={"perc": 2.0})
    settings = EditSettings.from_section(section)
    assert (settings.optimize, settings.iterations, settings.lr, settings.stop_p_high) == (
        "z", 7, 0.1, 0.3)
    assert loss_weights_from_section(section).terms["perc"] == 2.0


@pytest.mark.parametrize("term", ["id", "struct", "perc", "pixel", "si"])
def test_every_loss_term_sends_gradient_to_both_latents(editor, term):
    images, labels = _batch(2)
    ref = editor.losses.reference(images)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, editor.autoencoder.model.config.z_dim, generator=gen).requires_grad_(True)
    x_T = torch.randn(2, 3, SIZE, SIZE, generator=gen).requires_grad_(True)
    _, terms = editor.objective(z, x_T, labels, ref)
    grad_z, grad_x_T = torch.autograd.grad(terms[term].sum(), [z, x_T])
    assert grad_z.abs().sum() > 0, f"{term}: no gradient reaches z"
    assert grad_x_T.abs().sum() > 0, f"{term}: no gradient reaches x_T"


def test_edit_lowers_the_total_loss_and_reports_every_output(editor):
    images, labels = _batch(3)
    out = editor.edit(images, labels)
    assert out["edited"].shape == (3, 3, SIZE, SIZE) and out["edited"].dtype == np.float32
    assert out["edited"].min() >= -1.0 and out["edited"].max() <= 1.0
    for key in ("loss_total", "loss_id", "loss_struct", "loss_perc", "loss_pixel", "loss_si",
                "p_high_before", "p_high_after", "reconstruction_mse", "iterations"):
        assert out[key].shape == (3,), key
    assert (out["iterations"] == SETTINGS.iterations).all()  # stop_p_high 0: nobody stops
    assert not out["stopped"].any()
    assert out["loss_total"].mean() < out["loss_total_initial"].mean()
    np.testing.assert_allclose(out["loss_si"], out["p_high_after"])


def test_same_seed_gives_identical_edits(editor):
    images, labels = _batch(2)
    first = editor.edit(images, labels)["edited"]
    second = editor.edit(images, labels)["edited"]
    assert np.array_equal(first, second)


def test_stop_p_high_one_stops_every_sample_at_its_reconstruction(editor):
    images, labels = _batch(3)
    stopping = dataclasses.replace(editor.settings, stop_p_high=1.0)
    out = _with_settings(editor, stopping).edit(images, labels)
    assert out["stopped"].all()
    assert (out["iterations"] == 0).all()  # judged on the reconstruction, no Adam step taken
    np.testing.assert_array_equal(out["loss_total"], out["loss_total_initial"])


def test_partial_stop_freezes_only_the_samples_below_the_threshold(editor):
    images, labels = _batch(3)
    # a threshold between the samples' initial p_high values stops some of them at once
    first_p = _with_settings(editor, dataclasses.replace(editor.settings, stop_p_high=1.0)).edit(
        images, labels)["p_high_after"]
    threshold = float(np.median(first_p))
    out = _with_settings(editor, dataclasses.replace(editor.settings, stop_p_high=threshold)).edit(
        images, labels)
    early = first_p < threshold
    assert early.any() and (out["iterations"][early] == 0).all()
    assert (out["p_high_after"][out["stopped"]] < threshold).all()
    assert (out["iterations"][~out["stopped"]] == SETTINGS.iterations).all()


def _with_settings(editor: LatentEditor, settings: EditSettings) -> LatentEditor:
    return LatentEditor(editor.autoencoder, editor.classifier, editor.predictor, editor.losses,
                        editor.w_si, settings, editor.device)


@pytest.mark.parametrize("optimize, moved, fixed", [("z", "z", "x_T"), ("xT", "x_T", "z")])
def test_optimize_moves_only_the_named_latent(editor, optimize, moved, fixed):
    images, labels = _batch(2)
    settings = dataclasses.replace(editor.settings, optimize=optimize, iterations=2)
    out = _with_settings(editor, settings).edit(images, labels, return_latents=True)
    assert np.array_equal(out[fixed], out[f"{fixed}_initial"])
    assert not np.allclose(out[moved], out[f"{moved}_initial"])


def test_unconditional_autoencoder_is_decoded_without_labels():
    editor = _make_editor(dataclasses.replace(SETTINGS, iterations=1), num_classes=0)
    assert not editor.conditional
    images, labels = _batch(2)
    out = editor.edit(images, labels)
    assert out["edited"].shape == (2, 3, SIZE, SIZE)


def test_images_of_the_wrong_size_are_refused(editor):
    with pytest.raises(ValueError, match="resize"):
        editor.edit(torch.zeros(1, 3, 64, 64), torch.zeros(1, dtype=torch.long))

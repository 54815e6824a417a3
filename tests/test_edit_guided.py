"""The gradient-free `guided` edit method, its class directions in z and the method registry.

Tiny random-init networks at 32 px (as tests/test_edit_core.py): the tests check the mechanics
(which image is decoded from where, determinism, selection), not edit quality.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffinf_ray.config import ConfigError, EditSection, load_config
from diffinf_ray.diffae.autoencoder import DiffusionAutoencoder, decode, invert
from diffinf_ray.diffae.labels import NULL_LABEL
from diffinf_ray.diffae.model import build_model
from diffinf_ray.edit.editor import EditSettings, LatentEditor
from diffinf_ray.edit.guided import (
    GuidedEditor,
    GuidedSettings,
    ZDirections,
    fit_class_directions,
)
from diffinf_ray.edit.losses import EditLosses
from diffinf_ray.edit.methods import EDIT_METHODS, EditorParts, edit_method
from diffinf_ray.edit.predictor import InfluencePredictor
from diffinf_ray.models.classifier import AttributeClassifier
from diffinf_ray.storage import Location

NUM_CLASSES = 3
SIZE = 32
STEPS = 4

torch.set_num_threads(1)


def _perceptual(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.avg_pool2d(a, 4) - F.avg_pool2d(b, 4)).pow(2).flatten(1).mean(dim=1)


def _parts(num_classes: int = NUM_CLASSES) -> EditorParts:
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=num_classes, image_size=SIZE)
    identity = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                             nn.Flatten(), nn.Linear(32, 16))
    parsing = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
    return EditorParts(DiffusionAutoencoder(model), AttributeClassifier(NUM_CLASSES, head_hidden=16),
                       InfluencePredictor(NUM_CLASSES, hidden=16),
                       EditLosses(identity, parsing, _perceptual), "cpu")


def _directions(z_dim: int, seed: int = 0) -> ZDirections:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(60, z_dim)).astype(np.float32)
    labels = np.arange(60) % NUM_CLASSES
    z[np.arange(60), labels] += 3.0  # class c sits along axis c
    return fit_class_directions(z, labels, NUM_CLASSES, seed=0)


def _editor(parts: EditorParts, settings: GuidedSettings) -> GuidedEditor:
    z_dim = parts.autoencoder.model.config.z_dim
    return GuidedEditor(parts.autoencoder, parts.classifier, parts.predictor, parts.losses,
                        w_si=1.0, settings=settings, directions=_directions(z_dim))


SETTINGS = GuidedSettings(t0=0.5, scale=3.0, candidates=3, alpha=0.3, steps=STEPS, seed=0)


@pytest.fixture(scope="module")
def parts() -> EditorParts:
    return _parts()


def _batch(n: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, SIZE, SIZE, generator=gen) * 1.6 - 0.8
    return images, torch.arange(n) % NUM_CLASSES


def test_output_keys_and_types_equal_the_latent_editors(parts):
    images, labels = _batch(2)
    latent = LatentEditor(parts.autoencoder, parts.classifier, parts.predictor, parts.losses,
                          1.0, EditSettings(iterations=1, steps=2), "cpu").edit(images, labels)
    guided = _editor(parts, SETTINGS).edit(images, labels)
    assert set(guided) == set(latent)
    for key, value in latent.items():
        assert guided[key].shape == value.shape and guided[key].dtype == value.dtype, key
    assert (guided["iterations"] == 0).all() and not guided["stopped"].any()
    assert guided["edited"].min() >= -1.0 and guided["edited"].max() <= 1.0
    np.testing.assert_array_equal(guided["loss_si"], guided["p_high_after"])


def _label_blind(parts: EditorParts) -> EditorParts:
    """The same networks, with every class's label embedding set to the null label's row: the
    decoder then cannot tell the assigned label from the null one."""
    model = copy.deepcopy(parts.autoencoder.model)
    with torch.no_grad():
        table = model.label_embed.weight
        table.copy_(table[NUM_CLASSES].expand_as(table))
    return dataclasses.replace(parts, autoencoder=DiffusionAutoencoder(model))


def test_smallest_depth_without_guidance_or_shift_is_the_null_label_reconstruction(parts):
    """scale 1, alpha 0, one candidate, depth 1: the decode of the null-label inversion one step
    deep under the assigned label, which (with a decoder blind to labels) is exactly the
    null-label reconstruction."""
    images, labels = _batch(3)
    settings = GuidedSettings(t0=0.01, scale=1.0, candidates=1, alpha=0.0, steps=STEPS)
    assert settings.depth == 1
    out = _editor(parts, settings).edit(images, labels, return_latents=True)
    model = parts.autoencoder.model
    with torch.no_grad():
        z = model.encode(images)
        null = torch.full_like(labels, NULL_LABEL)
        x_t0 = invert(model, images, z, null, STEPS, depth=1)
        recon = decode(model, z, x_t0, null, STEPS, depth=1)
        under_label = decode(model, z, x_t0, labels, STEPS, depth=1).clamp(-1, 1)
    np.testing.assert_array_equal(out["z_edit"], out["z"])  # alpha 0: z is not moved
    np.testing.assert_allclose(out["x_t0"], x_t0.numpy(), atol=1e-6)
    np.testing.assert_allclose(out["edited"], under_label.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["reconstruction_mse"],
                               (recon - images).pow(2).flatten(1).mean(1).numpy(), rtol=1e-5)
    blind = _editor(_label_blind(parts), settings).edit(images, labels, return_latents=True)
    np.testing.assert_array_equal(blind["x_t0"], out["x_t0"])  # the null row is unchanged
    np.testing.assert_allclose(blind["edited"], recon.clamp(-1, 1).numpy(), atol=1e-5)
    # a deeper inversion moves the image further from the original than depth 1 does
    deep = _editor(parts, dataclasses.replace(settings, t0=0.75)).edit(images, labels)
    assert deep["loss_pixel"].mean() > out["loss_pixel"].mean()


def test_same_seed_is_bitwise_equal_and_another_seed_changes_only_noised_candidates(parts):
    images, labels = _batch(2)
    editor = _editor(parts, SETTINGS)
    first = editor.edit(images, labels, return_latents=True)
    second = editor.edit(images, labels, return_latents=True)
    for key in first:
        assert np.array_equal(first[key], second[key]), key
    other = _editor(parts, dataclasses.replace(SETTINGS, seed=1)).edit(images, labels,
                                                                        return_latents=True)
    d0, d1 = first["candidate_distance"], other["candidate_distance"]
    np.testing.assert_array_equal(d0[:, 0], d1[:, 0])  # candidate 0 is deterministic
    assert not np.allclose(d0[:, 1:], d1[:, 1:])  # fresh SDEdit noise for the others
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    editor.edit(images, labels)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG is untouched


def test_an_images_edit_does_not_depend_on_its_batch(parts):
    """Each image's SDEdit noise is its own (seed + pixels): edited alone, in another order or
    in a batch of another size, it gets the same candidates (a row retried alone by the stage,
    a different edit.batch_size)."""
    images, labels = _batch(4)
    editor = _editor(parts, SETTINGS)
    whole = editor.edit(images, labels, return_latents=True)
    order = torch.tensor([2, 0, 3, 1])
    shuffled = editor.edit(images[order], labels[order], return_latents=True)
    alone = editor.edit(images[1:2], labels[1:2], return_latents=True)
    np.testing.assert_allclose(shuffled["candidate_distance"], whole["candidate_distance"][order],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(alone["candidate_distance"], whole["candidate_distance"][1:2],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(alone["edited"], whole["edited"][1:2], atol=1e-4)
    noise = editor.sdedit_noise(images)
    assert noise.shape == (SETTINGS.candidates - 1, *images.shape)
    assert not torch.allclose(noise[:, 0], noise[:, 1])  # images do not share noise


def test_the_kept_candidate_is_the_one_at_the_lowest_distance(parts):
    images, labels = _batch(4)
    editor = _editor(parts, dataclasses.replace(SETTINGS, candidates=4))
    out = editor.edit(images, labels, return_latents=True)
    distances = out["candidate_distance"]
    assert distances.shape == (4, 4)
    np.testing.assert_array_equal(out["chosen"], distances.argmin(axis=1))
    # the distance of the image actually returned is the smallest candidate distance
    ref = editor.losses.reference(images)
    with torch.no_grad():
        again = editor.losses.combine(editor.losses.terms(torch.from_numpy(out["edited"]), ref))
    np.testing.assert_allclose(again.numpy(), distances.min(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["loss_total"] - out["p_high_after"], distances.min(axis=1),
                               rtol=1e-5, atol=1e-6)
    # candidate 0 alone is the same deterministic decode
    single = _editor(parts, dataclasses.replace(SETTINGS, candidates=1)).edit(
        images, labels, return_latents=True)
    np.testing.assert_array_equal(single["candidate_distance"][:, 0], distances[:, 0])
    assert (out["loss_total"] <= single["loss_total"] - single["p_high_after"]
            + out["p_high_after"] + 1e-6).all()


def test_without_the_reconstruction_the_edit_is_the_same_and_its_record_columns_nan(parts):
    """reconstruct False skips only the null-label reconstruction: the same edit, NaN in its
    two record columns, every other output equal."""
    images, labels = _batch(3)
    full = _editor(parts, SETTINGS).edit(images, labels)
    lean = _editor(parts, dataclasses.replace(SETTINGS, reconstruct=False)).edit(images, labels)
    for key in full:
        if key in ("reconstruction_mse", "loss_total_initial"):
            assert np.isfinite(full[key]).all() and np.isnan(lean[key]).all(), key
        else:
            np.testing.assert_array_equal(lean[key], full[key], err_msg=key)


def test_alpha_moves_z_along_the_assigned_class_direction(parts):
    images, labels = _batch(3)
    editor = _editor(parts, SETTINGS)
    out = editor.edit(images, labels, return_latents=True)
    d = editor.directions
    moved = (out["z_edit"] - d.mean) / d.std - (out["z"] - d.mean) / d.std
    expected = SETTINGS.alpha * np.sqrt(out["z"].shape[1]) * d.directions[labels.numpy()]
    np.testing.assert_allclose(moved, expected, atol=1e-4)


def test_class_directions_separate_two_blobs_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6)) + np.array([0, 0, 0, 0, 0, 0])
    b = rng.normal(size=(200, 6)) + np.array([3, -2, 0, 0, 0, 0])
    z = np.concatenate([a, b]).astype(np.float32)
    labels = np.repeat([0, 1], 200)
    dirs = fit_class_directions(z, labels, 2, seed=0)
    toward_b = (b.mean(0) - a.mean(0)) / dirs.std
    cos = dirs.directions[1] @ toward_b / np.linalg.norm(toward_b)
    assert cos > 0.9, cos
    np.testing.assert_allclose(dirs.directions[0], -dirs.directions[1], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(dirs.directions, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(dirs.mean, z.mean(0), atol=1e-5)
    for target in (tmp_path / "local.npz", Location(str(tmp_path / "loc")).child("d.npz")):
        dirs.save(target)
        back = ZDirections.load(target)
        for name in ("mean", "std", "directions"):
            assert np.array_equal(getattr(back, name), getattr(dirs, name)), name
    # a class with no rows gets no direction (it is not shifted), and is reported
    three = fit_class_directions(z, labels, 3, seed=0)
    assert np.array_equal(three.directions[2], np.zeros(6))
    with pytest.raises(ValueError, match="at least two classes"):
        fit_class_directions(z[:200], labels[:200], 2)


@pytest.mark.parametrize("field, value, message", [
    ("t0", 0.0, "t0 must be in"), ("t0", 1.5, "t0 must be in"), ("scale", -1.0, "scale"),
    ("candidates", 0, "candidates"), ("alpha", -0.1, "alpha"), ("steps", 1, "steps")])
def test_bad_settings_are_refused_with_the_setting_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SETTINGS, **{field: value})


def test_depth_is_a_rounded_fraction_of_the_steps_at_least_one():
    assert GuidedSettings(t0=0.5, steps=10).depth == 5
    assert GuidedSettings(t0=0.01, steps=10).depth == 1
    assert GuidedSettings(t0=0.96, steps=10).depth is None  # the full inversion
    assert GuidedSettings(t0=1.0, steps=10).depth is None


def test_unconditional_autoencoders_and_missing_directions_are_refused(parts):
    plain = _parts(num_classes=0)
    with pytest.raises(ValueError, match="label-conditional"):
        GuidedEditor(plain.autoencoder, plain.classifier, plain.predictor, plain.losses, 1.0,
                     SETTINGS, _directions(plain.autoencoder.model.config.z_dim))
    with pytest.raises(ValueError, match="class directions"):
        GuidedEditor(parts.autoencoder, parts.classifier, parts.predictor, parts.losses, 1.0,
                     SETTINGS, None)
    # alpha 0 needs none
    GuidedEditor(parts.autoencoder, parts.classifier, parts.predictor, parts.losses, 1.0,
                 dataclasses.replace(SETTINGS, alpha=0.0), None)


def test_registry_builds_each_method_from_the_config_section(parts, tmp_path):
    assert set(EDIT_METHODS) == {"latent", "guided", "oracle_repair"}
    with pytest.raises(ValueError, match="choose one of latent, guided, oracle_repair"):
        edit_method("gradient")
    section = EditSection(method="guided", steps=STEPS, seed=3,
                          guided={"t0": 0.25, "scale": 2.0, "candidates": 2, "alpha": 0.5})
    method = edit_method(section.method)
    assert method.needs_directions(section)
    assert not edit_method("guided").needs_directions(section.model_copy(
        update={"guided": section.guided.model_copy(update={"alpha": 0.0})}))
    editor = method.build(parts, section, _directions(parts.autoencoder.model.config.z_dim))
    assert isinstance(editor, GuidedEditor)
    assert editor.settings == GuidedSettings(t0=0.25, scale=2.0, candidates=2, alpha=0.5,
                                             steps=STEPS, seed=3)
    assert isinstance(edit_method("latent").build(parts, EditSection(), None), LatentEditor)
    assert not edit_method("latent").needs_directions(EditSection())


def test_config_defaults_and_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("")
    cfg = load_config(path)
    assert cfg.edit.method == "latent"
    assert (cfg.edit.guided.t0, cfg.edit.guided.scale, cfg.edit.guided.candidates,
            cfg.edit.guided.alpha) == (0.7, 25.0, 1, 0.3)
    # the schema's defaults are the core's: a Ray-free caller gets the same edit as a run
    assert GuidedSettings.from_section(cfg.edit) == GuidedSettings(steps=cfg.edit.steps)
    guided = load_config(path, ["edit.method=guided", "edit.guided.candidates=2"])
    assert GuidedSettings.from_section(guided.edit).candidates == 2
    with pytest.raises(ConfigError, match="unknown edit method 'sdedit'"):
        load_config(path, ["edit.method=sdedit"])
    with pytest.raises(ConfigError, match="edit.guided.t0"):
        load_config(path, ["edit.guided.t0=0"])


# -- the stage's driver side: directions fitted on the run's unflagged training rows ----------
def _tiny_run_root(tmp_path):
    """A run root with just what the direction fit reads: manifest_noisy (train and val rows),
    influence/influence.parquet (some train rows flagged) and autoencoder/model.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffinf_ray.data.images import encode_png
    from diffinf_ray.diffae.weights import WEIGHTS_FILE, save_autoencoder

    root = tmp_path / "run"
    rng = np.random.default_rng(0)
    n = 30
    ids = [f"s{i:03d}" for i in range(n)][::-1]  # not in sample_id order on disk
    labels = np.arange(n) % NUM_CLASSES
    split = np.where(np.arange(n) < 24, "train", "val")
    pixels = rng.integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)
    (root / "manifest_noisy").mkdir(parents=True)
    for part in range(2):  # two files: Ray Data may hand them back in any order
        rows = slice(part * 15, (part + 1) * 15)
        pq.write_table(pa.table({"sample_id": ids[rows], "split": split[rows].tolist(),
                                 "image": [encode_png(p) for p in pixels[rows]],
                                 "label": labels[rows].astype(np.int32)}),
                       root / "manifest_noisy" / f"part{part}.parquet")
    flagged = np.isin(np.arange(n), [1, 5, 8, 26])  # 26 is a val row: not a train row anyway
    (root / "influence").mkdir()
    pq.write_table(pa.table({"sample_id": ids, "is_high": flagged.tolist()}),
                   root / "influence" / "influence.parquet")
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=NUM_CLASSES, image_size=SIZE).eval()
    manifest = save_autoencoder(model, str(root / "autoencoder" / "weights"))
    (root / "autoencoder" / "model.json").write_text(json.dumps({
        "format": "diffinf", "uri": str(root / "autoencoder" / "weights"),
        "sha256": manifest["files"][WEIGHTS_FILE]["sha256"], "num_classes": NUM_CLASSES}))
    keep = (split == "train") & ~flagged
    order = np.argsort(np.asarray(ids)[keep])
    images = torch.from_numpy(pixels[keep][order]).permute(0, 3, 1, 2).float() / 127.5 - 1
    return root, model, images, labels[keep][order]


def test_the_stage_fits_directions_on_unflagged_training_rows_once(ray_local, tmp_path):
    from diffinf_ray.pipeline import open_run_root
    from diffinf_ray.stage_registry import config_for_stage
    from diffinf_ray.stages.edit import directions_location, fit_run_directions, run_directions

    root_dir, model, images, labels = _tiny_run_root(tmp_path)
    (tmp_path / "run.yaml").write_text("")
    cfg = config_for_stage(load_config(tmp_path / "run.yaml", [
        f"run.root={root_dir}", "edit.method=guided", "edit.batch_size=2"]), "edit")
    root = open_run_root(cfg)
    fitted = fit_run_directions(cfg, root)
    with torch.no_grad():
        z = model.encode(images).numpy()
    expected = fit_class_directions(z, labels, NUM_CLASSES, seed=cfg.edit.seed)
    for name in ("mean", "std", "directions"):
        np.testing.assert_allclose(getattr(fitted, name), getattr(expected, name), atol=1e-5)
    # the actors read the saved file rather than fitting again
    fake = ZDirections(fitted.mean, fitted.std, -fitted.directions)
    fake.save(directions_location(root))
    assert np.array_equal(run_directions(cfg, root).directions, fake.directions)


def test_the_stage_refuses_guided_on_an_unconditional_autoencoder_before_any_actor(tmp_path):
    from diffinf_ray.pipeline import open_run_root
    from diffinf_ray.stage_registry import config_for_stage
    from diffinf_ray.stages.edit import directions_location, prepare_method

    (tmp_path / "run" / "autoencoder").mkdir(parents=True)
    (tmp_path / "run" / "autoencoder" / "model.json").write_text(json.dumps({"num_classes": 0}))
    (tmp_path / "run.yaml").write_text("")
    for method, alpha in (("guided", 0.3), ("guided", 0.0)):
        cfg = config_for_stage(load_config(tmp_path / "run.yaml", [
            f"run.root={tmp_path / 'run'}", f"edit.method={method}",
            f"edit.guided.alpha={alpha}"]), "edit")
        with pytest.raises(ValueError, match="needs a label-conditional autoencoder"):
            prepare_method(cfg, open_run_root(cfg))
    latent = config_for_stage(load_config(tmp_path / "run.yaml", [
        f"run.root={tmp_path / 'run'}"]), "edit")
    prepare_method(latent, open_run_root(latent))  # nothing to fit, nothing refused
    assert not directions_location(open_run_root(latent)).exists()

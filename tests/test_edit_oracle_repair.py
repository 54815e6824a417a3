"""The oracle repair (`edit.method: oracle_repair`): a synthfaces face drawn again showing its
assigned label, with everything else kept; the ceiling the factorial compares editors with."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffinf_ray.config import EditSection
from diffinf_ray.data.synthfaces import (
    SynthFacesSpec,
    generate_batch,
    label_of,
    sample_factors,
)
from diffinf_ray.edit.losses import EditLosses
from diffinf_ray.edit.methods import EditorParts, edit_method
from diffinf_ray.edit.oracle_repair import (
    OracleRepairEditor,
    repair_images,
    repaired_factors,
    sample_index,
)
from diffinf_ray.edit.predictor import InfluencePredictor
from diffinf_ray.models.classifier import AttributeClassifier

SIZE = 32
AGE = SynthFacesSpec(task="age", resolution=SIZE, seed=5, num_identities=20, with_masks=False)
EXPRESSION = dataclasses.replace(AGE, task="expression")


def _ids(spec, indices):
    return [f"sf{spec.seed}_{i:07d}" for i in indices]


@pytest.mark.parametrize("spec", [AGE, EXPRESSION], ids=["age", "expression"])
def test_the_repair_shows_the_label_and_changes_nothing_else(spec):
    classes = 3 if spec.task == "age" else 4
    for index in range(12):
        factors = sample_factors(spec, index)
        for label in range(classes):
            fixed = repaired_factors(spec, factors, label, np.random.default_rng(index))
            assert label_of(spec, fixed) == label  # the oracle's truth is the assigned label
            changed = {f.name for f in dataclasses.fields(factors)
                       if getattr(fixed, f.name) != getattr(factors, f.name)}
            allowed = {"age"} if spec.task == "age" else {"expression", "intensity"}
            assert changed <= allowed, changed


def test_repairs_keep_the_background_and_do_not_depend_on_the_batch():
    indices = [3, 8, 11, 17]
    original = generate_batch(AGE, np.array(indices))
    from diffinf_ray.data.images import decode_image

    before = np.stack([decode_image(b) for b in original["image"]])
    targets = (original["label"] + 1) % 3
    after = repair_images(AGE, _ids(AGE, indices), targets, seed=0)
    assert after.shape == before.shape and after.dtype == np.uint8
    assert (after != before).any(axis=(1, 2, 3)).all()  # every face changed
    np.testing.assert_array_equal(after[:, :3, :3], before[:, :3, :3])  # background corners kept
    one = repair_images(AGE, _ids(AGE, indices[2:3]), targets[2:3], seed=0)
    np.testing.assert_array_equal(one[0], after[2])
    other_seed = repair_images(AGE, _ids(AGE, indices), targets, seed=1)
    assert (other_seed != after).any()  # another age inside the same bin


def test_sample_ids_are_checked():
    assert sample_index("sf5_0000042", AGE) == 42
    with pytest.raises(ValueError, match="not a synthfaces sample id"):
        sample_index("img_0042", AGE)
    with pytest.raises(ValueError, match="drawn with seed 4"):
        sample_index("sf4_0000042", AGE)


def _parts(spec) -> EditorParts:
    torch.manual_seed(0)
    identity = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                             nn.Flatten(), nn.Linear(32, 16))
    parsing = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))

    def perceptual(a, b):
        return (F.avg_pool2d(a, 4) - F.avg_pool2d(b, 4)).pow(2).flatten(1).mean(dim=1)

    return EditorParts(None, AttributeClassifier(3, head_hidden=16),
                       InfluencePredictor(3, hidden=16), EditLosses(identity, parsing, perceptual),
                       "cpu", spec)


def test_the_registry_builds_it_and_it_gives_every_editors_outputs():
    method = edit_method("oracle_repair")
    assert method.needs_sample_ids and not method.needs_labels
    editor = method.build(_parts(AGE), EditSection(method="oracle_repair", seed=0), None)
    assert isinstance(editor, OracleRepairEditor)
    indices = [1, 2]
    batch = generate_batch(AGE, np.array(indices))
    from diffinf_ray.data.images import to_tensor_batch

    x = torch.from_numpy(to_tensor_batch(list(batch["image"])))
    labels = torch.tensor([2, 0])
    out = editor.edit(x, labels, _ids(AGE, indices))
    expected = repair_images(AGE, _ids(AGE, indices), labels.numpy(), seed=0)
    np.testing.assert_allclose(out["edited"], expected.transpose(0, 3, 1, 2) / 127.5 - 1.0,
                               atol=1e-6)
    for key in ("loss_total", "loss_id", "loss_struct", "loss_perc", "loss_pixel", "loss_si",
                "p_high_before", "p_high_after", "iterations", "reconstruction_mse", "stopped"):
        assert out[key].shape == (2,), key
    assert (out["iterations"] == 0).all() and np.isnan(out["reconstruction_mse"]).all()
    with pytest.raises(ValueError, match="pass sample_ids"):
        editor.edit(x, labels)
    with pytest.raises(ValueError, match="needs data.source synthfaces"):
        method.build(_parts(None), EditSection(method="oracle_repair"), None)


def test_it_needs_no_autoencoder_stage():
    """oracle_repair draws the face again: the edit stage then neither reads the autoencoder
    stage (not upstream, not in the fingerprint, not required among the stages) nor loads it;
    the methods that edit through the autoencoder still need it."""
    from diffinf_ray.config import ConfigError, load_config
    from diffinf_ray.stage_registry import covered_settings, upstream_stages

    stages = "stages=[ingest,noise,train,evaluate,influence,removal,predictor,lossnets,edit]"
    repair = load_config("jobs/configs/tiny.yaml", [stages, "edit.method=oracle_repair"])
    assert "autoencoder" not in upstream_stages("retrain", repair)
    assert "autoencoder" not in covered_settings("edit", repair)
    assert not edit_method("oracle_repair").needs_autoencoder
    for method in ("latent", "guided"):
        with pytest.raises(ConfigError, match=f"edit.method='{method}': stage edit then reads "
                                              "the outputs of stage autoencoder"):
            load_config("jobs/configs/tiny.yaml", [stages, f"edit.method={method}"])
        full = load_config("jobs/configs/tiny.yaml", [f"edit.method={method}"])
        assert "autoencoder" in upstream_stages("edit", full)


def test_the_stage_builds_it_without_loading_an_autoencoder(monkeypatch):
    from diffinf_ray.config import load_config
    from diffinf_ray.stages import edit as edit_stage

    def no_autoencoder(*args, **kwargs):
        raise AssertionError("oracle_repair loaded the autoencoder")

    class Checkpoint:
        def build_model(self):
            return _parts(AGE).classifier

    monkeypatch.setattr(edit_stage, "load_run_autoencoder", no_autoencoder)
    monkeypatch.setattr(edit_stage, "classifier_checkpoint", lambda root: None)
    monkeypatch.setattr("diffinf_ray.models.checkpoint.load_checkpoint", lambda path: Checkpoint())
    monkeypatch.setattr(edit_stage, "load_run_predictor", lambda root: _parts(AGE).predictor)
    monkeypatch.setattr(edit_stage, "load_edit_losses", lambda cfg, root, device:
                        (_parts(AGE).losses, None))
    cfg = load_config("jobs/configs/tiny.yaml", ["edit.method=oracle_repair"])
    editor = edit_stage.build_editor(cfg, root=None, device="cpu")
    assert isinstance(editor, OracleRepairEditor)

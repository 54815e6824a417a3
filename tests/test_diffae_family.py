"""The diffusion-autoencoder family (diffae/family.py): official networks at any width, the
optional label embedding with a null label, z statistics saved with the weights, the one-process
synthfaces training command, and the probes it reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffinf_ray.diffae import family
from diffinf_ray.diffae.autoencoder import decode, encode, predict_eps
from diffinf_ray.diffae.family import (
    build_family,
    compute_z_stats,
    family_config,
    load_family,
    save_family,
)
from diffinf_ray.diffae.model import NULL_LABEL as MODEL_NULL_LABEL
from diffinf_ray.diffae.official import (
    NULL_LABEL,
    build_official,
    load_official,
    parameter_shapes,
)
from diffinf_ray.diffae.probes import probe_accuracy, retrieval_top1
from diffinf_ray.diffae.weights import WeightsError, state_dict_from_bytes


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (the official init zeroes output convs, hiding the inputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _tiny(**overrides):
    return _randomise(build_family("tiny", **overrides))


def _inputs(batch: int = 2, size: int = 32):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    return x, torch.tensor([500] * batch)


# -- the label embedding ----------------------------------------------------------------------

def test_official_configs_keep_the_official_state_dict():
    for name, count in (("ffhq128_autoenc", 608), ("ffhq256_autoenc", 706)):
        shapes = parameter_shapes(name)
        assert len(shapes) == count
        assert not any(k.startswith(("label_emb", "conds_")) for k in shapes)


def test_label_embedding_off_takes_no_label():
    model = _tiny()
    assert not hasattr(model, "label_emb")
    x, t = _inputs()
    with torch.no_grad():
        z = model.encode(x)
        with pytest.raises(ValueError, match="no class label"):
            model(x, t, z, torch.tensor([0, 1]))


def test_label_embedding_on_conditions_the_output_and_has_a_null_row():
    assert NULL_LABEL == MODEL_NULL_LABEL
    model = _tiny(num_classes=3)
    assert tuple(model.label_emb.weight.shape) == (4, model.config.embed_channels)
    x, t = _inputs()
    with torch.no_grad():
        z = model.encode(x)
        by_label = [model(x, t, z, torch.full((2,), c)) for c in (0, 1, 2, NULL_LABEL)]
        unlabelled = model(x, t, z, None)
        for i in range(4):
            for j in range(i + 1, 4):
                assert not torch.allclose(by_label[i], by_label[j])
        torch.testing.assert_close(unlabelled, by_label[3], rtol=0, atol=0)
        mixed = model(x, t, z, torch.tensor([2, NULL_LABEL]))
        torch.testing.assert_close(mixed[0], by_label[2][0])
        torch.testing.assert_close(mixed[1], by_label[3][1])
        for bad in (3, -2):
            with pytest.raises(ValueError, match="labels must be in"):
                model(x, t, z, torch.full((2,), bad))


def test_label_embedding_feeds_guidance_and_the_encode_decode_loops():
    model = _tiny(num_classes=3)
    x, _ = _inputs()
    label = torch.tensor([0, 2])
    with torch.no_grad():
        z, x_T = encode(model, x, steps=3, label=label)
        eps_1 = predict_eps(model, x_T, 600, z, label, guidance_scale=1.0)
        eps_3 = predict_eps(model, x_T, 600, z, label, guidance_scale=3.0)
        eps_null = predict_eps(model, x_T, 600, z, torch.full((2,), NULL_LABEL))
    torch.testing.assert_close(eps_3, eps_null + 3.0 * (eps_1 - eps_null), rtol=1e-5, atol=1e-5)
    x_T.requires_grad_(True)
    decode(model, z, x_T, label, steps=3, guidance_scale=2.0).sum().backward()
    assert x_T.grad.abs().sum() > 0


def test_family_widths_build_from_any_official_config():
    small = family_config("ffhq128_autoenc", model_channels=32, image_size=32, num_classes=2)
    model = build_official(small)
    assert model.config.num_classes == 2
    assert len(model.state_dict()) == 608 + 1  # the official keys plus label_emb.weight


# -- z statistics and saving ------------------------------------------------------------------

def test_z_stats_normalise_and_round_trip_through_the_saved_folder(tmp_path):
    torch.manual_seed(0)  # the default init: z varies across images (randomised weights: ~1e-7)
    model = build_family("tiny", num_classes=3).eval()
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean, std = compute_z_stats(model, images, batch_size=5)
    with torch.no_grad():
        z = model.encode(images)
    torch.testing.assert_close(mean, z.mean(0))
    torch.testing.assert_close(std, z.std(0))

    manifest = save_family(model, tmp_path / "m", z_mean=mean, z_std=std, extra={"note": "x"})
    digest = manifest["files"]["model.safetensors"]["sha256"]
    on_disk = json.loads((tmp_path / "m" / "config.json").read_text())
    assert on_disk["files"]["model.safetensors"]["sha256"] == digest and on_disk["note"] == "x"
    for loaded in (load_family(tmp_path / "m"),
                   load_official(str(tmp_path / "m" / "model.safetensors"), sha256=digest)):
        assert loaded.config.z_stats and loaded.config.num_classes == 3
        torch.testing.assert_close(loaded.conds_mean, mean)
        torch.testing.assert_close(loaded.conds_std, std)
        with torch.no_grad():
            zn = loaded.normalize_z(loaded.encode(images))
            torch.testing.assert_close(loaded.encode(images), z)
        torch.testing.assert_close(zn.mean(0), torch.zeros_like(mean), atol=1e-3, rtol=0)
        torch.testing.assert_close(zn.std(0), torch.ones_like(mean), atol=1e-3, rtol=0)
        torch.testing.assert_close(loaded.denormalize_z(zn), z, atol=1e-5, rtol=1e-5)
    with pytest.raises(WeightsError, match="sha256"):
        load_family(tmp_path / "m", sha256="0" * 64)
    with pytest.raises(ValueError, match="no z statistics"):
        model.normalize_z(z)


def test_float16_storage_halves_the_file_and_loads_as_float32(tmp_path):
    model = _tiny()
    save_family(model, tmp_path / "a")
    save_family(model, tmp_path / "b", dtype=torch.float16)
    size_a = (tmp_path / "a" / "model.safetensors").stat().st_size
    size_b = (tmp_path / "b" / "model.safetensors").stat().st_size
    assert size_b < 0.6 * size_a
    loaded = load_family(tmp_path / "b")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    torch.testing.assert_close(loaded.out[2].weight, model.out[2].weight, atol=1e-3, rtol=1e-3)


def test_shipped_models_load_by_name_with_their_sha256():
    for name, (_, digest) in family.SHIPPED.items():
        path, recorded = family.shipped_path(name)
        assert recorded == digest and path.exists()
        model = load_family(name)
        assert model.config.z_stats
    with pytest.raises(KeyError, match="no shipped autoencoder"):
        family.shipped_path("no-such-model")


def test_saved_family_model_loads_through_the_stage_record(tmp_path):
    """The pipeline names the file as it names official weights (weights_format: official)."""
    from diffinf_ray.artifacts import load_autoencoder_model as load_model

    model = _tiny(num_classes=3)
    manifest = save_family(model, tmp_path / "m", z_mean=torch.zeros(32), z_std=torch.ones(32))
    record = {"format": "official", "uri": str(tmp_path / "m" / "model.safetensors"),
              "sha256": manifest["files"]["model.safetensors"]["sha256"]}
    loaded = load_model(record)
    assert loaded.config.num_classes == 3
    with pytest.raises(WeightsError, match="sha256"):
        load_model({**record, "sha256": "f" * 64})


# -- probes -----------------------------------------------------------------------------------

def test_probes_read_a_planted_signal_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    signal = np.eye(3)[y] * 3 + rng.normal(size=(300, 3))
    noise = rng.normal(size=(300, 20))
    x = np.concatenate([signal, noise], 1)
    assert probe_accuracy(x[:200], y[:200], x[200:], y[200:]) > 0.9
    assert probe_accuracy(noise[:200], y[:200], noise[200:], y[200:]) < 0.55
    person = np.repeat(np.arange(20), 3)
    faces = np.eye(20)[person] * 8 + rng.normal(size=(60, 20))
    assert retrieval_top1(faces, person) > 0.9
    assert retrieval_top1(rng.normal(size=(60, 20)), person) < 0.3
    with pytest.raises(ValueError, match="no person has two images"):
        retrieval_top1(faces[:3], np.arange(3))


# -- the training command ---------------------------------------------------------------------

def test_training_command_logs_probes_resumes_and_exports(tmp_path):
    from diffinf_ray.diffae.train_synthfaces import main

    out = tmp_path / "run"
    common = ["--out", str(out), "--preset", "tiny", "--num-faces", "60",
              "--num-identities", "20", "--probe-train", "40", "--recon-images", "3"]
    train = ["train", *common, "--batch-size", "4", "--log-every", "2", "--recon-steps", "2"]
    assert main([*train, "--steps", "2"]) == 0
    assert main([*train, "--steps", "4"]) == 0  # resumes at step 2
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for key in ("z_age_bin", "z_expression", "z_identity_top1", "pixel_age_bin",
                "pixel_expression", "pixel_identity_top1", "mse_S2", "ssim_S2",
                "mse_random_xT_S2"):
        assert all(0.0 <= r[key] <= 1.0 for r in rows), key
    assert rows[0]["pixel_age_bin"] == rows[1]["pixel_age_bin"]  # measured once
    pixel = json.loads((out / "pixel_probe.json").read_text())
    assert main(["pixel", *common]) == 0  # the same probe as a separate command
    assert json.loads((out / "pixel_probe.json").read_text()) == pixel
    assert sorted(p.name for p in (out / "ema").iterdir()) == [
        "step_00000002.safetensors", "step_00000004.safetensors"]
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4

    assert main(["export", *common, "--step", "4", "--dest", str(tmp_path / "ship"),
                 "--half"]) == 0
    manifest = json.loads((tmp_path / "ship" / "config.json").read_text())
    assert manifest["training"]["step"] == 4
    assert manifest["training"]["measured"]["step"] == 4
    model = load_family(tmp_path / "ship")
    assert model.config.z_stats and model.config.num_classes == 3
    assert float(model.conds_std.min()) > 0


def test_the_shipped_synthfaces_autoencoder_reconstructs_unseen_faces():
    """Strict load of the shipped weights (sha256 checked) and a reconstruction check on faces
    of people it never saw (synthfaces' test split): inversion + decode at S = 10 must be close
    to the face (measured MSE 0.008 on 48 faces) and far closer than decoding the same z from
    noise (0.157): z and x_T both carry the face."""
    from diffinf_ray.diffae.train_synthfaces import make_faces, to_model_images

    faces = make_faces(60, 2400, seed=0)
    test = np.flatnonzero(faces["split"] == "test")[:6]
    assert len(test) >= 4
    model = load_family("synthfaces32_diffae")
    x = to_model_images(faces["images"][test])
    label = torch.as_tensor(faces["age_bin"][test])
    with torch.no_grad():
        z, x_T = encode(model, x, 10, label, checkpoint=False)
        rec = decode(model, z, x_T, label, 10, checkpoint=False)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        rec_noise = decode(model, z, noise, label, 10, checkpoint=False)
    mse = float(((rec.clamp(-1, 1) - x) ** 2).mean()) / 4  # on [0, 1] images, as RESULTS.md
    mse_noise = float(((rec_noise.clamp(-1, 1) - x) ** 2).mean()) / 4
    assert mse < 0.03
    assert mse < 0.3 * mse_noise


def test_training_command_starts_from_saved_weights(tmp_path):
    """--init: a new run starts from exported weights (network and EMA), so with a zero learning
    rate the EMA it logs is exactly those weights; a model of another shape is refused."""
    from diffinf_ray.diffae.train_synthfaces import main

    common = ["--preset", "tiny", "--num-faces", "60", "--num-identities", "20",
              "--probe-train", "40", "--recon-images", "3", "--data-cache",
              str(tmp_path / "faces.npz")]
    first = ["--out", str(tmp_path / "a"), *common]
    assert main(["train", *first, "--steps", "2", "--batch-size", "4", "--log-every", "2",
                 "--recon-steps", "2", "--no-pixel-probe"]) == 0
    assert main(["export", *first, "--step", "2", "--dest", str(tmp_path / "ship")]) == 0
    saved = load_family(tmp_path / "ship").state_dict()

    second = ["--out", str(tmp_path / "b"), *common]
    train = ["train", *second, "--batch-size", "4", "--log-every", "2", "--recon-steps", "2",
             "--no-pixel-probe", "--init", str(tmp_path / "ship"), "--lr", "0"]
    assert main([*train, "--steps", "2"]) == 0
    ema = state_dict_from_bytes((tmp_path / "b" / "ema" / "step_00000002.safetensors").read_bytes(),
                                "ema")
    for key, value in ema.items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)
    assert main(["export", *second, "--step", "2", "--dest", str(tmp_path / "ship2")]) == 0
    manifest = json.loads((tmp_path / "ship2" / "config.json").read_text())
    assert manifest["training"]["init"] == str(tmp_path / "ship")

    other = ["train", "--out", str(tmp_path / "c"), *common, "--overrides",
             '{"style_channels": 16}', "--steps", "1", "--init", str(tmp_path / "ship")]
    with pytest.raises(ValueError, match="differs from the one --preset"):
        main(other)

"""The autoencoder stage on a real local Ray (tiny preset, 32 px synthfaces), and the Ray-free
quality metrics it reports."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffinf_ray.config import ConfigError, load_config
from diffinf_ray.diffae.autoencoder import decode, encode
from diffinf_ray.diffae.model import DiffAEModel, build_model
from diffinf_ray.diffae.quality import (
    load_lpips,
    lpips_backbone_path,
    pair_indices,
    reconstruction_metrics,
    ssim,
)
from diffinf_ray.diffae.training import EMA, diffusion_loss, train_step
from diffinf_ray.diffae.weights import (
    EMA_WEIGHTS_FILE,
    WEIGHTS_FILE,
    WeightsError,
    load_autoencoder,
    sha256_hex,
)
from diffinf_ray.pipeline import open_run_root, run_pipeline
from diffinf_ray.run_root import RunRoot
from diffinf_ray.stages.autoencoder import (
    CHECKPOINT_FILE,
    autoencoder_config,
    bf16_autocast,
    read_training_checkpoint,
    run_autoencoder,
    train_autoencoder,
)

TINY = "jobs/configs/tiny.yaml"
# ~34 training images (48 samples, 70% train), a few dozen steps of the tiny preset.
AE_OVERRIDES = [
    "stages=[ingest,noise,autoencoder]",
    "data.synthfaces.num_samples=48", "data.synthfaces.num_identities=12",
    "autoencoder.preset=tiny", "autoencoder.steps=20", "autoencoder.batch_size=8",
    "autoencoder.lr=1e-3", "autoencoder.checkpoint_every=10", "autoencoder.log_every=10",
    "autoencoder.quality_images=4", "autoencoder.quality_steps=[5,10]",
    "autoencoder.interpolation_pairs=2", "autoencoder.interpolation_columns=4",
    "autoencoder.interpolation_steps=5",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ae_config(root, *extra):
    return load_config(TINY, [f"run.root={root}", *AE_OVERRIDES, *extra])


@pytest.fixture(scope="module")
def ae_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("ae_run")
    cfg = ae_config(root)
    results = run_pipeline(cfg)
    yield cfg, root, results["autoencoder"]
    shutil.rmtree(root, ignore_errors=True)  # hundreds of MB of checkpoints: the CI disk is small


def manifest_images(root, split: str, n: int):
    df = pq.read_table(root / "manifest_noisy").to_pandas()
    df = df[df.split == split].sort_values("sample_id").head(n)
    from diffinf_ray.data.images import to_tensor_batch

    return (torch.from_numpy(to_tensor_batch(list(df.image))),
            torch.as_tensor(df.label.to_numpy(np.int64)))


# -- the stage on Ray -----------------------------------------------------------------------------

def test_stage_writes_checkpoints_weights_and_model_record(ae_run):
    cfg, root, summary = ae_run
    out = root / "autoencoder"
    steps = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert steps == ["step_00000010", "step_00000020"]
    payload = torch.load(out / "checkpoints" / "step_00000020" / CHECKPOINT_FILE,
                         weights_only=True)
    assert (payload["step"], payload["resumed_from_step"]) == (20, 0)
    assert set(payload) >= {"model_state", "ema_state", "optimizer_state", "epoch"}

    record = json.loads((out / "model.json").read_text())
    assert record["source"] == "trained" and record["step"] == 20
    assert record["uri"] == str(out / "weights") and record["in_run_root"] == "autoencoder/weights"
    assert record["sha256"] == sha256_hex((out / "weights" / EMA_WEIGHTS_FILE).read_bytes())
    assert (out / "weights" / WEIGHTS_FILE).stat().st_size > 0
    assert summary["sha256"] == record["sha256"]
    stage = json.loads((root / "stages" / "autoencoder.json").read_text())
    assert stage["status"] == "done"


def test_trained_weights_load_reconstruct_and_beat_the_initial_model(ae_run):
    cfg, root, _ = ae_run
    record = json.loads((root / "autoencoder" / "model.json").read_text())
    model = load_autoencoder(record["uri"], sha256=record["sha256"])
    assert (model.config.image_size, model.config.num_classes) == (32, len(cfg.class_names))
    x, labels = manifest_images(root, "val", 3)
    with torch.no_grad():
        z, x_T = encode(model, x, 10, labels, checkpoint=False)
        rec = decode(model, z, x_T, labels, 10, checkpoint=False)
    assert z.shape == (3, model.config.z_dim) and rec.shape == x.shape
    assert torch.isfinite(rec).all()

    raw = load_autoencoder(record["uri"], use_ema=False)
    assert not torch.equal(raw.z_embed[0].weight, model.z_embed[0].weight)  # EMA is its own copy
    torch.manual_seed(cfg.run.seed)  # the loop's initialisation
    initial = DiffAEModel(raw.config).eval()
    train, train_labels = manifest_images(root, "train", 32)
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (len(train),), generator=g)
    noise = torch.randn(train.shape, generator=g)
    with torch.no_grad():
        before = diffusion_loss(initial, train, train_labels, t=t, noise=noise)
        after = diffusion_loss(raw.eval(), train, train_labels, t=t, noise=noise)
    assert after < 0.8 * before, (float(before), float(after))


def test_quality_report_and_interpolation_grid(ae_run):
    cfg, root, summary = ae_run
    out = root / "autoencoder"
    quality = json.loads((out / "quality.json").read_text())
    noisy = pq.read_table(root / "manifest_noisy").to_pandas().set_index("sample_id")
    assert len(quality["sample_ids"]) == 4
    assert set(noisy.loc[quality["sample_ids"], "split"]) == {"val"}  # held out of training
    assert [r["steps"] for r in quality["reconstruction"]] == [5, 10]
    for row in quality["reconstruction"]:
        for key in ("mse", "ssim", "mse_random_xT", "ssim_random_xT"):
            assert math.isfinite(row[key]), (key, row)
        assert 0 <= row["mse"] and -1 <= row["ssim"] <= 1
        # the inverted x_T carries the image: decoding from random noise is much further off
        assert row["mse"] < row["mse_random_xT"]
        if quality["lpips"].startswith("ok"):
            assert math.isfinite(row["lpips"])
        else:
            assert quality["lpips"].startswith("LPIPS unavailable: ") and row["lpips"] is None
    assert summary["reconstruction"]["S10"]["mse"] == quality["reconstruction"][1]["mse"]

    interp = quality["interpolation"]
    assert interp["alphas"][0] == 0 and interp["alphas"][-1] == 1 and len(interp["alphas"]) == 4
    assert len(interp["pairs"]) == 2
    for pair in interp["pairs"]:
        assert {pair["a"], pair["b"]} <= set(quality["sample_ids"])
    grid = Image.open(out / "z_interpolation.png")
    tile = 64  # 32 px tiles are drawn at 2x; 2 px gaps
    assert grid.size == (2 + 6 * (tile + 2), 2 + 2 * (tile + 2))  # A, 4 alphas, B; 2 rows
    pixels = np.asarray(grid)
    first_row = pixels[2:2 + tile]
    a_tile, alpha0 = first_row[:, 2:2 + tile], first_row[:, 4 + tile:4 + 2 * tile]
    assert a_tile.std() > 0 and alpha0.std() > 0  # drawn images, not blank tiles


def test_second_fit_with_more_steps_resumes_from_the_saved_step(ae_run):
    cfg, root, _ = ae_run
    out = open_run_root(cfg).child("autoencoder")
    step20 = root / "autoencoder" / "checkpoints" / "step_00000020" / CHECKPOINT_FILE
    stamp = step20.stat().st_mtime_ns
    longer = ae_config(root, "autoencoder.steps=30")
    result = train_autoencoder(longer, open_run_root(longer).noisy_manifest, out,
                               autoencoder_config(longer, len(longer.class_names)))
    assert result.metrics["step"] == 30
    assert result.metrics["resumed_from_step"] == 20  # not retrained from zero
    payload = read_training_checkpoint(result.checkpoint)
    assert (payload["step"], payload["resumed_from_step"]) == (30, 20)
    assert step20.stat().st_mtime_ns == stamp  # the earlier checkpoint was not rewritten
    kept = sorted(p.name for p in (root / "autoencoder" / "checkpoints").glob("step_*"))
    assert kept == ["step_00000020", "step_00000030"]  # keep_checkpoints = 2


def test_imported_weights_are_verified_recorded_and_measured(ae_run, tmp_path):
    cfg, root, _ = ae_run
    record = json.loads((root / "autoencoder" / "model.json").read_text())
    shutil.copytree(root / "manifest_noisy", tmp_path / "manifest_noisy")
    wrong = ae_config(tmp_path, f"autoencoder.weights_uri={record['uri']}",
                      f"autoencoder.weights_sha256={'f' * 64}")
    with pytest.raises(WeightsError, match="sha256"):
        run_autoencoder(wrong, RunRoot(str(tmp_path)))

    imported = ae_config(tmp_path, f"autoencoder.weights_uri={record['uri']}",
                         f"autoencoder.weights_sha256={record['sha256']}")
    summary = run_autoencoder(imported, RunRoot(str(tmp_path)))
    assert summary["source"] == "imported" and summary["sha256"] == record["sha256"]
    assert not (tmp_path / "autoencoder" / "checkpoints").exists()  # nothing trained
    assert not (tmp_path / "autoencoder" / "weights").exists()
    new_record = json.loads((tmp_path / "autoencoder" / "model.json").read_text())
    assert new_record["uri"] == record["uri"] and new_record["num_classes"] == 4
    quality = json.loads((tmp_path / "autoencoder" / "quality.json").read_text())
    assert quality["model"]["source"] == "imported" and quality["label_conditioning"]
    assert (tmp_path / "autoencoder" / "z_interpolation.png").stat().st_size > 0


def test_a_run_root_moved_or_reused_from_another_checkout_finds_its_autoencoder(
        ae_run, tmp_path, monkeypatch):
    """A trained model is read from the run root that holds its record; an imported one whose
    resolved path is gone by its URI as configured, from where the command runs: a run root made
    in checkout A and reused in checkout B (same relative weights_uri, same sha256) loads B's
    copy once A is gone."""
    from diffinf_ray.artifacts import load_run_autoencoder, recorded_location

    cfg, root, _ = ae_run
    record = json.loads((root / "autoencoder" / "model.json").read_text())
    moved = tmp_path / "moved"
    shutil.copytree(root / "autoencoder", moved / "autoencoder",
                    ignore=shutil.ignore_patterns("checkpoints"))
    assert recorded_location(record, RunRoot(str(moved))).path == \
        str(moved / "autoencoder" / "weights")
    assert load_run_autoencoder(RunRoot(str(moved))).config.num_classes == 4

    for checkout in ("a", "b"):
        shutil.copytree(root / "autoencoder" / "weights", tmp_path / checkout / "models" / "ae")
    shutil.copytree(root / "manifest_noisy", tmp_path / "a" / "run" / "manifest_noisy")
    imported = ae_config("run", "autoencoder.weights_uri=models/ae",
                         f"autoencoder.weights_sha256={record['sha256']}")
    monkeypatch.chdir(tmp_path / "a")  # the config's relative paths are read from here on
    run_autoencoder(imported, RunRoot("run"))
    made = json.loads((tmp_path / "a" / "run" / "autoencoder" / "model.json").read_text())
    assert (made["uri"], made["configured_uri"]) == (str(tmp_path / "a" / "models" / "ae"),
                                                     "models/ae")
    shutil.copytree(tmp_path / "a" / "run", tmp_path / "b" / "run")
    shutil.rmtree(tmp_path / "a")
    monkeypatch.chdir(tmp_path / "b")
    assert load_run_autoencoder(RunRoot("run")).config.num_classes == 4


def test_imported_official_export_is_measured_without_labels(ae_run, tmp_path):
    """An official-architecture export (diffae/official.py) has no label input."""
    from diffinf_ray.diffae.official import (
        EXPORT_FORMAT,
        build_official,
        config_to_json,
        official_config,
    )
    from diffinf_ray.diffae.weights import state_dict_to_bytes

    cfg, root, _ = ae_run
    shutil.copytree(root / "manifest_noisy", tmp_path / "manifest_noisy")
    config = official_config("ffhq128_autoenc", model_channels=32, image_size=32, name="small32")
    torch.manual_seed(0)
    data = state_dict_to_bytes(build_official(config).state_dict(), metadata={
        "format": EXPORT_FORMAT, "config": config_to_json(config)})
    (tmp_path / "official.safetensors").write_bytes(data)
    imported = ae_config(tmp_path, "autoencoder.weights_format=official",
                         f"autoencoder.weights_uri={tmp_path / 'official.safetensors'}",
                         f"autoencoder.weights_sha256={sha256_hex(data)}")
    summary = run_autoencoder(imported, RunRoot(str(tmp_path)))
    assert summary["source"] == "imported"
    record = json.loads((tmp_path / "autoencoder" / "model.json").read_text())
    assert (record["format"], record["num_classes"], record["config"]["name"]) == ("official", 0, "small32")
    quality = json.loads((tmp_path / "autoencoder" / "quality.json").read_text())
    assert not quality["label_conditioning"]
    assert all(math.isfinite(row["mse"]) for row in quality["reconstruction"])


# -- config ---------------------------------------------------------------------------------------

def test_config_length_in_steps_or_epochs(tmp_path):
    default = load_config(None).autoencoder
    assert (default.preset, default.steps, default.epochs) == ("small", 3000, None)
    by_epochs = load_config(None, ["autoencoder.epochs=4"]).autoencoder
    assert (by_epochs.steps, by_epochs.epochs, by_epochs.checkpoint_every) == (None, 4, 1)
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(None, ["autoencoder.epochs=4", "autoencoder.steps=10"])
    with pytest.raises(ConfigError, match="weights_sha256"):
        load_config(None, ["autoencoder.weights_uri=/x"])


def test_model_config_follows_the_data_and_names_bad_overrides(tmp_path):
    cfg = ae_config(tmp_path, "autoencoder.overrides={z_dim: 16}")
    model_cfg = autoencoder_config(cfg, 4)
    assert (model_cfg.image_size, model_cfg.num_classes, model_cfg.z_dim) == (32, 4, 16)
    assert autoencoder_config(ae_config(tmp_path, "autoencoder.label_conditioning=false"),
                              4).num_classes == 0
    for override, message in [("{num_classes: 3}", "num_classes"),
                              ("{image_size: 64}", "resolution"),
                              ("{no_such_field: 1}", "no_such_field")]:
        with pytest.raises(ConfigError, match=message):
            autoencoder_config(ae_config(tmp_path, f"autoencoder.overrides={override}"), 4)


# -- quality metrics and the training wrapper (no Ray) -------------------------------------------

def test_ssim_matches_skimage():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 40, generator=g)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert torch.allclose(ssim(x, x), torch.ones(3))
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        pytest.skip("scikit-image not installed")
    expected = [
        structural_similarity(x[i].permute(1, 2, 0).double().numpy(),
                              y[i].permute(1, 2, 0).double().numpy(), gaussian_weights=True,
                              sigma=1.5, use_sample_covariance=False, data_range=1.0,
                              channel_axis=2)
        for i in range(3)
    ]
    np.testing.assert_allclose(ssim(x, y).numpy(), expected, atol=1e-5)


def test_lpips_reports_why_it_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    status = load_lpips("alex")
    assert status.metric is None
    assert status.status.startswith("LPIPS unavailable: ")
    assert str(lpips_backbone_path("alex")[0]) in status.status


def test_lpips_runs_when_backbone_weights_are_cached(tmp_path, monkeypatch):
    pytest.importorskip("lpips")
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, _ = lpips_backbone_path("squeeze")
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)  # stand-in weights (small): the code path, not the calibration
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    status = load_lpips("squeeze")
    assert status.status == "ok (lpips squeeze)"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(status.metric(x, x), torch.zeros(2))
    assert (status.metric(x, x.flip(-1)) > 0).all()
    torch.manual_seed(0)
    rows = reconstruction_metrics(build_model("tiny").eval(), x, steps=[3],
                                  lpips_metric=status.metric)
    assert math.isfinite(rows[0]["lpips"]) and math.isfinite(rows[0]["lpips_random_xT"])


def test_pairs_prefer_different_labels():
    assert pair_indices([0, 0, 1, 2], 2) == [(0, 2), (1, 3)]
    assert pair_indices([5, 5, 5, 5], 2) == [(0, 1), (2, 3)]
    with pytest.raises(ValueError, match="fewer than 3 pairs"):
        pair_indices([0, 1, 2, 3], 3)


def test_bf16_autocast_wrapper_trains_in_float32_and_feeds_the_ema():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=2)
    net = bf16_autocast(model, model, device_type="cpu")
    assert len(list(net.parameters())) == len(list(model.parameters()))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = net(x, torch.tensor([10, 500]), None, torch.tensor([0, 1]), x_start=x)
    assert out.dtype == torch.float32
    ema = EMA(model, decay=0.0)  # decay 0: the shadow becomes the weights after each step
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = train_step(net, optimizer, x, torch.tensor([0, 1]), ema=ema)
    assert math.isfinite(loss)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)
    assert all(torch.equal(ema.shadow[k], after[k]) for k in after)
    assert all(p.dtype == torch.float32 for p in model.parameters())

"""One diffusion-autoencoder family: the official DiffAE networks (`official.py`) at any width.

The testbed models and the released official weights share one code path: the same
`BeatGANsAutoencModel` (semantic encoder + BeatGANs UNet with z through the scale path), built
from an `OfficialConfig`. Two optional additions, both off in the official configs (whose
networks and state_dicts stay exactly the official ones):

- `num_classes > 0`: an assigned-label embedding c = y~ with one extra null row
  (`NULL_LABEL`), added to the time embedding; trained with label dropout, it gives
  classifier-free guidance (`autoencoder.predict_eps(..., guidance_scale=s)`).
- `z_stats`: buffers `conds_mean` / `conds_std`, the mean and std of z over the training
  images (the official `conds_mean` / `conds_std`), computed after training by
  `compute_z_stats` and saved with the weights; `model.normalize_z(z)` / `denormalize_z`.

Saved model (`save_family`), a folder:

    model.safetensors  all tensors (network + conds_mean/conds_std); its metadata holds
                       {format: official EXPORT_FORMAT, config: OfficialConfig JSON}, so
                       `official.load_official(path, sha256=...)` loads it as is.
    config.json        {format: FAMILY_FORMAT, config, files: {model.safetensors: {sha256}},
                        z_stats: where and how they were computed, plus caller extras}.

A pipeline config names such a file exactly as it names official weights:

    autoencoder:
      weights_uri: models/synthfaces32_diffae/model.safetensors
      weights_sha256: <sha256 of that file>
      weights_format: official

`load_family(name_or_path)` loads a shipped model by name (`SHIPPED`), or any saved folder /
safetensors file, checking the sha256.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from diffinf_ray.diffae.official import (
    EXPORT_FORMAT,
    NULL_LABEL,
    BeatGANsAutoencModel,
    OfficialConfig,
    load_official,
)
from diffinf_ray.diffae.weights import WeightsError, sha256_hex, state_dict_to_bytes
from diffinf_ray.storage import Location

__all__ = ["NULL_LABEL", "FAMILY_PRESETS", "build_family", "family_config", "compute_z_stats",
           "save_family", "load_family", "SHIPPED", "shipped_path"]

FAMILY_FORMAT = "diffinf-diffae-family/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REPO_ROOT = Path(__file__).resolve().parents[2]

FAMILY_PRESETS: dict[str, OfficialConfig] = {
    # 32 px faces on a CPU: 1.8M parameters, z of 256, 1.9 GFLOP per image forward+backward
    # (one ResBlock per level and attention in the middle block only; two blocks and attention
    # at 16 px as the official configs cost 3.3 GFLOP, too slow on a shared 2-core box).
    "synthfaces32": OfficialConfig(
        name="synthfaces32", image_size=32, model_channels=32, channel_mult=(1, 2, 2),
        enc_channel_mult=(1, 2, 2, 2), attention_resolutions=(), num_res_blocks=1,
        enc_num_res_blocks=1, embed_channels=128, style_channels=256, dropout=0.1,
    ),
    # tests: seconds on a CPU (GroupNorm32 needs widths that are multiples of 32).
    "tiny": OfficialConfig(
        name="tiny", image_size=32, model_channels=32, channel_mult=(1, 1),
        enc_channel_mult=(1, 1), attention_resolutions=(), num_res_blocks=1,
        enc_num_res_blocks=1, embed_channels=64, style_channels=32, dropout=0.0,
    ),
}

# name -> (path under the repository, sha256 of model.safetensors)
SHIPPED: dict[str, tuple[str, str]] = {
    # step-5721 EMA of the synthfaces32 preset, trained on an H200 (benchmarks/RESULTS.md)
    "synthfaces32_diffae": ("models/synthfaces32_diffae",
                            "953e7b83fdff515b8e4e017e952c3950a4085d4a3814a64c274b6694c20ca9ab"),
}


def family_config(base: str | OfficialConfig, **overrides) -> OfficialConfig:
    """A family preset (or any OfficialConfig, e.g. an official one) with fields replaced."""
    if isinstance(base, OfficialConfig):
        return replace(base, **overrides)
    if base in FAMILY_PRESETS:
        return replace(FAMILY_PRESETS[base], **overrides)
    from diffinf_ray.diffae.official import official_config

    return official_config(base, **overrides)


def build_family(base: str | OfficialConfig, **overrides) -> BeatGANsAutoencModel:
    return BeatGANsAutoencModel(family_config(base, **overrides))


@torch.no_grad()
def compute_z_stats(model: BeatGANsAutoencModel, images: torch.Tensor,
                    batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of z = E(x) over `images` (N, 3, H, W) in [-1, 1], per z dimension, as the
    official `calc_conds_mean_std` (std over the samples, unbiased)."""
    was_training = model.training
    model.eval()
    zs = [model.encode(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    z = torch.cat(zs)
    return z.mean(0), z.std(0)


def with_z_stats(model: BeatGANsAutoencModel, mean: torch.Tensor,
                 std: torch.Tensor) -> BeatGANsAutoencModel:
    """A copy of `model` whose config has `z_stats` and whose buffers hold (mean, std)."""
    config = replace(model.config, z_stats=True)
    out = BeatGANsAutoencModel(config)
    state = {k: v for k, v in model.state_dict().items() if k not in ("conds_mean", "conds_std")}
    state["conds_mean"], state["conds_std"] = mean.float(), std.float()
    out.load_state_dict(state, strict=True)
    return out.eval()


def save_family(model: BeatGANsAutoencModel, folder: str | Path, *, z_mean: torch.Tensor | None = None,
                z_std: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                extra: dict | None = None) -> dict:
    """Write model.safetensors (+ z stats when given) and config.json; returns the manifest.

    `dtype` (float32 or float16) is the storage type of floating tensors; loading casts back to
    the model's float32 parameters."""
    if (z_mean is None) != (z_std is None):
        raise ValueError("pass both z_mean and z_std, or neither")
    if z_mean is not None:
        model = with_z_stats(model, z_mean, z_std)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    config_json = json.dumps(asdict(model.config), sort_keys=True)
    data = state_dict_to_bytes(state, metadata={"format": EXPORT_FORMAT, "config": config_json})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WEIGHTS_FILE).write_bytes(data)
    manifest = {
        "format": FAMILY_FORMAT,
        "config": asdict(model.config),
        "files": {WEIGHTS_FILE: {"sha256": sha256_hex(data), "dtype": str(dtype)}},
        "parameters": sum(p.numel() for p in model.parameters()),
        "z_stats": ("conds_mean / conds_std tensors in model.safetensors"
                    if model.config.z_stats else None),
        **(extra or {}),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def shipped_path(name: str) -> tuple[Path, str]:
    """(model.safetensors path, sha256) of a model shipped in this repository."""
    if name not in SHIPPED:
        raise KeyError(f"no shipped autoencoder {name!r}; shipped: {sorted(SHIPPED)}")
    rel, digest = SHIPPED[name]
    return REPO_ROOT / rel / WEIGHTS_FILE, digest


def load_family(name_or_uri: str | Path, *, sha256: str | None = None,
                map_location: str | torch.device = "cpu") -> BeatGANsAutoencModel:
    """A shipped model by name, a saved folder (its config.json's sha256 is checked) or a
    model.safetensors path / URI (`sha256` pins it), in eval mode."""
    name = str(name_or_uri)
    if name in SHIPPED:
        path, digest = shipped_path(name)
        if sha256 is not None and sha256.lower() != digest:
            raise WeightsError(f"{name}: shipped sha256 {digest}, asked for {sha256}")
        return load_official(str(path), sha256=digest, map_location=map_location)
    folder = Path(name)
    if folder.is_dir():
        manifest = json.loads((folder / CONFIG_FILE).read_text())
        if manifest.get("format") != FAMILY_FORMAT:
            raise WeightsError(f"{folder / CONFIG_FILE}: format {manifest.get('format')!r}, "
                               f"expected {FAMILY_FORMAT!r}")
        recorded = manifest["files"][WEIGHTS_FILE]["sha256"]
        if sha256 is not None and sha256.lower() != recorded:
            raise WeightsError(f"{folder}: recorded sha256 {recorded}, asked for {sha256}")
        return load_official(str(folder / WEIGHTS_FILE), sha256=recorded, map_location=map_location)
    return load_official(Location(name), sha256=sha256, map_location=map_location)

"""How good is a diffusion autoencoder: reconstruction by inversion, and what z carries.

Ray-free; plain tensors in, numbers and an image grid out. Images are (B, 3, H, W) in [-1, 1]
(the model's range); metrics are computed on [0, 1] images, as the official DiffAE evaluation
(`metrics.py:evaluate_lpips`), with the same step count S for inversion and decoding:

    z, x_T = encode(model, x, S, label)         semantic code + DDIM inversion
    x_rec  = decode(model, z, x_T, label, S)    DDIM sampling back

- `mse`, `ssim` (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03: Wang et al. 2004, equal to
  `skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False,
  data_range=1)`), and LPIPS (the `lpips` package, AlexNet by default as the official metric);
- the same metrics decoding z with a random x_T instead of the inverted one (how much of the
  image z alone carries);
- `interpolation_grid`: rows are pairs (A, B); columns are A, then decode(lerp(z_A, z_B, a),
  x_T of A) for a from 0 to 1, then B. x_T is fixed, so whatever changes along a row comes
  from z; a = 1 is the z swap.

LPIPS needs torchvision's ImageNet backbone weights, which `lpips` downloads on first use.
Nothing here downloads: `load_lpips` looks for the file in torch's hub cache and, when it is
missing, returns the reason ("LPIPS unavailable: ...") instead of a number.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F

from diffinf_ray.diffae.autoencoder import decode, encode
from diffinf_ray.diffae.labels import NULL_LABEL
from diffinf_ray.diffae.schedule import NoiseSchedule

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (decoded images can overshoot)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error of two (B, C, H, W) batches: (B,)."""
    return ((x.float() - y.float()) ** 2).flatten(1).mean(1)


def _gaussian_window(size: int, sigma: float, device, dtype=torch.float64) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> torch.Tensor:
    """Per-image SSIM of two (B, C, H, W) batches: (B,), the mean over channels and pixels.

    Local statistics use a normalised Gaussian window (separable, computed in float64) over the
    positions where it fits entirely inside the image ("valid"), population (co)variances.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) batches of one shape, got {x.shape}, {y.shape}")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"images of {tuple(x.shape[-2:])} px are smaller than the window {window_size}")
    x, y = x.double(), y.double()
    channels = x.shape[1]
    g = _gaussian_window(window_size, sigma, x.device)
    kh = g.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    kw = g.view(1, 1, 1, -1).expand(channels, 1, 1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh, groups=channels), kw, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(1).float()


# -- LPIPS --------------------------------------------------------------------------------------

_BACKBONE_WEIGHTS = {  # the torchvision weights each lpips trunk loads
    "alex": "AlexNet_Weights",
    "vgg": "VGG16_Weights",
    "squeeze": "SqueezeNet1_1_Weights",
}


def lpips_backbone_path(net: str = "alex") -> tuple[Path, str]:
    """(where torchvision keeps the `net` backbone weights in the hub cache, their URL)."""
    import torchvision.models as tvm

    if net not in _BACKBONE_WEIGHTS:
        raise ValueError(f"unknown LPIPS net {net!r}; choose from {sorted(_BACKBONE_WEIGHTS)}")
    url = getattr(tvm, _BACKBONE_WEIGHTS[net]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path), url


@dataclass
class LPIPSStatus:
    """`metric(x, y) -> (B,)` on [-1, 1] images, or None with `status` saying why."""

    metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    status: str


def load_lpips(net: str = "alex", device: str | torch.device = "cpu") -> LPIPSStatus:
    """LPIPS with the `net` trunk when its weights are already on this machine; never downloads."""
    try:
        import lpips
    except ImportError as err:
        return LPIPSStatus(None, f"LPIPS unavailable: the lpips package is not installed ({err})")
    path, url = lpips_backbone_path(net)
    if not path.is_file():
        return LPIPSStatus(None, (
            f"LPIPS unavailable: the torchvision '{net}' backbone weights are not at {path} "
            f"(lpips would download {url}; weights are never fetched at run time: copy the file "
            "there, or set TORCH_HOME to a folder whose hub/checkpoints/ holds it)"))
    try:
        with warnings.catch_warnings():  # lpips uses torchvision's deprecated `pretrained=`
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            model = lpips.LPIPS(net=net, verbose=False).eval().to(device).requires_grad_(False)
    except (OSError, RuntimeError, ValueError) as err:  # unreadable or mismatching weight files
        return LPIPSStatus(None, f"LPIPS unavailable: loading lpips '{net}' from {path} failed ({err})")

    def metric(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x.float().clamp(-1, 1), y.float().clamp(-1, 1)).flatten()

    return LPIPSStatus(metric, f"ok (lpips {net})")


# -- reconstruction -----------------------------------------------------------------------------

def _labels_or_none(model, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Labels for a label-conditioned model; None (no label input) for the others."""
    if labels is None or getattr(getattr(model, "config", None), "num_classes", 0) == 0:
        return None
    return labels


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]


@torch.no_grad()
def reconstruction_metrics(
    model,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    steps: Sequence[int] = (10, 20, 50),
    *,
    lpips_metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    schedule: NoiseSchedule | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> list[dict]:
    """Reconstruction by inversion at each S in `steps`: one dict per S with the means of
    `mse`, `ssim`, `lpips` (None without a metric) and the same with a random x_T
    (`mse_random_xT`, `ssim_random_xT`, `lpips_random_xT`).

    `labels` (B,) condition inversion and decoding when the model takes labels.
    """
    model.eval()
    device = next(model.parameters()).device
    images = images.to(device)
    labels = _labels_or_none(model, labels)
    rows = []
    for s in steps:
        sums: dict[str, list[torch.Tensor]] = {}
        for part in _batches(images.shape[0], batch_size):
            x = images[part]
            label = None if labels is None else labels[part].to(device)
            z, x_T = encode(model, x, s, label, schedule, checkpoint=False)
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + part.start))
            for suffix, start in (("", x_T), ("_random_xT", noise.to(device, x.dtype))):
                rec = decode(model, z, start, label, s, schedule, checkpoint=False)
                sums.setdefault("mse" + suffix, []).append(mse(to_unit(rec), to_unit(x)).cpu())
                sums.setdefault("ssim" + suffix, []).append(ssim(to_unit(rec), to_unit(x)).cpu())
                if lpips_metric is not None:
                    sums.setdefault("lpips" + suffix, []).append(lpips_metric(rec, x).cpu())
        row: dict = {"steps": int(s)}
        for key in ("mse", "ssim", "lpips"):
            for suffix in ("", "_random_xT"):
                values = sums.get(key + suffix)
                row[key + suffix] = None if values is None else float(torch.cat(values).mean())
        rows.append(row)
    return rows


# -- z interpolation ----------------------------------------------------------------------------

@torch.no_grad()
def interpolate_z(
    model,
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    alphas: Sequence[float],
    steps: int = 20,
    *,
    schedule: NoiseSchedule | None = None,
) -> torch.Tensor:
    """(P, len(alphas), C, H, W): decode((1 - a) z_A + a z_B, x_T of A) for each pair (A, B).

    Inversion and decoding use the null label (when the model takes labels), so along a row only
    z changes.
    """
    model.eval()
    device = next(model.parameters()).device
    a, b = images_a.to(device), images_b.to(device)
    label = None
    if getattr(getattr(model, "config", None), "num_classes", 0) > 0:
        label = torch.full((a.shape[0],), NULL_LABEL, dtype=torch.long, device=device)
    z_a, x_T = encode(model, a, steps, label, schedule, checkpoint=False)
    z_b = model.encode(b)
    columns = []
    for alpha in alphas:
        z = torch.lerp(z_a, z_b, float(alpha))
        columns.append(decode(model, z, x_T, label, steps, schedule, checkpoint=False))
    return torch.stack(columns, dim=1)


def image_grid(rows: Sequence[Sequence[torch.Tensor]], pad: int = 2, min_tile: int = 64) -> np.ndarray:
    """(H, W, 3) uint8 grid of [-1, 1] (C, H, W) tiles, white gaps; small tiles are enlarged
    (nearest) to at least `min_tile` px."""
    tile_h, tile_w = rows[0][0].shape[-2:]
    scale = max(1, math.ceil(min_tile / min(tile_h, tile_w)))
    th, tw = tile_h * scale, tile_w * scale
    ncols = max(len(r) for r in rows)
    grid = np.full((pad + len(rows) * (th + pad), pad + ncols * (tw + pad), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            arr = (to_unit(tile.detach().cpu()) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            arr = arr.repeat(scale, 0).repeat(scale, 1)
            top, left = pad + i * (th + pad), pad + j * (tw + pad)
            grid[top:top + th, left:left + tw] = arr
    return grid


def interpolation_grid(
    model,
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    num_columns: int = 6,
    steps: int = 20,
    *,
    schedule: NoiseSchedule | None = None,
) -> tuple[np.ndarray, list[float]]:
    """The z interpolation grid as an (H, W, 3) uint8 image, and its alphas.

    Row p: A_p, decoded images for alphas linspace(0, 1, num_columns), B_p."""
    alphas = [float(a) for a in np.linspace(0.0, 1.0, num_columns)]
    decoded = interpolate_z(model, images_a, images_b, alphas, steps, schedule=schedule)
    rows = [[images_a[p], *decoded[p], images_b[p]] for p in range(images_a.shape[0])]
    return image_grid(rows), alphas


def pair_indices(labels: Sequence[int], num_pairs: int) -> list[tuple[int, int]]:
    """`num_pairs` disjoint index pairs, each of two different labels where the rest allow it."""
    unused = list(range(len(labels)))
    pairs = []
    while len(pairs) < num_pairs and len(unused) >= 2:
        a = unused.pop(0)
        b = next((i for i in unused if labels[i] != labels[a]), unused[0])
        unused.remove(b)
        pairs.append((a, b))
    if len(pairs) < num_pairs:
        raise ValueError(f"{len(labels)} images make fewer than {num_pairs} pairs")
    return pairs

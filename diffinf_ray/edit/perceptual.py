"""The perceptual distance of L_perc (METHOD.md stage 6): (x, y) (B, 3, H, W) in [-1, 1] -> (B,),
zero for identical images, differentiable w.r.t. both; `.name` says exactly which distance it is.

- LPIPS (Zhang et al. 2018, the `lpips` package): its linear calibration layers ship with the
  package, but its torchvision ImageNet trunk (alex / vgg / squeeze) is downloaded on first use,
  which never happens here. The trunk comes from `backbone_uri` (+ sha256), or from torch's hub
  cache when it is already there (`diffae.quality.lpips_backbone_path`; the hash prefix in
  torchvision's file name is checked). The trunk is built randomly initialised
  (`pnet_rand=True`) and the torchvision state dict is loaded into it, key by key
  (`features.<i>.*` -> `slice<k>.<i>.*`), strictly: no file is copied into the hub cache, so
  nothing global changes and the file that is used is the one that was checked.
- Without trunk weights, `fallback` (stated in `.name`):
  "identity_features": an LPIPS-style distance on the identity net's feature maps: unit-normalise
    channels per position, squared difference summed over channels, spatial mean, sum over
    layers (no learned weights). Features are `identity_net.feature_maps(x)` when it has that
    (`IdentityEmbedder`), else the last Conv2d output at each spatial resolution (ArcFace);
  "ssim": 1 - SSIM on [0, 1] images (`diffae.quality.ssim`, differentiable; >= 11 px).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from diffinf_ray.diffae.quality import lpips_backbone_path, ssim
from diffinf_ray.models.weights import WeightsError, load_verified_state_dict, sha256_of
from diffinf_ray.storage import Location, StorageOptions

FALLBACKS = ("identity_features", "ssim")
_SLICE_KEY = re.compile(r"^slice\d+\.(\d+)\.(.+)$")
_HUB_HASH = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's HASH_REGEX for cached file names


class PerceptualDistance(nn.Module):
    """`distance(x, y) -> (B,)` on [-1, 1] images; `name` is the distance used, `source` where
    its weights came from (or why LPIPS was not used)."""

    def __init__(self, name: str, distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 modules: nn.Module | None = None, source: str = ""):
        super().__init__()
        self.name, self.source = name, source
        self.network = modules  # a submodule, so .to(device) and freezing reach its weights
        self._distance = distance

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._distance(x, y).reshape(-1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


# -- LPIPS ---------------------------------------------------------------------------------------

def lpips_trunk_state(trunk: nn.Module, torchvision_state: dict[str, torch.Tensor],
                      source: str) -> dict[str, torch.Tensor]:
    """A torchvision alexnet / vgg16 / squeezenet1_1 state dict re-keyed for lpips' trunk, whose
    `slice<k>` Sequentials hold `features[i]` under the name `<i>`. WeightsError naming `source`
    when a trunk parameter has no counterpart."""
    state, missing = {}, []
    for key in trunk.state_dict():
        match = _SLICE_KEY.match(key)
        tv_key = f"features.{match.group(1)}.{match.group(2)}" if match else key
        if tv_key in torchvision_state:
            state[key] = torchvision_state[tv_key]
        else:
            missing.append(tv_key)
    if missing:
        raise WeightsError(f"{source}: not the torchvision backbone lpips expects; missing "
                           f"{len(missing)} keys, e.g. {missing[:4]}")
    return state


def _hub_cache_state(net: str) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(state dict, source) of the torchvision trunk in torch's hub cache, or (None, reason)."""
    path, url = lpips_backbone_path(net)
    if not Path(path).is_file():
        return None, f"no {net} backbone weights at {path} (lpips would download {url})"
    match = _HUB_HASH.search(path.name)
    prefix = match.group(1) if match else ""
    data = path.read_bytes()
    if prefix and not sha256_of(data).startswith(prefix):
        raise WeightsError(f"{path}: sha256 {sha256_of(data)} does not start with the {prefix} "
                           "in its file name (a corrupt download?)")
    return load_verified_state_dict(str(path), None), str(path)


def _lpips_distance(net: str, state: dict[str, torch.Tensor], source: str,
                    device: str | torch.device) -> PerceptualDistance:
    import lpips

    with warnings.catch_warnings():  # lpips uses torchvision's deprecated `pretrained=`
        warnings.filterwarnings("ignore", category=UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    try:
        model.net.load_state_dict(lpips_trunk_state(model.net, state, source), strict=True)
    except RuntimeError as err:  # shapes of another architecture
        raise WeightsError(f"{source}: does not fit lpips' {net} trunk: {err}") from err
    model = model.eval().to(device).requires_grad_(False)

    def distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, y).flatten()

    return PerceptualDistance(f"lpips-{net}", distance, model, source)


# -- fallbacks -----------------------------------------------------------------------------------

def _unit_channels(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # rsqrt(sum + eps), not / (norm + eps): finite gradients where a ReLU map is all zero
    return feat * torch.rsqrt(feat.pow(2).sum(dim=1, keepdim=True) + eps)


def feature_maps(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """`net.feature_maps(x)` when defined, else the last Conv2d output at each spatial size."""
    if hasattr(net, "feature_maps"):
        return list(net.feature_maps(x))
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out))
             for m in net.modules() if isinstance(m, nn.Conv2d)]
    try:
        net(x)
    finally:
        for hook in hooks:
            hook.remove()
    if not outputs:
        raise ValueError(f"{type(net).__name__} has no Conv2d layers to take features from")
    last_per_size: dict[tuple[int, int], torch.Tensor] = {}
    for out in outputs:
        last_per_size.pop(tuple(out.shape[2:]), None)  # re-insert: keep order of last use
        last_per_size[tuple(out.shape[2:])] = out
    return list(last_per_size.values())


def feature_distance(net: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """LPIPS without learned weights on `net`'s feature maps: (x, y) -> (B,)."""

    def distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(x.shape[0])
        for fx, fy in zip(feature_maps(net, x), feature_maps(net, y), strict=True):
            diff = (_unit_channels(fx) - _unit_channels(fy)).pow(2).sum(dim=1)
            total = total + diff.flatten(1).mean(dim=1)
        return total

    return distance


def ssim_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - SSIM of [-1, 1] images, computed on [0, 1] (not clamped, so gradients stay)."""
    return 1.0 - ssim((x + 1.0) / 2.0, (y + 1.0) / 2.0, data_range=1.0)


def _fallback(fallback: str | None, identity_net: nn.Module | None, reason: str,
              device: str | torch.device) -> PerceptualDistance:
    if fallback is None:
        raise WeightsError(f"LPIPS unavailable and no fallback chosen: {reason}")
    if fallback == "identity_features":
        if identity_net is None:
            raise ValueError("perceptual fallback 'identity_features' needs identity_net")
        identity_net = identity_net.eval().requires_grad_(False).to(device)
        kind = ("identity-embedder" if hasattr(identity_net, "feature_maps")
                else f"{type(identity_net).__name__} conv")
        return PerceptualDistance(
            f"fallback: {kind} feature distance (no LPIPS backbone weights)",
            feature_distance(identity_net), identity_net, reason)
    if fallback == "ssim":
        return PerceptualDistance("fallback: 1 - SSIM (no LPIPS backbone weights)", ssim_distance,
                                  None, reason)
    raise ValueError(f"unknown perceptual fallback {fallback!r}; choose from {FALLBACKS} or None")


def load_perceptual(
    net: str = "alex",
    backbone_uri: str | None = None,
    backbone_sha256: str | None = None,
    fallback: str | None = "identity_features",
    identity_net: nn.Module | None = None,
    device: str | torch.device = "cpu",
    storage_options: StorageOptions | None = None,
) -> PerceptualDistance:
    """LPIPS with the `net` trunk from `backbone_uri` (sha256 required; errors are raised, never
    papered over by the fallback) or from torch's hub cache; otherwise the `fallback` distance
    (None: raise instead). Frozen, in eval mode, on `device`."""
    if fallback is not None and fallback not in FALLBACKS:
        raise ValueError(f"unknown perceptual fallback {fallback!r}; choose from {FALLBACKS} or None")
    try:
        import lpips  # noqa: F401
    except ImportError as err:
        if backbone_uri:
            raise WeightsError(f"lpips_backbone_uri is set but lpips is not installed ({err})") from err
        return _fallback(fallback, identity_net, f"the lpips package is not installed ({err})",
                         device)
    if backbone_uri:
        if not backbone_sha256:
            raise WeightsError(f"{Location(backbone_uri, storage_options).display}: give the "
                               "backbone's sha256 (it is checked before loading)")
        state = load_verified_state_dict(backbone_uri, backbone_sha256, storage_options)
        return _lpips_distance(net, state, Location(backbone_uri, storage_options).display, device)
    state, source = _hub_cache_state(net)
    if state is None:
        return _fallback(fallback, identity_net, source, device)
    return _lpips_distance(net, state, source, device)

"""The official DiffAE autoencoder (phizaz/diffae `BeatGANsAutoencModel`), for its released weights.

A re-implementation of the `ffhq128_autoenc` / `ffhq256_autoenc` architecture whose state_dict
keys and shapes are exactly those of the official model (608 / 706 tensors), so the released EMA
weights load with `strict=True`. Same interface as `DiffAEModel`: `encode(x) -> z` (B, 512) and
`model(x_t, t, z) -> eps`; it has no label input (label must be None) unless built with the
optional label embedding (`num_classes`, see `diffinf_ray.diffae.family`).

Architecture (official `model/unet.py`, `model/blocks.py`, `model/unet_autoenc.py`):
- time: sinusoidal [cos, sin] embedding of t (128-d) -> Linear -> SiLU -> Linear (512);
  z (the encoder's 512-d output) is used as is (`time_embed.style` is an identity).
- every UNet ResBlock: h = conv(SiLU(GN(x))) (with nearest-up / avg-pool-down sampling inside
  for the resampling blocks), then GN(h) * (1 + t_s) + t_b with (t_s, t_b) = Linear(SiLU(emb_t)),
  then * (1 + z_s) with z_s = Linear(SiLU(z)), SiLU, dropout, zero-initialised conv; plus a skip
  (1x1 conv when the width changes). Decoder blocks concatenate the matching encoder activation.
- single-head attention (legacy QKV order, 1x1 Conv1d qkv / proj_out) at 16x16 and in the
  middle block; GroupNorm(32) computed in float32.
- semantic encoder: the same down path without any conditioning (single-conv ResBlocks), a
  middle block, then GN -> SiLU -> global average pool -> 1x1 conv (512) -> flatten.

Weights. The released `last.ckpt` is a PyTorch-Lightning pickle holding `model.` and `ema_model.`
copies (inference uses EMA). Convert it once:

    python -m diffinf_ray.diffae.official convert last.ckpt ffhq256_autoenc_ema.safetensors

The converter reads the pickle with `torch.load(weights_only=True)`, standing in inert
placeholder classes for the Lightning callback classes the file names, so no code from the file
runs and pytorch_lightning need not be installed. If the file needs more than that, the
converter stops; `--allow-pickle` then loads it with full pickle, which executes code from the
file: only do that in a trusted, throwaway environment. `load_official(path_or_uri, sha256=...)`
loads the safetensors export (or an EMA-only `torch.save` state dict, with weights_only=True),
checking its sha256 when given.

Sampling. `autoencoder.decode(model, z, x_T, steps=T)` is the official `render(x_T, z, T)`
before its map to [0, 1], and `autoencoder.encode(model, x, steps=T)[1]` is the official
`encode_stochastic(x, z, T)`: the same timesteps for every T (`space_timesteps`), x0_hat clamped
at every step, inversion from abar_0 to abar = 0 (schedule.py). Checked against golden vectors
from the official code in tests/test_diffae_official.py. Images are FFHQ-aligned RGB in [-1, 1].
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import struct
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffinf_ray.diffae.labels import NULL_LABEL
from diffinf_ray.diffae.weights import (
    WeightsError,
    check_sha256,
    sha256_hex,
    state_dict_from_bytes,
    state_dict_to_bytes,
)
from diffinf_ray.storage import Location

EMA_PREFIX = "ema_model."
EXPORT_FORMAT = "diffinf-diffae-official/1"


@dataclass(frozen=True)
class OfficialConfig:
    """The official `BeatGANsAutoencConfig` fields that shape the network."""

    name: str
    image_size: int
    channel_mult: tuple[int, ...]
    enc_channel_mult: tuple[int, ...]
    model_channels: int = 128
    attention_resolutions: tuple[int, ...] = (16,)
    num_res_blocks: int = 2
    enc_num_res_blocks: int = 2
    embed_channels: int = 512
    style_channels: int = 512
    dropout: float = 0.1
    num_heads: int = 1
    in_channels: int = 3
    out_channels: int = 3
    # Additions of this project; the defaults leave the official network (and its state_dict)
    # untouched. num_classes > 0: an assigned-label embedding (num_classes + 1 rows, the last
    # for NULL_LABEL) added to the time embedding, as the official class-conditional UNet adds
    # `label_emb(y)`. z_stats: buffers `conds_mean` / `conds_std` (the official LitModel's
    # names) holding the mean/std of z over the training images, for z normalisation.
    num_classes: int = 0
    z_stats: bool = False


OFFICIAL_CONFIGS: dict[str, OfficialConfig] = {
    "ffhq128_autoenc": OfficialConfig(
        name="ffhq128_autoenc", image_size=128, channel_mult=(1, 1, 2, 3, 4),
        enc_channel_mult=(1, 1, 2, 3, 4, 4),
    ),
    "ffhq256_autoenc": OfficialConfig(
        name="ffhq256_autoenc", image_size=256, channel_mult=(1, 1, 2, 2, 4, 4),
        enc_channel_mult=(1, 1, 2, 2, 4, 4, 4),
    ),
}


def official_config(base: str, **overrides) -> OfficialConfig:
    """A named official config (`ffhq128_autoenc`, `ffhq256_autoenc`) with fields replaced."""
    if base not in OFFICIAL_CONFIGS:
        raise KeyError(f"unknown official config {base!r}; choose from {sorted(OFFICIAL_CONFIGS)}")
    return replace(OFFICIAL_CONFIGS[base], **overrides)


# -- building blocks ------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f_i), sin(t f_i)] with f_i = exp(-ln(max_period) i / (dim/2)), as the official code."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C) computed in float32 whatever the input dtype."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _Resample(nn.Module):
    """Parameter-free nearest x2 upsampling or 2x2 average-pool downsampling."""

    def __init__(self, up: bool):
        super().__init__()
        self.up = up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest") if self.up else F.avg_pool2d(x, 2)


class ResBlock(nn.Module):
    """The official ResBlock. With `conditioned`, the out path applies the time scale/shift and
    the z scale: GN(h) * (1 + t_s) + t_b, then * (1 + z_s); without (the semantic encoder) the
    block is GN -> SiLU -> conv plus the skip."""

    def __init__(
        self,
        channels: int,
        out_channels: int,
        conditioned: bool,
        emb_channels: int = 512,
        cond_channels: int = 512,
        dropout: float = 0.0,
        up: bool = False,
        down: bool = False,
        has_lateral: bool = False,
    ):
        super().__init__()
        self.conditioned = conditioned
        self.has_lateral = has_lateral
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        self.h_upd = _Resample(up) if self.updown else nn.Identity()
        self.x_upd = _Resample(up) if self.updown else nn.Identity()
        if conditioned:
            self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
            self.cond_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(cond_channels, out_channels))
            self.out_layers = nn.Sequential(
                GroupNorm32(out_channels),
                nn.SiLU(),
                nn.Dropout(p=dropout),
                _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
            )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x, emb=None, cond=None, lateral=None):
        if self.has_lateral:
            x = torch.cat([x, lateral], dim=1)
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        if self.conditioned:
            t_scale, t_shift = self.emb_layers(emb).type(h.dtype)[..., None, None].chunk(2, dim=1)
            z_scale = self.cond_emb_layers(cond).type(h.dtype)[..., None, None]
            norm, act, drop, conv = self.out_layers
            h = norm(h) * (1 + t_scale) + t_shift
            h = h * (1 + z_scale)
            h = conv(drop(act(h)))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over positions; legacy QKV layout: qkv channels ordered (head, q|k|v, c)."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length = qkv.shape[-1]
        ch = c // self.num_heads
        q, k, v = qkv.reshape(b * self.num_heads, 3 * ch, length).split(ch, dim=1)
        # softmax(q^T k / sqrt(ch)) v computed as QKVAttentionLegacy does (scale on both sides,
        # softmax in fp32), so the outputs equal the official ones bit for bit
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, length)
        return (x + self.proj_out(a)).reshape(b, c, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    """Passes (emb, cond, lateral) to the ResBlocks it holds, plain input to the rest."""

    def forward(self, x, emb=None, cond=None, lateral=None):
        for layer in self:
            x = layer(x, emb, cond, lateral) if isinstance(layer, ResBlock) else layer(x)
        return x


class TimeStyleSeperateEmbed(nn.Module):
    """The official name and layout: `time_embed` MLP for t; z passes through `style` unchanged."""

    def __init__(self, time_channels: int, out_channels: int):
        super().__init__()
        self.time_embed = nn.Sequential(
            nn.Linear(time_channels, out_channels), nn.SiLU(), nn.Linear(out_channels, out_channels)
        )
        self.style = nn.Identity()


# -- the two networks ---------------------------------------------------------------------------

class BeatGANsEncoderModel(nn.Module):
    """The semantic encoder ("half UNet", no time input, `enc_pool='adaptivenonzero'`)."""

    def __init__(self, config: OfficialConfig):
        super().__init__()
        mc = config.model_channels
        ch = config.enc_channel_mult[0] * mc
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))]
        )
        resolution = config.image_size
        last = len(config.enc_channel_mult) - 1
        for level, mult in enumerate(config.enc_channel_mult):
            for _ in range(config.enc_num_res_blocks):
                layers = [ResBlock(ch, mult * mc, conditioned=False)]
                ch = mult * mc
                if resolution in config.attention_resolutions:
                    layers.append(AttentionBlock(ch, config.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
            if level != last:
                resolution //= 2
                self.input_blocks.append(
                    TimestepEmbedSequential(ResBlock(ch, ch, conditioned=False, down=True))
                )
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ch, conditioned=False),
            AttentionBlock(ch, config.num_heads),
            ResBlock(ch, ch, conditioned=False),
        )
        self.out = nn.Sequential(
            GroupNorm32(ch),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Conv2d(ch, config.style_channels, 1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.input_blocks:
            h = block(h)
        return self.out(self.middle_block(h))


class BeatGANsAutoencModel(nn.Module):
    """The official DiffAE autoencoder: UNet eps-predictor conditioned on t and z, plus encoder."""

    def __init__(self, config: OfficialConfig):
        super().__init__()
        self.config = config
        mc, emb = config.model_channels, config.embed_channels
        levels = len(config.channel_mult)

        def resblock(cin, cout, **kw):
            return ResBlock(cin, cout, conditioned=True, emb_channels=emb,
                            cond_channels=config.style_channels, dropout=config.dropout, **kw)

        self.time_embed = TimeStyleSeperateEmbed(mc, emb)
        ch = input_ch = config.channel_mult[0] * mc
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))]
        )
        # widths of the activations kept for the decoder's skip connections, per level
        skip_chans: list[list[int]] = [[] for _ in range(levels)]
        skip_chans[0].append(ch)
        self.input_num_blocks = [0] * levels
        self.input_num_blocks[0] = 1
        resolution = config.image_size
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers = [resblock(ch, mult * mc)]
                ch = mult * mc
                if resolution in config.attention_resolutions:
                    layers.append(AttentionBlock(ch, config.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans[level].append(ch)
                self.input_num_blocks[level] += 1
            if level != levels - 1:
                resolution //= 2
                self.input_blocks.append(TimestepEmbedSequential(resblock(ch, ch, down=True)))
                skip_chans[level + 1].append(ch)
                self.input_num_blocks[level + 1] += 1

        self.middle_block = TimestepEmbedSequential(
            resblock(ch, ch), AttentionBlock(ch, config.num_heads), resblock(ch, ch)
        )

        self.output_blocks = nn.ModuleList()
        self.output_num_blocks = [0] * levels
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                skip = skip_chans[level].pop()
                layers = [resblock(ch + skip, mc * mult, has_lateral=True)]
                ch = mc * mult
                if resolution in config.attention_resolutions:
                    layers.append(AttentionBlock(ch, config.num_heads))
                if level and i == config.num_res_blocks:
                    resolution *= 2
                    layers.append(resblock(ch, ch, up=True))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self.output_num_blocks[level] += 1
        self.output_num_blocks.reverse()  # index by position in the decoder, as the official code

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), _zero(nn.Conv2d(input_ch, config.out_channels, 3, padding=1))
        )
        self.encoder = BeatGANsEncoderModel(config)
        if config.num_classes:
            self.label_emb = nn.Embedding(config.num_classes + 1, emb)
        if config.z_stats:
            self.register_buffer("conds_mean", torch.zeros(config.style_channels))
            self.register_buffer("conds_std", torch.ones(config.style_channels))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """z_sem = encoder(x): (B, style_channels), x in [-1, 1]."""
        return self.encoder(images)

    def normalize_z(self, z: torch.Tensor) -> torch.Tensor:
        """(z - mean) / std with the training images' statistics (official `normalize`)."""
        if not self.config.z_stats:
            raise ValueError("this model carries no z statistics (config.z_stats is False)")
        return (z - self.conds_mean) / self.conds_std

    def denormalize_z(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize_z` (official `denormalize`)."""
        if not self.config.z_stats:
            raise ValueError("this model carries no z statistics (config.z_stats is False)")
        return z * self.conds_std + self.conds_mean

    def _label_embedding(self, label: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        """The label rows to add to the time embedding; NULL_LABEL (or no label) -> null row."""
        if not self.config.num_classes:
            if label is not None:
                raise ValueError("the official DiffAE autoencoder takes no class label "
                                 "(config.num_classes is 0)")
            return None
        if label is None:
            label = torch.full((batch,), NULL_LABEL, dtype=torch.long, device=device)
        label = label.to(device=device, dtype=torch.long)
        if bool(((label < NULL_LABEL) | (label >= self.config.num_classes)).any()):
            raise ValueError(f"labels must be in [0, {self.config.num_classes}) or {NULL_LABEL}")
        index = torch.where(label == NULL_LABEL, self.config.num_classes, label)
        return self.label_emb(index)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        z: torch.Tensor | None,
        label: torch.Tensor | None = None,
        *,
        x_start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """eps(x_t, t, z, label): (B, 3, H, W); t the original timestep index 0..999. `label`
        only with config.num_classes > 0 ((B,) ints, NULL_LABEL allowed; None = all null)."""
        label_rows = self._label_embedding(label, x_t.shape[0], x_t.device)
        if z is None:
            if x_start is None:
                raise ValueError("pass z or x_start")
            z = self.encode(x_start)
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        emb = self.time_embed.time_embed(timestep_embedding(t, self.config.model_channels))
        if label_rows is not None:
            emb = emb + label_rows
        cond = self.time_embed.style(z)

        skips: list[list[torch.Tensor]] = [[] for _ in self.input_num_blocks]
        h = x_t
        k = 0
        for level, count in enumerate(self.input_num_blocks):
            for _ in range(count):
                h = self.input_blocks[k](h, emb, cond)
                skips[level].append(h)
                k += 1
        h = self.middle_block(h, emb, cond)
        k = 0
        for i, count in enumerate(self.output_num_blocks):
            for _ in range(count):
                h = self.output_blocks[k](h, emb, cond, skips[-i - 1].pop())
                k += 1
        return self.out(h)


def build_official(config: OfficialConfig | str, **overrides) -> BeatGANsAutoencModel:
    if isinstance(config, str):
        config = official_config(config, **overrides)
    elif overrides:
        config = replace(config, **overrides)
    return BeatGANsAutoencModel(config)


def parameter_shapes(config: OfficialConfig | str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official state_dict, computed on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_official(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def detect_config(
    state: dict[str, torch.Tensor], candidates: Sequence[OfficialConfig] | None = None
) -> OfficialConfig:
    """The config (official ones by default) whose key set and shapes match `state` exactly."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    candidates = list(OFFICIAL_CONFIGS.values()) if candidates is None else list(candidates)
    for config in candidates:
        if parameter_shapes(config) == shapes:
            return config
    raise WeightsError(
        f"state dict with {len(shapes)} tensors matches none of {[c.name for c in candidates]}"
    )


def config_to_json(config: OfficialConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True)


def config_from_json(text: str) -> OfficialConfig:
    data = json.loads(text)
    return OfficialConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# -- checkpoint conversion and loading ---------------------------------------------------------

def _placeholder(qualified_name: str) -> type:
    """An inert class standing in for a class a checkpoint names (e.g. a Lightning callback)."""
    module, _, name = qualified_name.rpartition(".")

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    return type(name, (), {"__module__": module, "__init__": __init__, "__setstate__": __setstate__})


def read_lightning_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict:
    """The dict inside a PyTorch-Lightning `.ckpt`, read with `weights_only=True`.

    Classes the file names but torch does not allowlist are replaced by inert placeholders
    (their code never runs, their modules are never imported). `allow_pickle=True` falls back to
    a full unpickle, which runs code from the file: trusted files and environments only.
    """
    path = str(path)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        stand_ins = [(_placeholder(name), name) for name in unsafe]
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError and others for unsupported content
        if not allow_pickle:
            raise WeightsError(
                f"{path}: cannot be read as weights only ({err}). If you trust the file, rerun "
                "with --allow-pickle in a throwaway environment (it executes code from the file)."
            ) from err
    return torch.load(path, map_location="cpu", weights_only=False)


def extract_ema_state(checkpoint: dict, prefix: str = EMA_PREFIX) -> dict[str, torch.Tensor]:
    """The autoencoder weights under `prefix` (default: the EMA copy), prefix removed.

    Accepts a Lightning checkpoint (`{"state_dict": ...}`) or a bare state dict. Keys of the
    optional latent DPM (`latent_net.*`) are left out: this architecture has no latent net.
    """
    state = checkpoint.get("state_dict", checkpoint)
    out = {
        k[len(prefix):]: v for k, v in state.items()
        if k.startswith(prefix) and not k[len(prefix):].startswith("latent_net.")
    }
    if not out:
        raise WeightsError(f"no tensors under the prefix {prefix!r}")
    return out


def _file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    prefix: str = EMA_PREFIX,
    config: OfficialConfig | None = None,
    allow_pickle: bool = False,
) -> dict:
    """Official `last.ckpt` -> EMA-only safetensors at `dst`; returns {config, tensors, sha256}.

    The weights must match `config` (default: whichever official config they fit) exactly; the
    config travels in the file's metadata, so `load_official` needs no other input.
    """
    source_sha256 = _file_sha256(src)
    state = extract_ema_state(read_lightning_checkpoint(src, allow_pickle), prefix)
    config = detect_config(state, None if config is None else [config])
    metadata = {
        "format": EXPORT_FORMAT,
        "config": config_to_json(config),
        "source_sha256": source_sha256,
        "source_prefix": prefix,
    }
    data = state_dict_to_bytes(state, metadata=metadata)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_bytes(data)
    return {"config": config.name, "tensors": len(state), "sha256": sha256_hex(data)}


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (its header: u64 length, then JSON)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]).get("__metadata__", {}) or {}


def _read_state(data: bytes, source: str) -> dict[str, torch.Tensor]:
    if source.endswith(".safetensors"):
        return state_dict_from_bytes(data, source)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for unsafe or corrupt files
        raise WeightsError(
            f"{source}: not a weights-only state dict ({err}); convert the official .ckpt first "
            "(python -m diffinf_ray.diffae.official convert SRC.ckpt DST.safetensors)"
        ) from err
    if not isinstance(state, dict):
        raise WeightsError(f"{source}: expected a state dict, got {type(state).__name__}")
    if "state_dict" in state or any(k.startswith(EMA_PREFIX) for k in state):
        state = extract_ema_state(state)
    return state


def load_official(
    uri: str | Location,
    config: OfficialConfig | str | None = None,
    *,
    sha256: str | None = None,
    map_location: str | torch.device = "cpu",
) -> BeatGANsAutoencModel:
    """The official autoencoder with weights from a local path or s3:// URI, in eval mode.

    The file is an export of `convert` (.safetensors) or an EMA-only `torch.save` state dict
    (read with weights_only=True). `sha256` pins the file's hash. `config` defaults to the one
    recorded by `convert`, else the official config whose shapes the weights match.
    """
    location = uri if isinstance(uri, Location) else Location(str(uri))
    data = location.read_bytes()
    check_sha256(data, sha256, location.display)
    state = _read_state(data, location.display)
    if config is None and location.display.endswith(".safetensors"):
        recorded = _safetensors_metadata(data).get("config")
        config = config_from_json(recorded) if recorded else None
    if config is None:
        config = detect_config(state)
    model = build_official(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{location.display}: weights do not fit {model.config.name}: {err}") from err
    return model.to(map_location).eval()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffinf_ray.diffae.official",
        description="Convert the official DiffAE checkpoint to an EMA-only safetensors file.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="last.ckpt -> EMA-only .safetensors")
    conv.add_argument("src", help="the official last.ckpt")
    conv.add_argument("dst", help="output .safetensors path")
    conv.add_argument("--prefix", default=EMA_PREFIX, help="key prefix to export (default: EMA)")
    conv.add_argument(
        "--allow-pickle", action="store_true",
        help="if weights-only reading fails, unpickle fully (runs code from the file; trusted only)",
    )
    args = parser.parse_args(argv)
    info = convert_checkpoint(args.src, args.dst, prefix=args.prefix, allow_pickle=args.allow_pickle)
    print(f"wrote {args.dst}: {info['config']}, {info['tensors']} tensors, sha256 {info['sha256']}")
    print(f"load with: load_official({str(args.dst)!r}, sha256={info['sha256']!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The diffusion autoencoder's networks: a semantic encoder E and a conditional eps-predictor.

    z   = E(x)                          x: (B, 3, H, W) in [-1, 1]   ->  z: (B, z_dim)
    eps = eps_theta(x_t, t, z, c)       t: (B,) ints in [0, T), c: (B,) labels or None

Both are built from `diffusers` blocks. E is diffusers' VAE `Encoder` (down blocks, a middle block
with attention, GroupNorm -> SiLU -> conv to z_dim) followed by global average pooling, so z has
z_dim entries whatever the image size (as DiffAE's z_sem). eps_theta is a `UNet2DModel` with
ResBlock up/down sampling and AdaGN (`resnet_time_scale_shift="scale_shift"`: every ResBlock
applies GN(h) * (1 + s) + b with (s, b) projected from the conditioning embedding). The
conditioning embedding is the sum of the sinusoidal time embedding's MLP, an MLP of z and an
embedding of the class label, passed in through `class_embed_type="identity"`. This is a close
functional analogue of DiffAE's separate time scale/shift and z scale, not the same network; the
official architecture (for its released weights) is `diffinf_ray.diffae.official`.

Labels: integers in [0, num_classes), or `NULL_LABEL` (-1) for "no label", which has its own
learned embedding (classifier-free style: train with label dropout, guide at sampling). A model
with `num_classes = 0` takes no labels.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from diffusers import UNet2DModel
from diffusers.models.autoencoders.vae import Encoder
from torch import nn

from diffinf_ray.diffae.config import PRESETS, DiffAEConfig, preset  # noqa: F401 (re-exported)
from diffinf_ray.diffae.labels import NULL_LABEL  # noqa: F401 (re-exported)


def _level_resolutions(image_size: int, levels: int) -> list[int]:
    return [image_size // (2**i) for i in range(levels)]


class SemanticEncoder(nn.Module):
    """E: image (B, C, H, W) in [-1, 1] -> z (B, z_dim). No time input."""

    def __init__(self, config: DiffAEConfig):
        super().__init__()
        res = _level_resolutions(config.image_size, len(config.encoder_channels))
        block_types = tuple(
            "AttnDownEncoderBlock2D" if r in config.encoder_attention_resolutions
            else "DownEncoderBlock2D"
            for r in res
        )
        self.body = Encoder(
            in_channels=config.in_channels,
            out_channels=config.z_dim,
            down_block_types=block_types,
            block_out_channels=config.encoder_channels,
            layers_per_block=config.encoder_layers_per_block,
            norm_num_groups=config.norm_num_groups,
            double_z=False,
            mid_block_add_attention=True,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images).mean(dim=(2, 3))


class DiffAEModel(nn.Module):
    """Semantic encoder + conditional eps-predicting UNet.

    `encode(x) -> z`; `forward(x_t, t, z, label=None) -> eps` (same shape as x_t).
    `forward(x_t, t, None, label, x_start=x0)` encodes x0 inside the same call, so a
    DistributedDataParallel wrapper sees encoder and UNet in one forward pass (training).
    """

    def __init__(self, config: DiffAEConfig):
        super().__init__()
        self.config = config
        self.encoder = SemanticEncoder(config)
        res = _level_resolutions(config.image_size, len(config.unet_channels))
        attn = [r in config.unet_attention_resolutions for r in res]
        self.unet = UNet2DModel(
            sample_size=config.image_size,
            in_channels=config.in_channels,
            out_channels=config.in_channels,
            block_out_channels=config.unet_channels,
            layers_per_block=config.unet_layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            downsample_type="resnet",
            upsample_type="resnet",
            resnet_time_scale_shift="scale_shift",
            class_embed_type="identity",
            attention_head_dim=None,  # one head per attention block, as DiffAE
            norm_num_groups=config.norm_num_groups,
            dropout=config.dropout,
            flip_sin_to_cos=True,  # [cos, sin] like DiffAE's timestep embedding
            freq_shift=0,
            add_attention=True,
        )
        dim = config.embed_dim
        self.z_embed = nn.Sequential(nn.Linear(config.z_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        # index num_classes is the null label
        self.label_embed = (
            nn.Embedding(config.num_classes + 1, dim) if config.num_classes > 0 else None
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """z = E(x): (B, z_dim)."""
        return self.encoder(images)

    def condition(self, z: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        """The (B, embed_dim) embedding of z and the label that joins the time embedding."""
        cond = self.z_embed(z)
        if self.label_embed is None:
            if label is not None:
                raise ValueError("this model has num_classes=0 and takes no labels")
            return cond
        if label is None:
            label = torch.full((z.shape[0],), NULL_LABEL, dtype=torch.long, device=z.device)
        label = label.to(device=z.device, dtype=torch.long)
        if bool(((label < NULL_LABEL) | (label >= self.config.num_classes)).any()):
            raise ValueError(f"labels must be in [0, {self.config.num_classes}) or {NULL_LABEL}")
        index = torch.where(label == NULL_LABEL, self.config.num_classes, label)
        return cond + self.label_embed(index)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        z: torch.Tensor | None,
        label: torch.Tensor | None = None,
        *,
        x_start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """eps_theta(x_t, t, z, label): (B, C, H, W). `t` is (B,) or a scalar timestep.

        With z None, z = E(x_start)."""
        if z is None:
            if x_start is None:
                raise ValueError("pass z or x_start")
            z = self.encode(x_start)
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return self.unet(x_t, t.to(x_t.device), class_labels=self.condition(z, label)).sample


def build_model(config: DiffAEConfig | str, **overrides) -> DiffAEModel:
    """A randomly initialised model from a config or a preset name."""
    if isinstance(config, str):
        config = preset(config, **overrides)
    elif overrides:
        config = replace(config, **overrides)
    return DiffAEModel(config)

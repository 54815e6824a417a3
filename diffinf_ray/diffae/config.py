"""DiffAEConfig and its presets: plain data (no torch), so the run config can check
`autoencoder.overrides` when it is loaded. The networks are in `model`, which re-exports these."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class DiffAEConfig:
    """Sizes of a diffusion autoencoder. Attention resolutions are feature-map sizes in pixels."""

    image_size: int = 64
    in_channels: int = 3
    z_dim: int = 512
    num_classes: int = 0  # 0: no label conditioning
    unet_channels: tuple[int, ...] = (64, 128, 128, 256)
    unet_layers_per_block: int = 2  # the up path has one more per level, as DiffAE
    unet_attention_resolutions: tuple[int, ...] = (16,)  # plus the middle block, always
    encoder_channels: tuple[int, ...] = (64, 128, 128, 256)
    encoder_layers_per_block: int = 2
    encoder_attention_resolutions: tuple[int, ...] = (16,)
    norm_num_groups: int = 32
    dropout: float = 0.1

    def __post_init__(self):
        for name in ("unet_channels", "encoder_channels"):
            channels = getattr(self, name)
            object.__setattr__(self, name, tuple(int(c) for c in channels))
            bad = [c for c in getattr(self, name) if c % self.norm_num_groups]
            if bad:
                raise ValueError(f"{name} {bad} not divisible by norm_num_groups={self.norm_num_groups}")
        for name in ("unet_attention_resolutions", "encoder_attention_resolutions"):
            object.__setattr__(self, name, tuple(int(r) for r in getattr(self, name)))
        levels = max(len(self.unet_channels), len(self.encoder_channels)) - 1
        if self.image_size % (2**levels):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**{levels}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DiffAEConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown DiffAEConfig fields: {sorted(unknown)}")
        return cls(**data)

    @property
    def embed_dim(self) -> int:
        """Width of the conditioning embedding (diffusers: 4 x the first UNet width)."""
        return 4 * self.unet_channels[0]


PRESETS: dict[str, DiffAEConfig] = {
    # CI: trains in seconds on a CPU.
    "tiny": DiffAEConfig(
        image_size=32, z_dim=32, unet_channels=(16, 32, 32), unet_layers_per_block=1,
        unet_attention_resolutions=(), encoder_channels=(16, 32, 32), encoder_layers_per_block=1,
        encoder_attention_resolutions=(), norm_num_groups=8, dropout=0.0,
    ),
    # 64 px synthetic faces on a CPU.
    "small": DiffAEConfig(
        image_size=64, z_dim=512, unet_channels=(64, 128, 128, 256), unet_layers_per_block=2,
        unet_attention_resolutions=(16,), encoder_channels=(64, 128, 128, 256),
        encoder_layers_per_block=1, encoder_attention_resolutions=(), norm_num_groups=32,
        dropout=0.1,
    ),
    # GPU sizes mirroring the official ffhq128/ffhq256 autoencoders (UNet and encoder widths).
    "ffhq128": DiffAEConfig(
        image_size=128, z_dim=512, unet_channels=(128, 128, 256, 384, 512),
        unet_layers_per_block=2, unet_attention_resolutions=(16,),
        encoder_channels=(128, 128, 256, 384, 512, 512), encoder_layers_per_block=2,
        encoder_attention_resolutions=(16,), norm_num_groups=32, dropout=0.1,
    ),
    "ffhq256": DiffAEConfig(
        image_size=256, z_dim=512, unet_channels=(128, 128, 256, 256, 512, 512),
        unet_layers_per_block=2, unet_attention_resolutions=(16,),
        encoder_channels=(128, 128, 256, 256, 512, 512, 512), encoder_layers_per_block=2,
        encoder_attention_resolutions=(16,), norm_num_groups=32, dropout=0.1,
    ),
}


def preset(name: str, **overrides) -> DiffAEConfig:
    """A named config (`tiny`, `small`, `ffhq128`, `ffhq256`), with fields replaced."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def field_types() -> dict[str, type]:
    """DiffAEConfig's field names and their value types: int, float, or tuple (of ints)."""
    kinds = {"int": int, "float": float, "tuple[int, ...]": tuple}
    return {f.name: kinds[f.type] for f in fields(DiffAEConfig)}

"""Settings of the generator fine-tunes and of synthesis: plain data, no torch.

`FinetuneSettings.method`:
- `vanilla`     no fine-tune: the base model, sampled with the cell's z prior;
- `lora`        LoRA adapters (rank `rank`, scale `alpha / rank`) on the UNet's conv and
                attention layers; every base weight frozen;
- `dreambooth`  every UNet weight trained (the semantic encoder stays frozen, so the cell's z
                prior, fitted with it, stays valid), plus `prior_weight` x the loss on
                `prior_images` images sampled from the base model before fine-tuning with the
                cell's label and z drawn from the label's z prior (prior preservation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

METHODS = ("vanilla", "lora", "dreambooth")


@dataclass(frozen=True)
class FinetuneSettings:
    method: str = "lora"
    steps: int = 300
    batch_size: int = 16
    lr: float | None = None  # None: 5e-4 for lora, 2e-5 for dreambooth
    rank: int = 4
    alpha: float = 4.0
    include_embedding_linears: bool = False  # LoRA also on the ResBlocks' emb/cond Linears
    prior_weight: float = 1.0  # DreamBooth's lambda
    prior_images: int = 64
    cond_drop_prob: float = 0.1  # keep the null-label path alive (guidance)
    grad_clip: float | None = 1.0
    sample_steps: int = 20  # DDIM steps of the prior images (and of synthesis by default)
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown fine-tune method {self.method!r}; choose from {METHODS}")
        if self.steps < 0 or self.batch_size < 1 or self.rank < 1:
            raise ValueError("steps >= 0, batch_size >= 1 and rank >= 1 are required")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 5e-4 if self.method == "lora" else 2e-5

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SynthesisSettings:
    """How many images per cell and how they are drawn.

    Counts: `per_cell` images for every (label, group) cell; or `total` images split equally
    over the cells; or `fill=True`: each cell topped up to the largest real cell's size (real +
    synthetic balanced). Exactly one of the three."""

    per_cell: int | None = None
    total: int | None = None
    fill: bool = False
    steps: int = 20
    guidance_scale: float = 1.0
    batch_size: int = 32
    actors: int = 1
    use_gpu: bool = True  # a GPU per actor when the cluster has one
    seed: int = 0

    def __post_init__(self):
        chosen = [self.per_cell is not None, self.total is not None, self.fill]
        if sum(chosen) != 1:
            raise ValueError("set exactly one of per_cell, total or fill")


@dataclass(frozen=True)
class BaseModel:
    """The base diffusion autoencoder: a shipped name (family.SHIPPED), a saved family folder or
    a model.safetensors path/URI, pinned by sha256 (filled in by `resolve` when left None)."""

    uri: str
    sha256: str | None = None

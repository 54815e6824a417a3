"""Run configuration: one YAML file per run, validated into typed models.

- An unknown or mistyped key is an error that names the key and the file.
- `key=value` overrides with dotted keys (`train.epochs=3`) are applied before validation;
  values are parsed as YAML scalars (`3` -> int, `true` -> bool, `[1,2]` -> list).
- `fingerprint(cfg, stage)` (stage_registry.py) hashes the settings a stage reads (plus its
  upstream stages'), so `diffinf run` can skip stages already done with the same settings.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from diffinf_ray.baselines.registry import METHODS as NOISY_LABEL_METHODS
from diffinf_ray.baselines.registry import check_options, fits
from diffinf_ray.diffae.timesteps import ddim_timesteps
from diffinf_ray.edit.loss_terms import REGISTERED as LOSS_TERMS
from diffinf_ray.edit.methods import edit_method

# The stage table lives in stage_registry; these names are re-exported for the config's users.
from diffinf_ray.stage_registry import STAGES, fingerprint, upstream_stages  # noqa: F401


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]

# Worker errors a Ray Train run recovers from (train.max_failures, autoencoder.max_failures):
# on a cluster a lost spot node should cost the epochs since the last checkpoint, not the run.
MAX_FAILURES = 3


class RunSection(_Section):
    name: str = "demo"
    root: str = "./runs/demo"  # local folder or s3://bucket/prefix
    seed: int = 0


class StorageSection(_Section):
    endpoint_override: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO
    region: str | None = None
    # attempts per S3 request (500/503/SlowDown, dropped connections), with backoff
    max_attempts: int = Field(10, ge=1)


class RaySection(_Section):
    address: str | None = None  # None: use the cluster of `ray job submit`, or start a local one
    num_cpus: int | None = None  # only for a local Ray started by us
    data_actor_cpus: float = Field(0.5, gt=0)  # keep CPUs free for read tasks (RAY_NOTES 2.7)


class SynthFacesSection(_Section):
    num_samples: int = Field(3000, ge=10)
    num_identities: int = Field(600, ge=1)
    resolution: int = Field(64, ge=32, le=128)
    with_masks: bool = True
    split_fractions: tuple[Fraction, Fraction, Fraction] = (0.7, 0.15, 0.15)
    # how far clear expressions go beyond the ambiguous band; None: the task's default (1 for
    # age, whose faces never change; 4 for expression, which at 1 is near chance at 32 px)
    expression_gain: float | None = Field(None, ge=0, le=4)  # le: synthfaces.MAX_EXPRESSION_GAIN


class DataSection(_Section):
    source: Literal["synthfaces", "folder", "table"] = "synthfaces"
    task: Literal["age", "expression"] = "age"
    age_bins: list[tuple[float, float]] = [(0, 18), (25, 40), (50, 80)]
    synthfaces: SynthFacesSection = SynthFacesSection()
    # user data: a folder of images or a CSV/parquet label table (local or s3://)
    path: str | None = None
    classes: list[str] | None = None
    image_size: int = Field(64, ge=32, le=1024)
    split_fractions: tuple[Fraction, Fraction, Fraction] = (0.8, 0.1, 0.1)
    max_quarantine_fraction: Fraction = 0.05
    batch_size: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _user_data_needs_path(self) -> DataSection:
        if self.source != "synthfaces" and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        return self


class NoiseSection(_Section):
    kind: Literal["symmetric", "pairflip"] = "symmetric"
    rate: Fraction = 0.3
    seed: int = 0


def _check_runner(section: str, values) -> None:
    if values.runner == "task" and values.num_workers != 1:
        raise ValueError(f"{section}.runner task trains on one worker, not num_workers="
                         f"{values.num_workers}: use ray_train (or auto) for several")


class TrainSection(_Section):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(5, ge=1)  # epochs; the last epoch is always saved
    head_hidden: int = Field(256, ge=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    # Ray Train restarts the workers from the latest checkpoint after this many worker errors
    # (a killed process, a lost node; -1: no limit) before the stage fails; node preemptions
    # that Ray sees coming are retried without limit. Not in the fingerprint.
    max_failures: int = Field(MAX_FAILURES, ge=-1)
    # How a fit runs (models/harness.py): a Ray Train worker group (ray_train), one Ray task
    # placed like one worker (task: no Ray Train controller and worker actors, ~25 s less per
    # fit on a small box), or auto: a task for one worker, Ray Train for several. Same
    # checkpoints either way; not in the fingerprint.
    runner: Literal["auto", "ray_train", "task"] = "auto"
    weights_uri: str | None = None  # optional backbone init (local path or s3://)
    weights_sha256: str | None = None
    augment: bool = True  # random horizontal flip
    # Decode the train and val splits once and keep them in Ray's object store for every
    # epoch (1k 32-px images: 12 MB; 70k 128-px: 14 GB, spilled to disk past the store);
    # false re-reads and decodes them every epoch. Not in the fingerprint.
    cache_decoded_images: bool = True

    @model_validator(mode="after")
    def _weights_need_hash(self) -> TrainSection:
        if self.weights_uri and not self.weights_sha256:
            raise ValueError("train.weights_sha256 is required with train.weights_uri")
        _check_runner("train", self)
        return self


class EvaluateSection(_Section):
    batch_size: int = Field(128, ge=1)
    ece_bins: int = Field(15, ge=2)


class InfluenceSection(_Section):
    tau: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1  # high-influence set = top tau of scores
    per_class: bool = False  # top tau within each assigned class
    # whose score ranks the flagged set: tracin (the paper), tracin_last (output layer only),
    # tracin_early (checkpoints up to the validation peak), loss, aum (margins), cleanlab
    # (K-fold confident learning; needs the cleanlab stage among the stages), ekfac
    # (second-order self-influence; needs the ekfac stage among the stages) or oracle (the
    # injected corruption itself, a control); every one is scored and reported either way
    flag_by: str = "tracin"
    layers: list[str] | None = None  # module names, e.g. [head]; None = all parameters
    batch_size: int = Field(64, ge=1)
    actors: int = Field(1, ge=1)
    use_gpu: bool = False


    @field_validator("flag_by")
    @classmethod
    def _known_detector(cls, name: str) -> str:
        from diffinf_ray.detectors import flagging_detector

        return flagging_detector(name).name


class CleanlabSection(_Section):
    folds: int = Field(3, ge=2)  # K-fold out-of-sample probabilities for find_label_issues


class EkfacSection(_Section):
    """Second-order self-influence g^T (G + damping I)^-1 g of every training row (stage
    `ekfac`, kronfluence; influence/ekfac.py says what each setting does)."""

    strategy: Literal["ekfac", "kfac", "diagonal", "identity"] = "ekfac"  # identity: ||g||^2
    damping: Annotated[float, Field(gt=0)] | None = None  # None: 0.1 x mean eigenvalue per layer
    batch_size: int = Field(64, ge=1)
    checkpoint: Literal["last", "all"] = "last"  # all: sum_t lr_t I_t(z) over the checkpoints
    fisher: Literal["true", "empirical"] = "true"  # G from labels the model draws, or assigned
    layers: list[str] | None = None  # module names, e.g. [head]; None = every Linear and Conv2d
    use_gpu: bool = False


class AutoencoderSection(_Section):
    """The diffusion autoencoder (stage `autoencoder`): trained here, or imported by URI.

    Defaults suit 64 px synthfaces on a CPU (the `small` preset); GPU runs raise `batch_size`,
    `steps` and `num_workers`. The model's image size is the data's resolution.
    """

    preset: Literal["tiny", "small", "ffhq128", "ffhq256"] = "small"
    # DiffAEConfig fields replaced on top of the preset, e.g. {z_dim: 256, dropout: 0.0}
    overrides: dict[str, int | float | list[int]] = {}
    label_conditioning: bool = True  # the assigned label conditions the decoder
    # Length of training: `steps` (optimiser steps) or `epochs` (passes over the train split);
    # giving `epochs` alone switches to epochs.
    steps: int | None = Field(3000, ge=1)
    epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)  # per worker
    lr: float = Field(1e-4, gt=0)  # Adam, no weight decay (official DiffAE)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step)): short runs
    cond_drop_prob: Fraction = 0.1  # label -> null label while training (classifier-free)
    augment: bool = True  # random horizontal flip
    mixed_precision: bool = True  # bf16 autocast; applies only when training on a GPU
    # Decode the train split once and keep it in Ray's object store (2k 64-px images: 100 MB);
    # false re-reads and decodes it every epoch (data sets larger than memory).
    cache_decoded_images: bool = True
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    max_failures: int = Field(MAX_FAILURES, ge=-1)  # as train.max_failures
    runner: Literal["auto", "ray_train", "task"] = "auto"  # as train.runner
    # in the unit of the run's length (steps, or epochs); the last step is always saved.
    # Defaults to 500 steps, or 1 epoch when the length is given in epochs.
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)  # Ray Train checkpoints kept (model + EMA + Adam)
    log_every: int = Field(50, ge=1)  # steps between progress lines
    # An existing model instead of training: a folder written by save_autoencoder (format
    # diffinf), or an official DiffAE export (format official, diffae/official.py).
    weights_uri: str | None = None
    weights_sha256: str | None = None  # of the weights file that is loaded
    weights_format: Literal["diffinf", "official"] = "diffinf"
    # Reconstruction by inversion on held-out images, and the z interpolation grid.
    quality_split: Literal["val", "test", "holdout"] = "val"
    quality_images: int = Field(8, ge=2)
    quality_steps: list[Annotated[int, Field(ge=1, le=1000)]] = Field([10, 20, 50], min_length=1)
    quality_batch_size: int = Field(16, ge=1)
    interpolation_pairs: int = Field(3, ge=1)
    interpolation_columns: int = Field(6, ge=2)
    interpolation_steps: int = Field(20, ge=1, le=1000)
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"

    @field_validator("overrides")
    @classmethod
    def _diffae_fields(cls, overrides: dict) -> dict:
        """Keys are DiffAEConfig fields (diffae/config.py, torch-free) of the right kind."""
        from diffinf_ray.diffae.config import field_types

        kinds = field_types()
        for key, value in overrides.items():
            if key not in kinds:
                raise _free_form_error("unknown_key", key, f"DiffAEConfig fields: {sorted(kinds)}")
            if key == "num_classes":
                raise _free_form_error("bad_value", key, "set by autoencoder.label_conditioning "
                                       "(the data's classes), not by an override")
            kind = kinds[key]
            good = (isinstance(value, list) and all(fits(int, v) for v in value)
                    if kind is tuple else fits(kind, value))
            if not good:
                want = "a list of ints" if kind is tuple else f"{kind.__name__}"
                raise _free_form_error("bad_value", key, f"expected {want}, got {value!r}")
        return overrides

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_steps(cls, data):
        if isinstance(data, dict) and data.get("epochs") is not None:
            data = dict(data)
            data.setdefault("steps", None)
            data.setdefault("checkpoint_every", 1)
        return data

    @model_validator(mode="after")
    def _check(self) -> AutoencoderSection:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of autoencoder.steps and autoencoder.epochs")
        if self.weights_uri and not self.weights_sha256:
            raise ValueError("autoencoder.weights_sha256 is required with autoencoder.weights_uri")
        if 2 * self.interpolation_pairs > self.quality_images:
            raise ValueError("autoencoder.interpolation_pairs needs 2 x pairs <= quality_images")
        _check_runner("autoencoder", self)
        return self


class PredictorSection(_Section):
    """The influence predictor h_w (stage `predictor`, METHOD.md stage 4): an MLP on the
    classifier's backbone features g(x) and the assigned label -> P(high influence).

    Trained on the pseudo-labels `is_high` of a partition of the training split (`fit_fraction`
    of its rows, drawn by a seeded hash of sample_id: recorded in predictor/partition.parquet),
    validated on the rest (the held-out AUROC), then frozen.
    """

    fit_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    hidden: int = Field(128, ge=1)
    epochs: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(256, ge=1)
    balance_classes: bool = True  # weight positives by (#neg / #pos): H is ~tau of the rows


class LossNetsSection(_Section):
    """The frozen networks of the edit losses (stage `lossnets`).

    Identity: insightface ArcFace (ONNX, 112 px aligned input) by URI + sha256; without one, a
    small identity embedder is trained here on the manifest's `identity` column. Structure: a
    BiSeNet face-parsing checkpoint by URI + sha256; without one, a small parsing net is trained
    on the manifest's `mask` column. Perceptual: lpips with its backbone file by URI (or found in
    torch's hub cache); without one, the distance named in `perceptual_fallback` is used and the
    report says so.
    """

    identity_onnx_uri: str | None = None
    identity_onnx_sha256: str | None = None
    identity_embed_dim: int = Field(128, ge=8)
    identity_epochs: int = Field(15, ge=1)
    parsing_uri: str | None = None
    parsing_sha256: str | None = None
    parsing_num_classes: int = Field(19, ge=2)  # the public BiSeNet face-parsing checkpoints
    parsing_epochs: int = Field(10, ge=1)
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    lpips_backbone_uri: str | None = None
    lpips_backbone_sha256: str | None = None
    perceptual_fallback: Literal["identity_features", "ssim"] = "identity_features"
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)

    @model_validator(mode="after")
    def _uris_need_hash(self) -> LossNetsSection:
        for name in ("identity_onnx", "parsing", "lpips_backbone"):
            if getattr(self, f"{name}_uri") and not getattr(self, f"{name}_sha256"):
                raise ValueError(f"lossnets.{name}_sha256 is required with lossnets.{name}_uri")
        return self


class GateSection(_Section):
    """The gate before an edit replaces its original (edit.gate; edit/gate.py): the removal
    stage's classifier, which never guided an edit, must predict the assigned label (and
    identity_similarity reach `min_identity` when set), else the row falls back to removal from
    refined/ (`fallback: remove`) or to its original image (`keep`). `enabled: false`: every
    edit replaces its original."""

    enabled: bool = True
    classifier: Literal["removal"] = "removal"
    # None: F_id guided the edit and its cosine's scale depends on the network (edit/gate.py)
    min_identity: Annotated[float, Field(ge=-1.0, le=1.0)] | None = None
    fallback: Literal["remove", "keep"] = "remove"


class GuidedEditSection(_Section):
    """`edit.method: guided` (edit/guided.py): invert each image part-way under the null label,
    decode it under its assigned label with classifier-free guidance and z shifted toward that
    label, keep the closest of `candidates` decodes. Uses edit.steps (not encode_steps /
    decode_steps: the partial inversion and the decode share one grid), edit.seed, the loss
    weights and w_si (reported loss_total only); needs a label-conditional autoencoder."""

    # inversion depth as a fraction of edit.steps: round(t0 * steps) steps, at least 1
    # defaults: the sweep in benchmarks/RESULTS.md ("Guided edit settings"), chosen on seed 0 of
    # the demo at edit.steps 20 and checked on other seeds: a deeper inversion and strong
    # guidance move corrupted rows to their label; at 10 steps the decode adds colour speckle
    # that the oracle reads as age; the SDEdit candidates lost identity and showed the label
    # no more often
    t0: Annotated[float, Field(gt=0.0, le=1.0)] = 0.7
    scale: float = Field(25.0, ge=0.0)  # classifier-free guidance scale (1: no guidance)
    candidates: int = Field(1, ge=1, le=64)  # decode 0 deterministic, the others SDEdit noise
    # z' = z + alpha * sqrt(d) * w_y / ||w_y|| in normalised z (DiffAE uses 0.3-0.5); 0: no shift
    alpha: float = Field(0.3, ge=0.0, le=10.0)
    # decode each image's null-label reconstruction for the reconstruction_mse and
    # loss_total_initial columns of edits/ (a record only); false: NaN, a quarter fewer passes
    reconstruct: bool = True


# keys a config may still carry from an earlier version -> where the setting lives now
RENAMED_KEYS = {f"edit.l_{name}": f"edit.loss_terms.{name}" for name in ("struct", "perc", "pixel")}

# edit.loss_terms: one weight per registered image term of the edit (edit/loss_terms.py), so a
# new term is a config key with its default weight without touching this file
LossTermsSection = create_model(
    "LossTermsSection", __base__=_Section,
    **{t.name: (float, Field(t.default, ge=0, allow_inf_nan=False)) for t in LOSS_TERMS})


class EditSection(_Section):
    """The generative correction (stage `edit`, METHOD.md stage 6). `method` (edit/methods.py):
    `latent` optimises the latents of each high-influence sample through the frozen autoencoder's
    differentiable decode to minimise
    w_id*L_id + w_reg*(l_struct*L_struct + l_perc*L_perc + l_pixel*L_pixel) + w_si*h_w(g(x), y);
    `guided` edits without gradients (`guided` sub-section) and keeps the candidate with the
    lowest w_id*L_id + w_reg*(...) term.

    `loss_terms` holds one weight l per registered image term (edit/loss_terms.py: id, struct,
    perc, pixel; 0 turns a term off), e.g. `edit.loss_terms.perc=0`; w_id and w_reg scale the
    identity and regulariser groups.
    """

    method: str = "latent"  # latent | guided
    guided: GuidedEditSection = GuidedEditSection()
    optimize: Literal["z", "xT", "both"] = "both"
    iterations: int = Field(20, ge=1)  # Adam steps per sample (K)
    # 0.05 moved each x_T element by ~0.05 in Adam's first step: 6x the pixel error of 0.01 for
    # the same oracle outcome on 32 px synthfaces (benchmarks/RESULTS.md, edit settings)
    lr: float = Field(0.01, gt=0)
    # DDIM steps S of the inversion and of the differentiable decode: the official loops with
    # one S give x_T at the level the decode starts from. encode_steps / decode_steps (None:
    # `steps`) set either on purpose. S needs an official integer stride: 2..36 all do, larger
    # counts often not (45 is refused; 40, 50, 100, 250 are fine).
    steps: int = Field(10, ge=2, le=1000)
    encode_steps: int | None = Field(None, ge=2, le=1000)
    decode_steps: int | None = Field(None, ge=2, le=1000)
    w_id: float = Field(1.0, ge=0)
    w_reg: float = Field(1.0, ge=0)
    w_si: float = Field(1.0, ge=0)
    loss_terms: LossTermsSection = LossTermsSection()
    stop_p_high: Fraction = 0.2  # a sample stops once h_w's p_high falls below this
    checkpoint: bool = True  # per-step gradient checkpointing in the decode
    batch_size: int = Field(16, ge=1)
    actors: int = Field(1, ge=1)
    use_gpu: bool = False
    gpus_per_actor: Annotated[float, Field(gt=0.0, le=8.0)] = 1.0  # < 1 packs actors on a GPU
    max_attempts: int = Field(3, ge=1)  # per row, then quarantined with its reason
    seed: int = 0
    gate: GateSection = GateSection()

    @model_validator(mode="before")
    @classmethod
    def _renamed_term_weights(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key in data:
                if f"edit.{key}" in RENAMED_KEYS:
                    raise ValueError(f"edit.{key} is now {RENAMED_KEYS[f'edit.{key}']}")
        return data

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        edit_method(value)  # ValueError naming the registered methods
        return value

    @model_validator(mode="after")
    def _official_step_counts(self) -> EditSection:
        for name in ("steps", "encode_steps", "decode_steps"):
            if getattr(self, name) is not None:
                try:
                    ddim_timesteps(getattr(self, name))
                except ValueError as err:
                    raise ValueError(f"edit.{name}: {err}") from None
        return self


class OracleSection(_Section):
    """Independent judges (stages `judges` and `oracle`, synthfaces only): an attribute
    classifier trained on clean labels of a separate synthfaces draw, and an identity oracle (an
    embedder trained on that draw's identities). They judge the edits and never guide them."""

    num_samples: int = Field(3000, ge=100)
    num_identities: int = Field(600, ge=2)
    seed_offset: int = 1000  # the draw's seed is run.seed + seed_offset
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)


class BaselinesSection(_Section):
    """Noisy-label training methods (stage `baselines`, METHOD.md stage 9), each trained with
    Ray Train on the noisy training split like the baseline classifier (train section: epochs,
    batch size, lr, workers) and evaluated on the clean test split like it.

    `methods` are names in the registry (diffinf_ray/baselines/registry.py); `options` holds
    each method's own keys (listed there), e.g.
    {small_loss: {noise_rate: 0.3}}; an unknown key or a value of the wrong kind is an error
    when the config is loaded.
    """

    methods: list[Literal[tuple(NOISY_LABEL_METHODS)]] = [
        "small_loss", "elr_plus", "proselflc", "promix"]
    options: dict[str, dict[str, int | float | bool | str]] = {}

    @field_validator("options")
    @classmethod
    def _method_options(cls, options: dict) -> dict:
        """Per method, its own keys of the right kind (baselines/registry.py, torch-free)."""

        for method, given in options.items():
            problem = check_options(method, given)
            if problem is not None:
                raise _free_form_error(*problem)
        return options


class ReportSection(_Section):
    """The run report. Its subgroup audit (per `group` of the manifest) warns when a group's
    share of the flagged rows exceeds its share of the training rows by more than
    `audit_flag_ratio` times, or when its test accuracy after DiffInf is more than
    `audit_accuracy_drop` points below the noisy classifier's."""

    audit_flag_ratio: float = Field(2.0, gt=0)
    audit_accuracy_drop: float = Field(0.0, ge=0)


class Config(_Section):
    run: RunSection = RunSection()
    storage: StorageSection = StorageSection()
    ray: RaySection = RaySection()
    data: DataSection = DataSection()
    noise: NoiseSection = NoiseSection()
    train: TrainSection = TrainSection()
    evaluate: EvaluateSection = EvaluateSection()
    influence: InfluenceSection = InfluenceSection()
    cleanlab: CleanlabSection = CleanlabSection()
    ekfac: EkfacSection = EkfacSection()
    autoencoder: AutoencoderSection = AutoencoderSection()
    baselines: BaselinesSection = BaselinesSection()
    predictor: PredictorSection = PredictorSection()
    lossnets: LossNetsSection = LossNetsSection()
    edit: EditSection = EditSection()
    oracle: OracleSection = OracleSection()
    report: ReportSection = ReportSection()
    stages: list[Literal[STAGES]] = ["ingest", "noise", "train", "evaluate"]

    @model_validator(mode="after")
    def _settings_name_their_stages(self) -> Config:
        # a stage that reads another stage only under a setting (stage_registry.upstream_when)
        from diffinf_ray.stage_registry import REGISTRY

        for stage in self.stages:
            missing = [s for s in REGISTRY[stage].upstream_of(self)
                       if s not in REGISTRY[stage].upstream and s not in self.stages]
            for s in missing:
                key = next(k for name, k, _ in REGISTRY[stage].upstream_when if name == s)
                raise ValueError(f"{key}={_dotted(self, key)!r}: stage {stage} then reads the "
                                 f"outputs of stage {s}; add {s} to stages (it runs first)")
        return self

    @property
    def class_names(self) -> list[str]:
        if self.data.source != "synthfaces":
            if not self.data.classes:
                raise ConfigError("data.classes is required for user data")
            return list(self.data.classes)
        from diffinf_ray.data.synthfaces import SynthFacesSpec, class_names

        spec = SynthFacesSpec(task=self.data.task, age_bins=tuple(map(tuple, self.data.age_bins)))
        return list(class_names(spec))


def _dotted(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# -- dotted overrides: the one way every command and file applies them ----------------------

# A mapping of dotted key -> value ({train.epochs: 3}), or `key=value` strings (values parsed as
# YAML scalars: `train.epochs=3`), as given on a command line.
Overrides = Mapping[str, Any] | Sequence[str]


def parse_overrides(overrides: Overrides | None) -> dict[str, Any]:
    """`overrides` as a dict of dotted key -> value (a mapping is returned as a copy)."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    if isinstance(overrides, str):
        overrides = [overrides]
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.epochs=3)")
        parsed[key.strip()] = yaml.safe_load(raw) if raw != "" else None
    return parsed


def as_override_mapping(value):
    """For override fields of experiment and sweep files: a list of `key=value` strings (the
    older sweep-file form) becomes the mapping; a mapping is kept."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return parse_overrides(value)
    return value


def _check_key(schema: type[BaseModel], dotted: str, source: str) -> None:
    """A ConfigError unless `dotted` names a field of `schema` (below a free-form mapping field,
    such as autoencoder.overrides or baselines.options, any key passes here and the field's own
    validator judges it)."""
    if schema is Config and dotted in RENAMED_KEYS:
        raise ConfigError(f"{source}: {dotted!r} is now {RENAMED_KEYS[dotted]!r}")
    model: type[BaseModel] | None = schema
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if model is None:
            return
        field = model.model_fields.get(part)
        if field is None or not part:
            raise ConfigError(f"{source}: unknown config key {dotted!r}")
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            model = kind
        elif get_origin(kind) is dict:
            model = None
        elif i < len(parts) - 1:
            raise ConfigError(f"{source}: {'.'.join(parts[: i + 1])!r} is not a section "
                              f"(in override {dotted!r})")


def override_args(overrides: Overrides | None) -> list[str]:
    """`overrides` as `key=value` arguments that `parse_overrides` reads back the same."""
    args = []
    for key, value in parse_overrides(overrides).items():
        plain = isinstance(value, str) and value != "" and yaml.safe_load(value) == value
        text = value if plain else json.dumps(value, separators=(",", ":"))
        args.append(f"{key}={text}")
    return args


def apply_overrides(tree: Mapping, overrides: Overrides | None, source: str,
                    schema: type[BaseModel] | None = None) -> dict:
    """A copy of the nested mapping `tree` (a config file's tree, or a dumped Config) with each
    dotted key of `overrides` set, in order; `schema` (default: Config) checks each key first.
    Not validated: pass the result to `validate_config` (or the schema's model_validate)."""
    schema = schema or Config
    tree = copy.deepcopy(dict(tree))
    for dotted, value in parse_overrides(overrides).items():
        _check_key(schema, dotted, source)
        keys = dotted.split(".")
        node = tree
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source} (override {dotted}): "
                                  f"{'.'.join(keys[: i + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return tree


def validate_config(tree: Mapping, source: str) -> Config:
    """The Config of `tree`; a ConfigError naming `source` and every bad key otherwise."""
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def override_config(cfg: Config, overrides: Overrides | None, source: str = "overrides") -> Config:
    """`cfg` with `overrides` applied, validated again (a sweep trial's values)."""
    return validate_config(apply_overrides(cfg.model_dump(mode="json"), overrides, source), source)


def format_validation_error(err: ValidationError, source: str) -> str:
    """A pydantic error as one line per bad key, prefixed by `source` (the file). Errors of the
    free-form mappings' validators (`_free_form_error`) carry the key below the field."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        ctx = e.get("ctx") or {}
        if "subkey" in ctx:
            key = f"{key}.{ctx['subkey']}"
        if e["type"] in ("extra_forbidden", "unknown_key"):
            hint = f" ({ctx['hint']})" if ctx.get("hint") else ""
            lines.append(f"{source}: unknown key '{key}'{hint}")
        elif "subkey" in ctx:
            lines.append(f"{source}: '{key}': {e['msg']}")
        else:
            lines.append(f"{source}: '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _free_form_error(kind: str, subkey: str, message: str) -> PydanticCustomError:
    """An error inside a mapping field (autoencoder.overrides, baselines.options): `subkey` is
    the key below the field, so the message names the whole dotted key."""
    if kind == "unknown_key":
        return PydanticCustomError("unknown_key", "unknown key", {"subkey": subkey, "hint": message})
    return PydanticCustomError("bad_value", "{detail}", {"subkey": subkey, "detail": message})


def with_absolute_paths(cfg: Config) -> Config:
    """`cfg` with every relative local path made absolute against the current directory: the
    run root, data.path and each section's *_uri (weights). For processes that run in another
    working directory (Ray Tune trials). s3:// URIs and absolute paths are unchanged."""
    from diffinf_ray.storage import absolute_uri

    tree = cfg.model_dump(mode="json")
    for name, section in tree.items():
        if not isinstance(section, dict):
            continue
        for key, value in section.items():
            if isinstance(value, str) and value and (
                    key.endswith("_uri") or (name, key) in {("run", "root"), ("data", "path")}):
                section[key] = absolute_uri(value)
    return Config.model_validate(tree)


def read_yaml_mapping(path: str | Path, kind: str = "config") -> dict:
    """The top-level mapping of a YAML file (`kind` names it in errors: config, experiment
    file, sweep file); a ConfigError when it is missing, not YAML or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{kind} {p} does not exist")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return tree


def load_config(path: str | Path | None, overrides: Overrides | None = None) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    source = str(path) if path else "<defaults>"
    tree: dict = read_yaml_mapping(path, "config file") if path else {}
    return validate_config(apply_overrides(tree, overrides, source), source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

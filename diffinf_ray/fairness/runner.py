"""`diffinf fairness CONFIG [key=value ...]`: the severity x method x seed comparison on biased
synthfaces draws (issue "fairness"; docs/FAIRNESS.md).

Config (FairnessConfig; an unknown key is an error naming it; jobs/configs/fairness*.yaml):

    name: fairness_tiny
    root: ./runs/fairness_tiny        # local folder
    ledger: ./runs/fairness_tiny/ledger   # ledger folder for the records; null: none
    executor: local                   # local (Ray-free loop) | ray (Ray Train, the harness)
    severities: [0.5, 0.95]           # share of each training class in its majority value
    seeds: [0, 1, 2]                  # each: its own synthfaces draw and initial weights
    methods:                          # a name, or {name, method, options, pretrain, ...}
      - erm
      - reweight
      - {name: group_dro, options: {step_size: 0.01}}
    data: {task: age, age_bins: [[18, 35], [50, 80]], num_samples: 1200, resolution: 32, ...}
    train: {epochs: 2, batch_size: 64, lr: 0.001, ...}   # config.TrainSection

A method entry {name: N, pretrain: P, method: M, pretrain_epochs: E, pretrain_options: O}
pretrains with ERM on the manifest the registered pretrainer P returns (methods.py: the plug
point; every synthetic-data variant is one: vanilla, lora, dreambooth, lora_cluster,
dreambooth_cluster, with the options O of fairness_gen/pretrain.py) and fine-tunes with method
M on the real training split.

Out, under <root>:
    data/severity_<s>/seed_<k>.parquet    the draw (manifest columns + spurious)
    cells/severity_<s>/seed_<k>/<N>.json  {method, severity, seed, test: group_accuracy(...),
                                           val: ..., history, wall_seconds}; a cell whose file
                                           exists is not trained again (resume)
    table.md, table.csv                   per severity and method: average and worst-group
                                          test accuracy, mean ± std (ddof 1) over seeds, and
                                          the paired difference to `erm` (same seed = same draw)
    per_group.md                          per-group test accuracy, mean over seeds
    worst_group_vs_severity.png           worst-group accuracy vs severity, one line per method
and, per (severity, seed), one ledger record (ledger.py schema; `kind: fairness`, conditions =
the method names, metrics = accuracy, worst_group_accuracy, mean_group_accuracy, per_group).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffinf_ray.config import (
    ConfigError,
    Fraction,
    RaySection,
    TrainSection,
    apply_overrides,
    format_validation_error,
    read_yaml_mapping,
)

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FairnessData(_Strict):
    task: Literal["age", "expression"] = "age"
    age_bins: list[tuple[float, float]] = [(18, 35), (50, 80)]
    num_samples: int = Field(2000, ge=10)
    num_identities: int = Field(600, ge=4)
    resolution: int = Field(32, ge=32, le=128)
    spurious_levels: Literal[2, 3] = 2
    split_fractions: tuple[Fraction, Fraction, Fraction] = (0.7, 0.15, 0.15)


class MethodEntry(_Strict):
    name: str
    method: str | None = None  # the training method (default: name; with `pretrain`: erm), the fine-tune one with P
    options: dict[str, Any] = {}
    pretrain: str | None = None
    pretrain_epochs: int = Field(2, ge=1)
    pretrain_options: dict[str, Any] = {}  # the pretrainer's own (fairness_gen/pretrain.py)

    @property
    def trainer(self) -> str:
        return self.method or ("erm" if self.pretrain else self.name)


class FairnessConfig(_Strict):
    name: str = "fairness"
    root: str = "./runs/fairness"
    ledger: str | None = None
    executor: Literal["local", "ray"] = "local"
    ray: RaySection = RaySection()  # executor ray: the cluster to join, or a local Ray's CPUs
    severities: list[Fraction] = [0.5, 0.9, 0.95, 0.99]
    seeds: list[int] = [0, 1, 2]
    methods: list[MethodEntry] = [MethodEntry(name=n) for n in
                                  ("erm", "reweight", "upsample", "group_dro")]
    data: FairnessData = FairnessData()
    train: TrainSection = TrainSection(epochs=5, lr=1e-3, head_hidden=128, checkpoint_every=1000)
    torch_threads: int | None = None  # the local loop's torch threads (None: torch's default)
    # rows chosen per (severity, seed) among trained methods by the validation split's
    # worst-group accuracy, as Sagawa et al. select Group-DRO's L2 (report.selected_results):
    # {row name: [method names]}; nothing more is trained
    select: dict[str, list[str]] = {}

    @field_validator("methods", mode="before")
    @classmethod
    def _names_to_entries(cls, value):
        if isinstance(value, list):
            value = [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[MethodEntry]):
        from diffinf_ray.baselines.registry import check_options
        from diffinf_ray.fairness.methods import METHODS, PRETRAINERS
        from diffinf_ray.fairness.options import GROUP_METHOD_OPTIONS

        names = [m.name for m in value]
        if len(set(names)) != len(names):
            raise ValueError(f"method names repeat: {names}")
        for m in value:
            if m.trainer not in METHODS:
                raise ValueError(f"{m.name}: unknown method {m.trainer!r}; known: "
                                 f"{sorted(METHODS)}")
            if m.pretrain is not None and m.pretrain not in PRETRAINERS:
                raise ValueError(f"{m.name}: no pretrainer {m.pretrain!r} is registered "
                                 f"(registered: {sorted(PRETRAINERS)})")
            if m.pretrain_options and m.pretrain is None:
                raise ValueError(f"{m.name}: pretrain_options without pretrain")
            check = getattr(PRETRAINERS.get(m.pretrain), "check_options", None)
            if check is not None and check(m.pretrain_options):
                raise ValueError(f"{m.name}: {check(m.pretrain_options)}")
            problem = check_options(m.trainer, m.options, GROUP_METHOD_OPTIONS)
            if problem:
                raise ValueError(f"{m.name}: {problem[1]}: {problem[2]}")
        return value

    @model_validator(mode="after")
    def _selections_name_methods(self) -> FairnessConfig:
        names = [m.name for m in self.methods]
        for row, candidates in self.select.items():
            if row in names:
                raise ValueError(f"select.{row}: a method is already called {row!r}")
            unknown = [c for c in candidates if c not in names]
            if unknown or not candidates:
                raise ValueError(f"select.{row}: {unknown or 'no candidates'} - candidates "
                                 f"must be among the methods {names}")
        return self


def load_fairness_config(path: str | Path, overrides=None) -> FairnessConfig:
    """Read, override (dotted key=value) and validate a fairness config."""
    source = str(path)
    tree = apply_overrides(read_yaml_mapping(path, "fairness config"), overrides, source,
                           schema=FairnessConfig)
    try:
        return FairnessConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
# ----------------------------------------------------------------------------- draws and cells


def _sev(severity: float) -> str:
    return f"{severity:g}"


def synthfaces_spec(cfg: FairnessConfig, severity: float, seed: int):
    from diffinf_ray.data.synthfaces import SynthFacesSpec

    d = cfg.data
    return SynthFacesSpec(task=d.task, resolution=d.resolution, seed=seed,
                          num_identities=d.num_identities,
                          age_bins=tuple(tuple(b) for b in d.age_bins), with_masks=False,
                          split_fractions=tuple(d.split_fractions), severity=severity,
                          spurious_levels=d.spurious_levels)


def draw_manifest(cfg: FairnessConfig, severity: float, seed: int):
    """The biased draw of (severity, seed) as a DataFrame, cached under <root>/data/."""
    import pandas as pd

    from diffinf_ray.data.synthfaces import generate_batch

    path = Path(cfg.root) / "data" / f"severity_{_sev(severity)}" / f"seed_{seed}.parquet"
    if path.is_file():
        return pd.read_parquet(path)
    batch = generate_batch(synthfaces_spec(cfg, severity, seed), np.arange(cfg.data.num_samples))
    df = pd.DataFrame({k: v for k, v in batch.items() if k != "mask"})
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)
    return df


def cell_path(cfg: FairnessConfig, severity: float, seed: int, name: str) -> Path:
    return Path(cfg.root) / "cells" / f"severity_{_sev(severity)}" / f"seed_{seed}" / f"{name}.json"


def plan(cfg: FairnessConfig) -> list[tuple[float, int, MethodEntry]]:
    """Every cell, in run order: severity, then seed, then method."""
    return [(s, k, m) for s in cfg.severities for k in cfg.seeds for m in cfg.methods]


def _split(df, split: str):
    return df[df["split"] == split].sort_values("sample_id", kind="stable")


def train_cell(cfg: FairnessConfig, df, entry: MethodEntry, seed: int, cell_dir: Path):
    """The trained test-time network of one cell, and its training history."""
    if cfg.executor == "ray":
        if entry.pretrain is not None:
            raise ConfigError(f"{entry.name}: pretraining entries run with executor local")
        from diffinf_ray.fairness.ray_train import train_cell_ray

        return train_cell_ray(cfg, df, entry, seed, cell_dir)
    return _train_cell_local(cfg, df, entry, seed, cell_dir)


def _model_factory(cfg: FairnessConfig, num_classes: int, seed: int, init=None):
    import copy

    import torch

    from diffinf_ray.models.classifier import build_classifier

    def factory():
        torch.manual_seed(seed)  # the same initial weights for every method of a seed
        net = build_classifier(num_classes, cfg.train.head_hidden)
        if init is not None:
            net.load_state_dict(copy.deepcopy(init.state_dict()))
        return net
    return factory


def _fit_rows(cfg, rows, entry_method: str, options, num_classes, seed, init, train):
    from diffinf_ray.fairness.methods import build_method
    from diffinf_ray.fairness.training import decode_images, fit_local, group_index, group_names

    names = group_names(rows["group"])
    groups = group_index(rows["group"], names)
    counts = np.bincount(groups, minlength=len(names))
    method = build_method(entry_method, num_classes, counts.tolist(), options,
                          _model_factory(cfg, num_classes, seed, init), train.lr)
    history = fit_local(method, decode_images(rows["image"]), rows["label"].to_numpy(), groups,
                        train, seed)
    return method, history


def _train_cell_local(cfg: FairnessConfig, df, entry: MethodEntry, seed: int, cell_dir: Path):
    import torch

    from diffinf_ray.fairness.methods import PRETRAINERS

    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    num_classes = _num_classes(cfg)
    train_rows = _split(df, "train")
    init, history = None, []
    if entry.pretrain is not None:
        # at high severity a minority group can have no training image: no generator is fitted
        # for it, so the "balanced" synthetic set leaves it out; say so
        missing = sorted(set(_split(df, "test").group) - set(train_rows.group))
        if missing:
            log.warning("%s, seed %d: no training image in group(s) %s: no generator and no "
                        "synthetic images for them", entry.name, seed, ", ".join(missing))
        context = {"seed": seed, "run_dir": str(cell_dir), "resolution": cfg.data.resolution,
                   "class_names": _class_names(cfg), "options": entry.pretrain_options}
        pre_rows = PRETRAINERS[entry.pretrain](train_rows.reset_index(drop=True), context)
        pre_train = cfg.train.model_copy(update={"epochs": entry.pretrain_epochs})
        pre, pre_history = _fit_rows(cfg, pre_rows, "erm", {}, num_classes, seed, None,
                                     pre_train)
        init, history = pre.eval_model(), [{"phase": "pretrain", **h} for h in pre_history]
    method, fine = _fit_rows(cfg, train_rows, entry.trainer, entry.options, num_classes, seed,
                             init, cfg.train)
    return method.eval_model(), history + fine


def _class_names(cfg: FairnessConfig) -> tuple[str, ...]:
    from diffinf_ray.data.synthfaces import class_names

    return class_names(synthfaces_spec(cfg, 0.5, 0))


def _num_classes(cfg: FairnessConfig) -> int:
    return len(_class_names(cfg))


def evaluate(model, df) -> dict:
    """group_accuracy on the val and test splits."""
    from diffinf_ray.fairness.metrics import group_accuracy
    from diffinf_ray.fairness.training import decode_images, predict

    out = {}
    for split in ("val", "test"):
        rows = _split(df, split)
        pred = predict(model, decode_images(rows["image"]))
        out[split] = group_accuracy(rows["label"].to_numpy(), pred, rows["group"].to_numpy())
    return out


def run_cell(cfg: FairnessConfig, severity: float, seed: int, entry: MethodEntry) -> dict:
    """Train and evaluate one cell (or read its finished result)."""
    path = cell_path(cfg, severity, seed, entry.name)
    if path.is_file():
        return json.loads(path.read_text())
    df = draw_manifest(cfg, severity, seed)
    start = time.time()
    model, history = train_cell(cfg, df, entry, seed, path.with_suffix(""))
    result = {"method": entry.name, "severity": severity, "seed": seed, **evaluate(model, df),
              "history": history, "wall_seconds": time.time() - start}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=True))
    t = result["test"]
    log.info("severity %s seed %d %s: test accuracy %.1f%%, worst group %.1f%% (%s), %.0f s",
             _sev(severity), seed, entry.name, t["accuracy"], t["worst_group_accuracy"],
             t["worst_group"], result["wall_seconds"])
    return result


def fairness_record(cfg: FairnessConfig, severity: float, seed: int, results: list[dict]) -> dict:
    """A ledger record (ledger.py, schema 1) of one (severity, seed): conditions = methods."""
    from diffinf_ray.ledger import SCHEMA, provenance, setting_hash

    config = {"run": {"name": cfg.name, "seed": seed}, "severity": severity,
              "data": cfg.data.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
              "methods": [m.model_dump(mode="json") for m in cfg.methods],
              "executor": cfg.executor}
    keys = ("accuracy", "worst_group_accuracy", "mean_group_accuracy", "worst_group",
            "per_group")
    return {"schema": SCHEMA, "kind": "fairness", "run": cfg.name, "task": cfg.data.task,
            "source": "synthfaces", "noise": {"kind": None, "rate": None}, "severity": severity,
            "seed": seed, "setting": setting_hash(config), "config": config, "stages": {},
            "metrics": {r["method"]: {k: r["test"][k] for k in keys} for r in results},
            **provenance()}


def run_fairness(cfg: FairnessConfig) -> list[dict]:
    """Every cell (finished ones are read back), a ledger record per new (severity, seed),
    then the table and the plot. Returns the cell results."""
    from contextlib import nullcontext

    from diffinf_ray.fairness.methods import PRETRAINERS
    from diffinf_ray.fairness.report import selected_results, write_summary
    from diffinf_ray.ray_session import ray_session_at
    from diffinf_ray.run_root import RunRoot

    # Ray Train cells, and pretrainers whose generators fit and sample on Ray
    needs_ray = cfg.executor == "ray" or any(
        getattr(PRETRAINERS.get(m.pretrain), "needs_ray", False) for m in cfg.methods)
    with ray_session_at(RunRoot(cfg.root), cfg.ray) if needs_ray else nullcontext():
        results = _run_cells(cfg)
    write_summary(cfg.root, results + selected_results(results, cfg.select))
    return results


def _run_cells(cfg: FairnessConfig) -> list[dict]:
    from diffinf_ray.ledger import write_record

    results = []
    for severity in cfg.severities:
        for seed in cfg.seeds:
            fresh = not all(cell_path(cfg, severity, seed, m.name).is_file()
                            for m in cfg.methods)
            cells = [run_cell(cfg, severity, seed, m) for m in cfg.methods]
            if fresh and cfg.ledger:
                write_record(fairness_record(cfg, severity, seed, cells), cfg.ledger)
            results += cells
    return results


def run_command(args) -> int:
    """`diffinf fairness CONFIG [key=value ...] [--dry-run]`."""
    cfg = load_fairness_config(args.config, args.overrides)
    if args.dry_run:
        for severity, seed, m in plan(cfg):
            done = cell_path(cfg, severity, seed, m.name).is_file()
            print(f"severity {_sev(severity)} seed {seed} {m.name}" + (" (done)" if done else ""))
        return 0
    run_fairness(cfg)
    print((Path(cfg.root) / "table.md").read_text())
    return 0

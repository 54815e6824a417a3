"""The experiment file's schema (ExperimentConfig; the format is in the package docstring) and
the conditions and metrics its table reports."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from diffinf_ray.baselines.registry import METHODS
from diffinf_ray.config import STAGES, as_override_mapping

DEFAULT_STAGES = ["ingest", "noise", "train", "evaluate", "influence", "removal", "baselines",
                  "autoencoder", "predictor", "lossnets", "edit", "refine", "retrain", "judges",
                  "oracle", "report"]
BASELINE_STAGES = ["ingest", "noise", "train", "evaluate"]  # clean ceiling, noise-rate runs
# Keys the runner sets itself per run; overriding them would make runs collide.
MANAGED_KEYS = ("run.root", "run.name", "run.seed", "stages")

# condition key -> its row label: the run's own conditions, the ceiling (ours) and every
# registered noisy-label method (baselines/registry.py)
CONDITIONS = {
    "noisy": "trained on noisy labels",
    "removal": "self-influence removal",
    "oracle_relabel": "oracle relabel (control)",
    "diffinf": "DiffInf (self-influence generation)",
    "clean": "clean labels (ceiling)",
    **{m.name: m.label for m in METHODS.values()},
}
# Table 1's rows in the paper's order, always shown; other conditions follow when measured
PAPER_ROWS = ("noisy", "small_loss", "elr_plus", "removal", "diffinf", "proselflc", "promix")
# metric column -> (label, digits)
# (the last epoch's, the paper's protocol; then the accuracy under best-validation selection)
METRICS = {"accuracy": ("acc (%)", 2), "auroc": ("AUROC", 2), "kappa": ("kappa", 3),
           "ece": ("ECE", 4), "accuracy_best_val": ("acc, best val (%)", 2)}

# dotted config key -> value; a list of `key=value` strings is read as the same mapping
OverrideMap = Annotated[dict[str, Any], BeforeValidator(as_override_mapping)]


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    root: str  # local folder or s3://bucket/prefix
    base: str  # pipeline config YAML (load_experiment: relative to the experiment file)
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    # run.seed (faces, splits, inits) is always the seed; these keys are set to it as well
    seed_keys: list[str] = ["noise.seed"]
    tasks: dict[str, OverrideMap] = Field(min_length=1)
    overrides: OverrideMap = {}
    stages: list[Literal[STAGES]] = Field(DEFAULT_STAGES, min_length=1)
    clean_ceiling: bool = True
    noise_rates: list[Annotated[float, Field(ge=0.0, le=1.0)]] = []
    # a results-ledger folder (e.g. benchmarks/ledger; relative: to the working directory):
    # runs it holds are not run again, finished runs are recorded (experiment/held.py)
    ledger: str | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds

    @field_validator("tasks")
    @classmethod
    def _task_names_and_keys(cls, tasks: dict) -> dict:
        for task, overrides in tasks.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", task):
                raise ValueError(f"task name {task!r}: use letters, digits, _ . - (a folder name)")
            _check_managed(overrides, f"tasks.{task}")
        return tasks

    @field_validator("overrides")
    @classmethod
    def _overrides_keys(cls, overrides: dict) -> dict:
        _check_managed(overrides, "overrides")
        return overrides

    @field_validator("seed_keys")
    @classmethod
    def _seed_keys(cls, keys: list[str]) -> list[str]:
        _check_managed({k: None for k in keys if k != "run.seed"}, "seed_keys")
        return keys


def _check_managed(overrides: dict, where: str) -> None:
    for key in overrides:
        if key in MANAGED_KEYS:
            raise ValueError(f"{where}: '{key}' is set by the runner per run; remove it")

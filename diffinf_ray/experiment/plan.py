"""The plan: every run of an experiment with its resolved pipeline config (module docstring of
diffinf_ray.experiment: run ids, run roots, the order)."""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from diffinf_ray.config import (
    Config,
    ConfigError,
    format_validation_error,
    load_config,
    read_yaml_mapping,
)
from diffinf_ray.experiment.spec import BASELINE_STAGES, ExperimentConfig
from diffinf_ray.storage import Location, StorageOptions


@dataclass(frozen=True)
class Run:
    task: str
    kind: str  # "methods" | "clean" | "noisy_<rate>"
    seed: int
    config: Config = field(repr=False)

    @property
    def id(self) -> str:
        return f"{self.task}/{self.kind}/seed_{self.seed}"

    @property
    def root(self) -> str:
        return self.config.run.root

    @property
    def noise_rate(self) -> float:
        return self.config.noise.rate

    @property
    def stages(self) -> list[str]:
        return list(self.config.stages)


def _join(uri: str, *parts: str) -> str:
    """`uri`/parts, keeping an s3 URI's query (endpoint_override=...) at the end."""
    base, _, query = uri.partition("?")
    return posixpath.join(base.rstrip("/") or "/", *parts) + (f"?{query}" if query else "")


def _resolve(exp: ExperimentConfig, task: str, kind: str, seed: int, extra: dict) -> Config:
    """Base YAML <- overrides <- task overrides <- seed keys <- run-kind keys <- run identity."""
    merged: dict = {**exp.overrides, **exp.tasks[task]}
    merged.update({key: seed for key in ["run.seed", *exp.seed_keys]})
    merged.update(extra)
    merged.update({"run.root": _join(exp.root, task, kind, f"seed_{seed}"),
                   "run.name": f"{exp.name}-{task}-{kind}-seed_{seed}"})
    try:
        return load_config(exp.base, merged)
    except ConfigError as err:
        raise ConfigError(f"experiment {exp.name!r}, run {task}/{kind}/seed_{seed}: {err}") from None


def plan(exp: ExperimentConfig) -> list[Run]:
    """Every run of the experiment with its resolved config, in execution order: seed-major,
    so a partly finished experiment already has whole seeds to show."""
    runs = []
    for seed in exp.seeds:
        for task in exp.tasks:
            methods = _resolve(exp, task, "methods", seed, {"stages": list(exp.stages)})
            runs.append(Run(task, "methods", seed, methods))
            task_rate = methods.noise.rate
            if exp.clean_ceiling:
                runs.append(Run(task, "clean", seed, _resolve(
                    exp, task, "clean", seed, {"noise.rate": 0.0, "stages": BASELINE_STAGES})))
            for rate in sorted(set(exp.noise_rates)):
                # the methods run and the clean ceiling already give these points
                if math.isclose(rate, task_rate) or (exp.clean_ceiling and rate == 0.0):
                    continue
                kind = f"noisy_{rate:g}"
                runs.append(Run(task, kind, seed, _resolve(
                    exp, task, kind, seed, {"noise.rate": rate, "stages": BASELINE_STAGES})))
    return runs


def experiment_location(exp: ExperimentConfig, runs: list[Run] | None = None) -> Location:
    """<root> as a Location, with the storage section (S3 endpoint) of the runs' configs."""
    storage = (runs or plan(exp))[0].config.storage
    return Location(exp.root, StorageOptions.of(storage))


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML; `base` is resolved against the file's folder and
    every planned run's config is validated, so errors surface before anything runs."""
    p = Path(path)
    tree = read_yaml_mapping(p, "experiment file")
    try:
        exp = ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(p))) from None
    base = Path(exp.base)
    if not base.is_absolute():
        exp = exp.model_copy(update={"base": str(p.parent / base)})
    plan(exp)
    return exp

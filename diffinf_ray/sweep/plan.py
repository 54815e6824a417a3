"""The plan of a sweep: the sweep file with the command line's keys, the base config, and which
stages run once in the base run root and which in every trial (package docstring, "Shared
work")."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from diffinf_ray.config import (
    STAGES,
    Config,
    ConfigError,
    Overrides,
    apply_overrides,
    as_override_mapping,
    fingerprint,
    load_config,
    override_config,
    parse_overrides,
    read_yaml_mapping,
    upstream_stages,
    with_absolute_paths,
)
from diffinf_ray.run_root import RunRoot
from diffinf_ray.storage import Location, StorageOptions, absolute_uri
from diffinf_ray.sweep.spec import Grid, ParamSpec, SweepConfig

EXPERIMENT = "tune"  # the Tune experiment's folder under the sweep root
TRIALS = "trials"


def affected_stages(base: Config, params: dict[str, ParamSpec],
                    source: str = "sweep") -> dict[str, set[str]]:
    """For each swept key, the stages whose fingerprint differs from the base's for some value
    the key can take (two distinct values of a range already show a dependence)."""
    base_fp = {s: fingerprint(base, s) for s in STAGES}
    affected: dict[str, set[str]] = {}
    for key, spec in params.items():
        affected[key] = set()
        for value in spec.candidates():
            cfg = override_config(base, {key: value}, f"{source}: params.{key}")
            affected[key] |= {s for s in STAGES if fingerprint(cfg, s) != base_fp[s]}
    return affected


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs from the driver (pickled into the Tune trainable)."""

    base_config: dict  # base + overrides, as JSON
    base_uri: str
    storage: StorageOptions
    trials_uri: str
    stages: tuple[str, ...]  # the objective stage and everything it reads, in pipeline order
    objective_stage: str
    epochs_per_report: int


@dataclass
class SweepPlan:
    spec: SweepConfig
    source: str  # the sweep file
    base_path: Path
    base: Config  # base + overrides
    root: Location  # the sweep root
    needed: list[str]  # the objective stage and everything it reads, in pipeline order
    shared: list[str]  # run once in the base run root
    per_trial: list[str]  # run in every trial (the objective stage last)
    max_reports: int  # Tune reports of the longest trial (ASHA's max_t)
    fingerprints: dict[str, str] = field(default_factory=dict)

    @property
    def base_root(self) -> RunRoot:
        from diffinf_ray.pipeline import open_run_root

        return open_run_root(self.base)

    @property
    def experiment(self) -> Location:
        return self.root.child(EXPERIMENT)

    @property
    def trials(self) -> Location:
        return self.root.child(TRIALS)

    def identity(self) -> dict:
        """What a restored experiment must have been started with."""
        spec = self.spec.model_dump(mode="json", include={
            "params", "num_samples", "points_to_evaluate", "metric", "mode", "scheduler",
            "objective_stage", "epochs_per_report", "seed"})
        return {"sweep": spec, "base_fingerprints": self.fingerprints}

    @property
    def total_trials(self) -> int:
        """num_samples per point of the grid (the product of the grid params' lengths)."""
        return self.spec.num_samples * math.prod(
            len(p.grid) for p in self.spec.params.values() if isinstance(p, Grid))

    def param_space(self) -> dict:
        return {key: spec.domain() for key, spec in self.spec.params.items()}

    def trial_setup(self) -> TrialSetup:
        base_root = self.base_root
        return TrialSetup(
            base_config=self.base.model_dump(mode="json"),
            base_uri=base_root.base.uri, storage=base_root.options, trials_uri=self.trials.uri,
            stages=tuple(self.needed), objective_stage=self.spec.objective_stage,
            epochs_per_report=self.spec.epochs_per_report)


def reports_per_trial(epochs: int, epochs_per_report: int, lr_schedule: str) -> list[int]:
    """The epoch at which each Tune report of a trial is made (the last is `epochs`)."""
    step = epochs if lr_schedule != "constant" else min(epochs_per_report, epochs)
    return [*range(step, epochs, step), epochs]


def _with_command_line(tree: dict, overrides: Overrides | None, source: str) -> dict:
    """The sweep file's tree with the command line's dotted keys: sweep keys (`num_samples=4`,
    `scheduler.kind=fifo`, `params.edit.w_id={choice: [1, 2]}`) set in it; any other key is
    a base config key, added to `overrides` (after the file's own)."""
    sweep_keys, params, base_keys = {}, {}, {}
    for key, value in parse_overrides(overrides).items():
        head, _, rest = key.partition(".")
        if head == "params" and rest:  # the keys of params and overrides are dotted config keys
            params[rest] = value
        elif head == "overrides" and rest:
            base_keys[rest] = value
        elif head in SweepConfig.model_fields:
            sweep_keys[key] = value
        else:
            base_keys[key] = value
    tree = apply_overrides(tree, sweep_keys, source, schema=SweepConfig)
    if params:
        tree["params"] = {**(tree.get("params") or {}), **params}
    if base_keys:
        try:
            tree["overrides"] = {**as_override_mapping(tree.get("overrides") or {}), **base_keys}
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"{source}: 'overrides': {err}") from None
    return tree


def load_sweep(path: str | Path, overrides: Overrides | None = None) -> SweepPlan:
    """Read and validate a sweep file. `overrides` (dotted) set sweep keys (`num_samples=4`,
    `scheduler.kind=fifo`); any other key is appended to the base config's `overrides`."""
    source = str(path)
    p = Path(path)
    tree = _with_command_line(read_yaml_mapping(p, "sweep file"), overrides, source)
    try:
        spec = SweepConfig.model_validate(tree)
    except ValidationError as err:
        lines = [f"{source}: '{'.'.join(map(str, e['loc']))}': {e['msg']}" for e in err.errors()]
        raise ConfigError("\n".join(lines)) from None
    spec.name = spec.name or p.stem
    base_path = (p.parent / spec.base).resolve() if not Path(spec.base).is_absolute() \
        else Path(spec.base)
    base = load_config(base_path, spec.overrides)
    # Tune runs each trial in its own working directory: relative paths would point there.
    base = with_absolute_paths(base)
    if spec.root:
        spec.root = absolute_uri(spec.root)

    objective = spec.objective_stage
    needed = [s for s in STAGES if s == objective or s in upstream_stages(objective, base)]
    by_key = affected_stages(base, spec.params, source)
    for key, stages in by_key.items():
        if objective not in stages and len({json.dumps(v) for v in
                                            spec.params[key].candidates()}) > 1:
            raise ConfigError(f"{source}: params.{key} changes neither objective_stage "
                              f"{objective} nor a stage it reads; every value would score "
                              "the same")
    for i, point in enumerate(spec.points_to_evaluate):  # a bad value fails here, not in a trial
        override_config(base, point, f"{source}: points_to_evaluate[{i}]")
    affected = set().union(*by_key.values())
    epochs = [base.train.epochs]
    if "train.epochs" in spec.params:
        epochs = [int(v) for v in spec.params["train.epochs"].candidates()]
    max_reports = max(len(reports_per_trial(e, spec.epochs_per_report, base.train.lr_schedule))
                      for e in epochs)

    options = StorageOptions.of(base.storage)
    base_location = Location(base.run.root, options)
    root = Location(spec.root, options) if spec.root else base_location.child("sweeps", spec.name)
    if type(root.fs) is not type(base_location.fs):
        # trials read the base run's folders through the trial root's filesystem
        raise ConfigError(f"{source}: root {root.display} and the base run root "
                          f"{base_location.display} must be on the same storage")
    return SweepPlan(
        spec=spec, source=source, base_path=base_path, base=base, root=root, needed=needed,
        shared=[s for s in needed if s not in affected],
        per_trial=[s for s in needed if s in affected], max_reports=max_reports,
        fingerprints={s: fingerprint(base, s) for s in needed})



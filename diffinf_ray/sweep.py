"""`diffinf sweep CONFIG`: a Ray Tune sweep over settings of the method (the edit loss weights
w_id, w_reg, w_si; the high-influence fraction tau; the noise rate), scored by the clean
validation accuracy of the classifier trained at the end of the pipeline.

Sweep file (SweepConfig; `base` is relative to the sweep file's folder, `root` like run.root):

    base: diffinf_age32.yaml              # the pipeline config every trial starts from
    overrides: {train.epochs: 6}          # dotted keys applied to the base (as `diffinf run`;
                                          #   a list [train.epochs=6] is read the same)
    params:                               # dotted config keys -> one search space each
      edit.w_id: {loguniform: [0.1, 10]}  #   uniform | loguniform: [lo, hi]
      influence.tau: {choice: [0.05, 0.1, 0.2]}   # choice | grid: [values]
    objective_stage: retrain              # or removal (train without the flagged set)
    metric: val_accuracy                  # of the objective stage's classifier; mode max
    scheduler: {kind: asha, grace_period: 1, reduction_factor: 2}
    epochs_per_report: 2                  # one Tune report (an ASHA rung) per chunk of epochs
    points_to_evaluate:                   # optional: tried first (each replaces one sample)
      - {edit.w_id: 1.0}                  #   e.g. the base's own values, as a reference

Shared work. A trial's config is base + overrides + its sampled values. The stages whose
fingerprint (config.fingerprint) is the same for every value a param can take run once, before
any trial, in the base config's run root; each trial reads their outputs from there through a
`SharedRunRoot` and runs only the stages downstream of the swept sections, under
`<sweep root>/trials/<trial_id>/` (stage markers `stages/<stage>.json` always in the trial).
Sweeping `edit.*` shares ingest, noise, train (the baseline classifier), influence, the
autoencoder, predictor and loss networks; `influence.tau` also reruns TracIn scoring per trial
(tau is part of the influence stage's settings); `noise.rate` necessarily reruns everything
from the noise stage on (the labels change), so only ingest is shared. The shared stages run
in the base run root after `overrides`: if the overrides change their settings, that run's
stages are rebuilt as `diffinf run BASE overrides` would (set `run.root` in `overrides` to
keep an existing run untouched).

Objective. The objective stage's classifier (`retrain`: on the refined set; `removal`: on the
noisy set minus the high-influence rows) is trained in chunks of `epochs_per_report` epochs,
each chunk a Ray Train run that resumes the previous one from its checkpoints; after each
chunk the trial reports `val_accuracy` (also val_loss, train_*) with `tune.report`. Tune's
function trainables report synchronously, so ASHA can only stop a trial while it waits in
`tune.report`, between Train runs, never while a Train worker group is alive (RAY_NOTES 3.2:
stopping a trial mid-Train leaks the Train placement groups). After the last chunk the
classifier is evaluated on the clean test split and `test_accuracy` is reported (not the
objective). A cosine learning-rate schedule depends on `train.epochs`, so with one the
objective trains in a single chunk.

Out, under the sweep root (default `<base run.root>/sweeps/<name>`; local or s3://):
    tune/                       the Tune experiment (Tuner.restore resumes it)
    trials/<trial_id>/          each trial's run root (its own stages, config.yaml)
    results.csv                 one row per trial: trial_id, status, params, the objective,
                                test_accuracy, epochs, trial_root (best first)
    best.json                   the best finished trial and the overrides that reproduce it
    objective_vs_<param>.png    the objective against each swept key
    sweep.json                  what the experiment was started with (a restore must match)

Resume: running the same sweep again restores the Tune experiment (`Tuner.restore`,
unfinished and errored trials resumed, finished ones kept); `--no-restore` deletes the
experiment and its trials and starts over.
"""

from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from diffinf_ray.config import (
    STAGES,
    Config,
    ConfigError,
    Overrides,
    apply_overrides,
    as_override_mapping,
    fingerprint,
    load_config,
    override_args,
    override_config,
    parse_overrides,
    read_yaml_mapping,
    upstream_stages,
    with_absolute_paths,
)
from diffinf_ray.pipeline import is_done, run_pipeline
from diffinf_ray.run_root import RunRoot
from diffinf_ray.stage_registry import REGISTRY
from diffinf_ray.storage import Location, StorageOptions, absolute_uri

log = logging.getLogger(__name__)

EXPERIMENT = "tune"  # the Tune experiment's folder under the sweep root
TRIALS = "trials"
OBJECTIVE_METRICS = ("val_accuracy", "val_loss", "train_accuracy", "train_loss")

# -- the sweep file ------------------------------------------------------------------------

# choice/grid values: anything a config key takes (influence.layers: [null, [head]])
Value = bool | int | float | str | None | list


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Range(_Model):
    def bounds(self) -> tuple[float, float]:
        raise NotImplementedError

    @model_validator(mode="after")
    def _ordered(self):
        lo, hi = self.bounds()
        if not lo < hi:
            raise ValueError(f"needs lo < hi, got [{lo}, {hi}]")
        return self


class Uniform(_Range):
    uniform: tuple[float, float]

    def bounds(self) -> tuple[float, float]:
        return self.uniform

    def candidates(self) -> list:
        return list(self.uniform)

    def domain(self):
        from ray import tune

        return tune.uniform(*self.uniform)


class LogUniform(_Range):
    loguniform: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]

    def bounds(self) -> tuple[float, float]:
        return self.loguniform

    def candidates(self) -> list:
        return list(self.loguniform)

    def domain(self):
        from ray import tune

        return tune.loguniform(*self.loguniform)


class Choice(_Model):
    choice: list[Value] = Field(min_length=1)

    def candidates(self) -> list:
        return list(self.choice)

    def domain(self):
        from ray import tune

        return tune.choice(self.choice)


class Grid(_Model):
    grid: list[Value] = Field(min_length=1)

    def candidates(self) -> list:
        return list(self.grid)

    def domain(self):
        from ray import tune

        return tune.grid_search(self.grid)


ParamSpec = Uniform | LogUniform | Choice | Grid


class SchedulerSection(_Model):
    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)  # reports before ASHA may stop a trial
    reduction_factor: float = Field(2, gt=1)


class SweepConfig(_Model):
    base: str  # pipeline config, relative to the sweep file's folder
    # dotted key -> value, applied to the base; a list of `key=value` strings reads the same
    overrides: Annotated[dict[str, Any], BeforeValidator(as_override_mapping)] = {}
    name: str | None = None  # default: the sweep file's stem
    root: str | None = None  # default: <base run.root>/sweeps/<name>
    params: dict[str, ParamSpec] = Field(min_length=1)
    num_samples: int = Field(1, ge=1)  # samples per grid point
    # Settings tried first, e.g. the base config's own values as a reference trial
    # ([{edit.w_id: 1.0, edit.w_reg: 1.0, edit.w_si: 1.0}]). Tune's rule: each point replaces
    # one of the num_samples; keys a point leaves out are sampled.
    points_to_evaluate: list[dict[str, Value]] = []
    metric: Literal[OBJECTIVE_METRICS] = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSection = SchedulerSection()
    # Trials run side by side; each Train run inside one asks for its own workers (train.*),
    # so on one GPU (or 2 CPUs) keep this at 1.
    max_concurrent_trials: int = Field(1, ge=1)
    trial_cpus: float = Field(0.5, gt=0)  # the trial driver only: Train asks for its own
    max_failures: int = Field(0, ge=0)  # retries of a failed trial (from its last report)
    objective_stage: Literal["retrain", "removal"] = "retrain"
    epochs_per_report: int = Field(1, ge=1)
    seed: int = 0  # of the random search

    @model_validator(mode="after")
    def _points_fit(self) -> SweepConfig:
        for i, point in enumerate(self.points_to_evaluate):
            unknown = sorted(set(point) - set(self.params))
            if unknown:
                raise ValueError(f"points_to_evaluate[{i}] sets {unknown}, which are not "
                                 f"swept params ({sorted(self.params)})")
        if len(self.points_to_evaluate) > self.num_samples:
            raise ValueError(f"{len(self.points_to_evaluate)} points_to_evaluate need "
                             f"num_samples >= {len(self.points_to_evaluate)} (each point "
                             "replaces one sample)")
        return self


# -- the plan: what runs once, what runs per trial ----------------------------------------


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
    needed = [s for s in STAGES if s == objective or s in upstream_stages(objective)]
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

    options = StorageOptions(base.storage.endpoint_override, base.storage.region)
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


# -- a trial's run root: shared stages read from the base run -----------------------------


@dataclass(frozen=True)
class SharedStorageOptions(StorageOptions):
    """Storage options of a sweep trial's root, carrying its routing (the root travels
    pickled to Ray Data actors, the edit stage's, and routes the same way there)."""

    trial_uri: str = ""
    base_uri: str = ""
    shared_stages: tuple[str, ...] = ()


class SharedRunRoot(RunRoot):
    """A sweep trial's run root. `child(folder)` of a folder owned by a shared stage (one whose
    base-run marker is done with the fingerprint the trial config gives it) resolves to the
    base run root; every other folder, and every stage marker, is the trial's own.
    `stage_record` of a shared stage is the base run's, so `run_stage` skips it."""

    def __init__(self, uri: str, options: SharedStorageOptions):
        super().__init__(uri, options)
        self.shared_base = RunRoot(options.base_uri,
                                   StorageOptions(options.endpoint_override, options.region))
        self.shared_stages = frozenset(options.shared_stages)
        self._routes = {folder for stage in self.shared_stages
                        for folder in REGISTRY[stage].outputs}

    @classmethod
    def for_trial(cls, base: RunRoot, trial_uri: str, cfg: Config,
                  exclude: Iterable[str] = ()) -> SharedRunRoot:
        """The trial root at `trial_uri` for config `cfg`, sharing with `base` every stage
        (but `exclude`) that base has done with the same fingerprint."""
        shared = [s for s in STAGES if s not in exclude and is_done(base, cfg, s)]
        trial = Location(trial_uri, base.options)
        options = SharedStorageOptions(
            base.options.endpoint_override, base.options.region, trial_uri=trial.uri,
            base_uri=base.base.uri, shared_stages=tuple(shared))
        return cls(trial.uri, options)

    def child(self, *parts: str) -> Location:
        if parts and parts[0] in self._routes:
            return self.shared_base.child(*parts)
        return self.base.child(*parts)

    @property
    def manifest(self) -> Location:
        return self.child("manifest")

    @property
    def quarantine(self) -> Location:
        return self.child("quarantine")

    @property
    def noisy_manifest(self) -> Location:
        return self.child("manifest_noisy")

    @property
    def checkpoints(self) -> Location:
        return self.child("checkpoints")

    @property
    def evaluation(self) -> Location:
        return self.child("evaluation")

    def stage_record(self, stage: str) -> dict | None:
        if stage in self.shared_stages:
            return self.shared_base.stage_record(stage)
        return super().stage_record(stage)

    def _own(self, stage: str) -> None:
        if stage in self.shared_stages:
            raise RuntimeError(f"stage {stage} is shared with the base run "
                               f"{self.shared_base}; a trial must not rerun it")

    def mark_started(self, stage: str, fingerprint: str) -> None:
        self._own(stage)
        super().mark_started(stage, fingerprint)

    def mark_done(self, stage: str, fingerprint: str, summary: dict, seconds: float,
                  inputs: dict | None = None) -> None:
        self._own(stage)
        super().mark_done(stage, fingerprint, summary, seconds, inputs)

    def mark_failed(self, stage: str, fingerprint: str, error: str) -> None:
        self._own(stage)
        super().mark_failed(stage, fingerprint, error)


# -- the trainable ------------------------------------------------------------------------


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


def _objective_inputs(stage: str, root: RunRoot) -> tuple[Location, frozenset | None, dict]:
    """(manifest to train on, rows to leave out, extra metrics) of the objective stage, as
    stages/refine.py:run_retrain and stages/detectors.py:run_removal train."""
    if stage == "retrain":
        from diffinf_ray.stages.refine import REFINED

        return root.child(REFINED), None, {}
    from diffinf_ray.artifacts import high_influence_ids

    flagged = high_influence_ids(root)
    return root.noisy_manifest, flagged, {"removed_rows": len(flagged)}


def _reported_epoch() -> int:
    """The epoch of this trial's last Tune checkpoint (a restored or retried trial)."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        return int(json.loads((Path(d) / "progress.json").read_text())["epoch"])


def _report(metrics: dict) -> None:
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "progress.json").write_text(json.dumps({"epoch": metrics["epoch"]}))
        # Blocks until Tune asks for the next result; a scheduler stop ends the trial here.
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def train_objective(cfg: Config, root: RunRoot, setup: TrialSetup) -> dict:
    """The objective stage's work in chunks of epochs, a Tune report after each but the last
    (module docstring); the pipeline's `run_stage` runs it in place of the stage's own."""
    from diffinf_ray.models.evaluation import evaluate_checkpoints
    from diffinf_ray.models.training import train_classifier

    stage = setup.objective_stage
    manifest, exclude_ids, extra = _objective_inputs(stage, root)
    out = root.child(stage)
    base_metrics = {"trial_root": root.display, "epochs": cfg.train.epochs}
    done_epoch = _reported_epoch()
    ends = reports_per_trial(cfg.train.epochs, setup.epochs_per_report, cfg.train.lr_schedule)
    metrics: dict = {}
    for end in ends:
        if end <= done_epoch and end != ends[-1]:
            continue
        chunk = cfg.model_copy(deep=True)
        chunk.train.epochs = end
        # A Train run on the same checkpoints folder resumes after its latest epoch.
        trained = train_classifier(chunk, manifest, out.child("checkpoints"),
                                   len(cfg.class_names), exclude_ids=exclude_ids)
        metrics = {k: float(trained[k]) for k in OBJECTIVE_METRICS if k in trained}
        if end != ends[-1]:
            _report({**base_metrics, **metrics, "epoch": end})
    evaluation = evaluate_checkpoints(cfg, manifest, out.child("checkpoints"),
                                      out.child("evaluation"), extra=extra)
    return {**evaluation, **metrics}


def run_trial(params: dict, setup: TrialSetup) -> None:
    """Tune function trainable: the stages this trial's values affect, then the objective;
    the stages it shares with the base run are skipped (done there with the same
    fingerprint). The final report follows the objective's stage record, so a trial restored
    after it finished reports the same result again."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    base = RunRoot(setup.base_uri, setup.storage)
    trial_uri = Location(setup.trials_uri, setup.storage).child(trial_id).uri
    cfg = override_config(Config.model_validate(setup.base_config),
                          {**params, "run.root": trial_uri}, f"trial {trial_id}")
    root = SharedRunRoot.for_trial(base, trial_uri, cfg, exclude={setup.objective_stage})
    objective = setup.objective_stage
    run = run_pipeline(cfg, stages=list(setup.stages), root=root,
                       bodies={objective: partial(train_objective, setup=setup)})
    summary = run[objective]
    _report({"trial_root": root.display, "epochs": cfg.train.epochs,
             **{k: summary[k] for k in OBJECTIVE_METRICS if k in summary},
             "epoch": cfg.train.epochs, "test_accuracy": float(summary["accuracy"])})


def _trial_dirname(trial) -> str:
    return trial.trial_id  # params in folder names get long; results.csv lists them


# -- the driver ---------------------------------------------------------------------------


def _check_same_sweep(plan: SweepPlan, restoring: bool) -> None:
    marker = plan.root.child("sweep.json")
    if restoring and marker.exists():
        before = marker.read_json()
        if before != plan.identity():
            raise ConfigError(
                f"{plan.root.display} holds a sweep started with other settings (params, "
                "scheduler, objective or base fingerprints differ); Tune cannot change a "
                "search space on restore. Use --no-restore to start over, or another name")
    else:
        marker.write_json(plan.identity())


def _clear(plan: SweepPlan) -> None:
    for name in (EXPERIMENT, TRIALS, "results.csv", "best.json", "sweep.json"):
        plan.root.child(name).delete()
    for path in plan.root.list_files(".png"):
        if posixpath.basename(path).startswith("objective_vs_"):
            plan.root.child(posixpath.basename(path)).delete()


def search_algorithm(spec: SweepConfig):
    """Tune's random/grid search: `points_to_evaluate` first, then seeded samples."""
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(
        points_to_evaluate=[dict(p) for p in spec.points_to_evaluate] or None,
        max_concurrent=spec.max_concurrent_trials, random_state=spec.seed)


def build_tuner(plan: SweepPlan, restore: bool = True, callbacks: list | None = None):
    """A Tuner for the sweep: restored from the sweep root's experiment when there is one."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    spec = plan.spec
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=plan.trial_setup()),
                                    {"cpu": spec.trial_cpus})
    fs = {} if plan.root.is_local else {"storage_filesystem": plan.root.fs}
    if restore and tune.Tuner.can_restore(plan.experiment.path, **fs):
        log.info("sweep: restoring the Tune experiment at %s", plan.experiment.display)
        return tune.Tuner.restore(plan.experiment.path, trainable, resume_unfinished=True,
                                  resume_errored=True, **fs)
    if spec.scheduler.kind == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=plan.max_reports,
                                  grace_period=min(spec.scheduler.grace_period, plan.max_reports),
                                  reduction_factor=spec.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=plan.param_space(),
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
            scheduler=scheduler, trial_dirname_creator=_trial_dirname,
            search_alg=search_algorithm(spec)),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=plan.root.path, callbacks=callbacks,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures), **fs),
    )


def check_trial_resources(plan: SweepPlan, cluster_cpus: float) -> None:
    """Concurrent trials must leave a whole CPU for Ray Data's read tasks (each asks for 1):
    otherwise the objective's Train run waits forever for its first block (RAY_NOTES 2.7)."""
    spec, train = plan.spec, plan.base.train
    per_trial = spec.trial_cpus + train.num_workers * train.cpus_per_worker
    held = spec.max_concurrent_trials * per_trial
    if cluster_cpus - held < 1:
        raise ConfigError(
            f"{plan.source}: {spec.max_concurrent_trials} trial(s) x (trial_cpus "
            f"{spec.trial_cpus} + {train.num_workers} Train worker(s) x train.cpus_per_worker "
            f"{train.cpus_per_worker}) hold {held:g} of the cluster's {cluster_cpus:g} CPUs, "
            "leaving less than 1 for Ray Data's read tasks: the trials would hang. Lower "
            "max_concurrent_trials, trial_cpus or train.cpus_per_worker (e.g. "
            "`overrides: [train.cpus_per_worker=0.5]`: it does not change any stage's "
            "fingerprint), or add CPUs")


def run_sweep(plan: SweepPlan, restore: bool = True, callbacks: list | None = None) -> dict:
    """Run (or resume) the sweep: the shared stages once, then the Tune experiment; write
    results.csv, best.json and the plots. Returns the summary `write_results` gives.

    `callbacks`: extra Tune callbacks (loggers) for a new experiment; a restored one keeps
    those it was started with."""
    from diffinf_ray.pipeline import run_pipeline
    from diffinf_ray.ray_session import ray_session

    if not restore:
        log.info("sweep: --no-restore, deleting %s", plan.root.display)
        _clear(plan)
    restoring = plan.experiment.child("tuner.pkl").exists()
    _check_same_sweep(plan, restoring)
    with ray_session(plan.base):
        import ray

        check_trial_resources(plan, ray.cluster_resources().get("CPU", 0.0))
        if plan.shared:
            log.info("sweep: shared stages %s in the base run root %s", plan.shared,
                     plan.base_root)
            run_pipeline(plan.base, stages=plan.shared)
        grid = build_tuner(plan, restore, callbacks).fit()
        return write_results(plan, grid)


def _trial_rows(plan: SweepPlan, grid) -> list[dict]:
    metric = plan.spec.metric
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or posixpath.basename(str(result.path).rstrip("/"))
        if result.error is not None:
            status = "error"
        elif "test_accuracy" in metrics:
            status = "done"
        elif metrics:
            status = "stopped"  # by the scheduler, or the sweep was interrupted
        else:
            status = "not run"
        row = {"trial_id": trial_id, "status": status}
        row.update({key: result.config.get(key) for key in plan.spec.params})
        row[metric] = metrics.get(metric)
        row["test_accuracy"] = metrics.get("test_accuracy")
        row["epochs"] = metrics.get("epoch")
        row["trial_root"] = plan.trials.child(trial_id).display
        rows.append(row)
    sign = -1 if plan.spec.mode == "max" else 1
    rows.sort(key=lambda r: (r["status"] != "done", r[metric] is None,
                             sign * (r[metric] if r[metric] is not None else 0)))
    return rows


def write_results(plan: SweepPlan, grid) -> dict:
    """results.csv, best.json and objective_vs_<param>.png under the sweep root."""
    import pandas as pd

    rows = _trial_rows(plan, grid)
    metric = plan.spec.metric
    plan.root.child("results.csv").write_bytes(pd.DataFrame(rows).to_csv(index=False).encode())
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "stopped", "error", "not run")}
    # Trials not yet created (the search was interrupted) are missing from the grid.
    incomplete = (max(plan.total_trials, len(rows)) - grid.num_terminated - grid.num_errors)
    finished = [r for r in rows if r["status"] == "done"]
    best = None
    if finished:
        top = finished[0]
        params = {k: top[k] for k in plan.spec.params}
        best = {
            "trial_id": top["trial_id"], "metric": metric, "mode": plan.spec.mode,
            "objective_stage": plan.spec.objective_stage, "value": top[metric],
            "test_accuracy": top["test_accuracy"], "params": params,
            "trial_root": top["trial_root"],
            "reproduce": "diffinf run " + " ".join(
                [str(plan.base_path), *override_args(plan.spec.overrides),
                 *(f"{k}={json.dumps(v)}" for k, v in params.items())]),
        }
        plan.root.child("best.json").write_json(best)
    for key in plan.spec.params:
        plot_objective(plan, rows, key)
    return {"root": plan.root.display, "trials": len(rows), **counts,
            "interrupted": incomplete > 0, "best": best}


def plot_objective(plan: SweepPlan, rows: list[dict], key: str) -> None:
    """objective_vs_<key>.png: finished trials filled, scheduler-stopped ones hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, spec = plan.spec.metric, plan.spec.params[key]
    points = [r for r in rows if r[metric] is not None and r[key] is not None]
    numeric = all(isinstance(r[key], int | float) and not isinstance(r[key], bool)
                  for r in points)
    categories = [json.dumps(v) for v in spec.candidates()] if not numeric else []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for status, style in (("done", {"color": "C0"}),
                          ("stopped", {"facecolors": "none", "edgecolors": "C0"})):
        sel = [r for r in points if r["status"] == status]
        if not sel:
            continue
        xs = [r[key] if numeric else categories.index(json.dumps(r[key])) for r in sel]
        ax.scatter(xs, [r[metric] for r in sel], label=status, **style)
    if isinstance(spec, LogUniform):
        ax.set_xscale("log")
    if categories:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(key)
    ax.set_ylabel(f"{metric} ({plan.spec.objective_stage})")
    ax.set_title(f"{plan.spec.name}: {len(points)} trials")
    if points:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    plan.root.child(f"objective_vs_{key}.png").write_bytes(buf.getvalue())


# -- the command --------------------------------------------------------------------------


def describe(plan: SweepPlan) -> str:
    spec = plan.spec
    lines = [
        f"sweep {spec.name}: {plan.source}",
        f"  base config      {plan.base_path} {' '.join(override_args(spec.overrides))}".rstrip(),
        f"  base run root    {plan.base_root} (shared stages)",
        f"  sweep root       {plan.root.display}",
        f"  shared, run once {', '.join(plan.shared) or '-'}",
        f"  per trial        {', '.join(plan.per_trial)}",
        f"  objective        {spec.metric} ({spec.mode}) of {spec.objective_stage}; "
        f"{plan.max_reports} report(s) per trial, scheduler {spec.scheduler.kind}",
        f"  trials           num_samples {spec.num_samples}, at most "
        f"{spec.max_concurrent_trials} at a time, {spec.trial_cpus} CPU per trial driver",
        *(f"  tried first      {json.dumps(p)}" for p in spec.points_to_evaluate),
        "  params",
    ]
    lines += [f"    {k}: {v.model_dump(mode='json')}" for k, v in spec.params.items()]
    if plan.experiment.child("tuner.pkl").exists():
        lines.append(f"  an experiment exists at {plan.experiment.display}: it is restored "
                     "(--no-restore starts over)")
    return "\n".join(lines)


def _print_results(summary: dict, plan: SweepPlan) -> None:
    metric = plan.spec.metric
    print(f"\nsweep {plan.spec.name}: {summary['trials']} trials, {summary['done']} finished, "
          f"{summary['stopped']} stopped early, {summary['error']} failed")
    best = summary.get("best")
    if best:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in best["params"].items())
        print(f"best: {metric} {best['value']:.2f} (test accuracy {best['test_accuracy']:.2f}) "
              f"with {params}\n  {best['trial_root']}\n  reproduce: {best['reproduce']}")
    print(f"results: {plan.root.child('results.csv').display}")


def run_command(args) -> int:
    """`diffinf sweep` with parsed arguments (config, overrides, restore, dry_run; see
    cli.add_sweep_arguments). Exit status 0; 1 when a trial failed; 130 when interrupted."""
    plan = load_sweep(args.config, args.overrides)
    print(describe(plan))
    if args.dry_run:
        return 0
    summary = run_sweep(plan, restore=args.restore)
    _print_results(summary, plan)
    if summary["interrupted"]:
        print("the sweep was interrupted; run the same command again to resume it")
        return 130
    return 1 if summary["error"] else 0


def main(argv: list[str] | None = None) -> int:
    """`diffinf sweep CONFIG [key=value ...] [--restore/--no-restore] [--dry-run]`
    (diffinf_ray.cli)."""
    import sys

    from diffinf_ray.cli import main as diffinf_main

    return diffinf_main(["sweep", *(sys.argv[1:] if argv is None else argv)])

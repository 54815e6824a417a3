"""`diffinf experiment CONFIG`: the Table-1 runner (METHOD.md, "The paper's Table 1").

For each task (e.g. age 3-class at 30% noise, expression 4-class at 20%) and each seed, one
pipeline run trains every method on the same noisy labels (the base config's stages: noisy
baseline, removal, the noisy-label baselines, DiffInf's edit + retrain, ...); optionally a
clean-label ceiling run and noisy-baseline runs at other noise rates. Then the per-run metrics
are aggregated into one Table-1-shaped result.

Experiment YAML (ExperimentConfig; an unknown key is an error naming it):

    name: table1
    root: ./runs/table1             # local folder or s3://bucket/prefix (relative: to the cwd)
    base: diffinf_age32.yaml        # pipeline config; relative: to this file's folder
    seeds: [0, 1, 2]                # each sets run.seed and the keys of `seed_keys`
    seed_keys: [noise.seed]         # (default) so each seed also draws its own label noise
    tasks:                          # per task, dotted overrides on top of the base
      age: {data.task: age, noise.rate: 0.3}
      expression: {data.task: expression, noise.rate: 0.2}
    overrides: {train.epochs: 10}   # on every run, before the task's
    # overrides (and each task's) map dotted keys to values, as in sweep files; a list of
    # key=value strings ([train.epochs=10]) is read as the same mapping
    stages: [ingest, noise, ...]    # what each task run executes
    clean_ceiling: true             # + per task and seed: noise.rate=0, ingest..evaluate
    noise_rates: [0.1, 0.4]         # + per task, rate and seed: noisy baseline only

Runs (`plan`, deterministic: seed, then task, then methods / clean / noisy_<rate>):
    <root>/<task>/methods/seed_<s>     the task's noise rate, `stages`
    <root>/<task>/clean/seed_<s>       noise.rate=0; ingest, noise, train, evaluate
    <root>/<task>/noisy_<rate>/seed_<s>  noise.rate=<rate>; ingest, noise, train, evaluate
Each is a normal pipeline run (`run_pipeline`), so finished stages are skipped by fingerprint
and repeating the command resumes. A failing stage is recorded with its error; the stages that
do not read its outputs still run (`report` always does: it shows what exists), then the next
run starts. Progress: <root>/experiment.json {"runs": {run_id: {status, stages_ran, errors,
...}}}.

Out (`write_table`), under <root>/table/:
    table.md, table.csv, table.html  rows: noisy, Small-loss, ELR+, removal, DiffInf,
        ProSelfLC, ProMix, clean ceiling; per task: accuracy (%), AUROC (x100), linear kappa,
        ECE as "mean ± std (n=seeds)" (sample std, ddof=1); "-" where nothing was measured.
        A second table: per-class LPIPS of the edits (mean ± std over seeds of the per-seed
        class means). The HTML embeds its images (base64): one self-contained file.
    metrics_long.csv   one row per (task, run, condition, seed): the numbers behind the table
    lpips_long.csv     one row per (task, seed, class)
    plots/detection_curves.png    precision@k per detector (influence/ and cleanlab/
                                  detection.json), k as a fraction of the training split,
                                  mean ± std over seeds
    plots/accuracy_vs_noise.png   noisy baseline per noise rate (0 = the clean ceiling), and
                                  DiffInf / removal at the task's rate
    grids/<task>_grid_<class>.png the before/after edit grids of the first seed's report
"""

from __future__ import annotations

import io
import logging
import math
import posixpath
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from diffinf_ray.config import (
    STAGES,
    Config,
    ConfigError,
    as_override_mapping,
    format_validation_error,
    load_config,
    read_yaml_mapping,
)
from diffinf_ray.detectors import detection_stages
from diffinf_ray.render import (
    html_heading,
    html_inline_png,
    html_page,
    html_paragraph,
    html_table,
    markdown_image,
    markdown_table,
)
from diffinf_ray.storage import Location, StorageOptions, display_uri

log = logging.getLogger(__name__)

DEFAULT_STAGES = ["ingest", "noise", "train", "evaluate", "influence", "removal", "baselines",
                  "autoencoder", "predictor", "lossnets", "edit", "refine", "retrain", "judges",
                  "oracle", "report"]
BASELINE_STAGES = ["ingest", "noise", "train", "evaluate"]  # clean ceiling, noise-rate runs
# Keys the runner sets itself per run; overriding them would make runs collide.
MANAGED_KEYS = ("run.root", "run.name", "run.seed", "stages")

# Table 1's rows in the paper's order (condition key -> label); the clean ceiling is ours.
CONDITIONS = {
    "noisy": "trained on noisy labels",
    "small_loss": "Small-loss",
    "elr_plus": "ELR+",
    "removal": "self-influence removal",
    "diffinf": "DiffInf (self-influence generation)",
    "proselflc": "ProSelfLC",
    "promix": "ProMix",
    "clean": "clean labels (ceiling)",
}
NOTHING_MEASURED = "(nothing measured yet)"  # an empty table
LPIPS_TITLE = "LPIPS between originals and edits, per class (label)"
# metric column -> (label, digits)
METRICS = {"accuracy": ("acc (%)", 2), "auroc": ("AUROC", 2), "kappa": ("kappa", 3),
           "ece": ("ECE", 4)}

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


# -- the plan ----------------------------------------------------------------------------------

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
    return Location(exp.root, StorageOptions(storage.endpoint_override, storage.region))


# -- running -----------------------------------------------------------------------------------

@dataclass
class RunOutcome:
    run: Run
    status: str  # "done" | "failed"
    stages_ran: list[str]
    errors: dict[str, str]  # stage (or "run") -> message
    wall_seconds: float


@dataclass
class ExperimentResult:
    runs: list[Run]
    outcomes: list[RunOutcome] = field(default_factory=list)
    table_error: str | None = None

    @property
    def failures(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status != "done"]


def execute_run(run: Run) -> RunOutcome:
    """Run one planned run's stages with `run_pipeline`, resuming by fingerprint.

    When a stage fails, the stages that read its outputs (directly or through others) are
    skipped, the others still run: one crashing baseline must not cost the seed its DiffInf
    result."""
    from diffinf_ray.cli import format_error
    from diffinf_ray.pipeline import run_pipeline

    errors: dict[str, str] = {}
    ran: list[str] = []
    started = time.perf_counter()
    try:
        result = run_pipeline(run.config, keep_going=True)
    except Exception as err:  # not inside a stage (Ray start, storage): recorded, the experiment goes on
        errors["run"] = format_error(err)
        log.error("run %s failed: %s", run.id, errors["run"])
    else:
        ran = result.with_status("ran")
        for stage, outcome in result.outcomes.items():
            if outcome.status == "failed":
                errors[stage] = format_error(outcome.error)
                log.error("run %s: stage %s failed: %s", run.id, stage, errors[stage])
            elif outcome.status == "blocked":
                errors[stage] = f"not run: {outcome.error}"
    return RunOutcome(run, "failed" if errors else "done", ran, errors,
                      round(time.perf_counter() - started, 2))


class _Progress:
    """<root>/experiment.json: one record per run, rewritten after every change."""

    def __init__(self, location: Location, exp: ExperimentConfig):
        self.location = location
        self.state = location.read_json() if location.exists() else {}
        self.state.update({"name": exp.name, "base": exp.base})
        self.state.setdefault("runs", {})

    def update(self, run: Run, **fields) -> None:
        rec = self.state["runs"].setdefault(run.id, {})
        rec.update({"root": display_uri(run.root),
                    "task": run.task, "kind": run.kind, "seed": run.seed,
                    "noise_rate": run.noise_rate, **fields})
        self.state["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.location.write_json(self.state)


def run_experiment(exp: ExperimentConfig, only_tasks: Iterable[str] | None = None,
                   dry_run: bool = False) -> ExperimentResult:
    """Run every planned run (of `only_tasks`, if given) and write the table.

    Ray is joined or started once for all runs (ray_session with the first run's config). A
    failed run is recorded and the next one starts; see `ExperimentResult.failures`."""
    from diffinf_ray.ray_session import ray_session

    runs = plan(exp)
    if only_tasks:
        wanted = list(only_tasks)
        unknown = sorted(set(wanted) - set(exp.tasks))
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown}; the experiment has {list(exp.tasks)}")
        runs = [r for r in runs if r.task in wanted]
    result = ExperimentResult(runs)
    if dry_run or not runs:
        return result
    location = experiment_location(exp, runs)
    progress = _Progress(location.child("experiment.json"), exp)
    with ray_session(runs[0].config):
        for i, run in enumerate(runs, 1):
            log.info("experiment %s: run %d/%d %s (%s)", exp.name, i, len(runs), run.id, run.root)
            progress.update(run, status="running",
                            started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), errors={})
            outcome = execute_run(run)
            result.outcomes.append(outcome)
            progress.update(run, status=outcome.status, stages_ran=outcome.stages_ran,
                            errors=outcome.errors, wall_seconds=outcome.wall_seconds,
                            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    try:
        write_table(exp, plan(exp))
    except Exception as err:  # the runs' outputs are safe; say why the table is missing
        log.exception("experiment %s: writing the table failed", exp.name)
        result.table_error = f"{type(err).__name__}: {err}"
    return result


# -- aggregation -------------------------------------------------------------------------------

def _run_root(run: Run):
    from diffinf_ray.pipeline import open_run_root

    return open_run_root(run.config)


def aggregate(exp: ExperimentConfig, runs: list[Run] | None = None) -> pd.DataFrame:
    """Long form of every run's clean-test metrics: task, run (kind), condition, seed,
    noise_rate, accuracy (%), auroc (x100), kappa, ece. The clean run's condition is "clean";
    a noise-rate run's is "noisy". Runs not (yet) run contribute no rows."""
    from diffinf_ray.stages.report import condition_metrics

    rows = []
    for run in runs or plan(exp):
        metrics = condition_metrics(_run_root(run))
        if metrics.empty:
            continue
        if run.kind != "methods":  # baseline-only runs: their one condition is the noisy model
            metrics = metrics[metrics["condition"] == "noisy"].assign(
                condition="clean" if run.kind == "clean" else "noisy")
        for m in metrics.to_dict(orient="records"):
            rows.append({"task": run.task, "run": run.kind, "condition": m["condition"],
                         "seed": run.seed, "noise_rate": run.noise_rate,
                         **{k: m.get(k) for k in METRICS}})
    columns = ["task", "run", "condition", "seed", "noise_rate", *METRICS]
    return pd.DataFrame(rows, columns=columns).astype({k: float for k in METRICS})


def aggregate_lpips(exp: ExperimentConfig, runs: list[Run] | None = None) -> pd.DataFrame:
    """Per task, seed and class: the edits' mean perceptual distance to their originals (from
    report/lpips_by_class.csv, else computed from edits/edits.parquet)."""
    from diffinf_ray.stages.report import lpips_by_class

    rows = []
    for run in runs or plan(exp):
        if run.kind != "methods":
            continue
        root = _run_root(run)
        csv = root.child("report", "lpips_by_class.csv")
        edits = root.child("edits", "edits.parquet")
        if csv.exists():
            per_class = pd.read_csv(io.BytesIO(csv.read_bytes()))
        elif edits.exists():
            table = edits.read_table(columns=["label", "lpips"]).to_pandas()
            per_class = lpips_by_class(table, run.config.class_names)
        else:
            continue
        for r in per_class.to_dict(orient="records"):
            rows.append({"task": run.task, "seed": run.seed, "class": r["class"],
                         "edits": r["edits"], "lpips": r["lpips_mean"]})
    return pd.DataFrame(rows, columns=["task", "seed", "class", "edits", "lpips"]).astype(
        {"lpips": float})


def aggregate_detection(exp: ExperimentConfig,
                        runs: list[Run] | None = None) -> pd.DataFrame:
    """precision@k of every detector (influence/ and cleanlab/ detection.json) per task and
    seed: task, seed, detector, k, fraction (k / training rows), precision, base_rate."""
    rows = []
    for run in runs or plan(exp):
        if run.kind != "methods":
            continue
        root = _run_root(run)
        for folder in detection_stages():
            loc = root.child(folder, "detection.json")
            if not loc.exists():
                continue
            for detector, rep in loc.read_json().items():
                if not (isinstance(rep, dict) and "precision_at_k" in rep and rep.get("n")):
                    continue
                curve = rep["precision_at_k"]
                for k, p in zip(curve["k"], curve["precision"], strict=True):
                    rows.append({"task": run.task, "seed": run.seed, "detector": detector,
                                 "k": k, "fraction": k / rep["n"], "precision": p,
                                 "base_rate": rep["n_corrupted"] / rep["n"]})
    return pd.DataFrame(rows, columns=["task", "seed", "detector", "k", "fraction", "precision",
                                       "base_rate"])


# -- the table ---------------------------------------------------------------------------------

def mean_std_cell(values, digits: int) -> str:
    """"mean ± std (n=N)" over the finite values (sample std, ddof=1); "-" when there are none."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "-"
    if v.size == 1:
        return f"{v[0]:.{digits}f} (n=1)"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f} (n={v.size})"


def condition_order(present: Iterable[str]) -> list[str]:
    """Table 1's rows, then conditions it does not name (e.g. `standard`), then the ceiling."""
    known = [c for c in CONDITIONS if c != "clean"]
    extra = sorted(set(present) - set(CONDITIONS))
    return [*known, *extra, "clean"]


def format_table(long: pd.DataFrame, tasks: list[str] | None = None) -> pd.DataFrame:
    """Table 1 from the long form of `aggregate`: one row per condition (label in `method`),
    per task the columns "<task> acc (%)", "<task> AUROC", "<task> kappa", "<task> ECE"."""
    # Only the runs at each task's own rate (and the ceiling) belong in Table 1.
    table_rows = long[long["run"].isin(["methods", "clean"])] if "run" in long else long
    tasks = tasks or list(dict.fromkeys(long["task"]))
    out = []
    for cond in condition_order(table_rows["condition"]):
        row = {"method": CONDITIONS.get(cond, cond)}
        for task in tasks:
            part = table_rows[(table_rows["task"] == task) & (table_rows["condition"] == cond)]
            for metric, (label, digits) in METRICS.items():
                row[f"{task} {label}"] = mean_std_cell(part[metric].tolist(), digits)
        out.append(row)
    return pd.DataFrame(out)


def format_lpips_table(lpips: pd.DataFrame, tasks: list[str] | None = None) -> pd.DataFrame:
    """Per task and class: LPIPS "mean ± std (n=seeds)" and the mean number of edits per seed."""
    tasks = tasks or list(dict.fromkeys(lpips["task"]))
    out = []
    for task in tasks:
        part = lpips[lpips["task"] == task]
        for cls in dict.fromkeys(part["class"]):
            c = part[part["class"] == cls]
            out.append({"task": task, "class": cls, "edits per seed": f"{c['edits'].mean():.1f}",
                        "LPIPS": mean_std_cell(c["lpips"].tolist(), 3)})
    return pd.DataFrame(out, columns=["task", "class", "edits per seed", "LPIPS"])


def _markdown(df: pd.DataFrame) -> str:
    return markdown_table(df, empty=NOTHING_MEASURED)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _subplots(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.8), squeeze=False)
    return fig, list(axes[0])


def detection_curves_png(detection: pd.DataFrame, tasks: list[str]) -> bytes | None:
    """precision@k against the flagged fraction of the training split, per detector; the mean
    over seeds, each seed's curve interpolated onto the union of their fractions."""
    tasks = [t for t in tasks if (detection["task"] == t).any()]
    if not tasks:
        return None
    fig, axes = _subplots(len(tasks))
    for ax, task in zip(axes, tasks, strict=True):
        part = detection[detection["task"] == task]
        for detector in dict.fromkeys(part["detector"]):
            d = part[part["detector"] == detector]
            grid = np.unique(d["fraction"].to_numpy(float))
            curves = []
            for _, s in d.groupby("seed"):
                s = s.sort_values("fraction")
                x, y = s["fraction"].to_numpy(float), s["precision"].to_numpy(float)
                curves.append(np.interp(grid, x, y, left=np.nan, right=np.nan))
            curves = np.asarray(curves)
            mean = np.nanmean(curves, axis=0)
            line, = ax.plot(grid, mean, marker="o", ms=3,
                            label=f"{detector} ({len(curves)} seeds)")
            if len(curves) > 1:
                # a fraction some seeds' k grids do not reach has fewer values
                std = np.array([np.std(c[np.isfinite(c)], ddof=1) if np.isfinite(c).sum() > 1
                                else 0.0 for c in curves.T])
                ax.fill_between(grid, mean - std, mean + std, alpha=0.2, color=line.get_color())
        ax.axhline(part["base_rate"].mean(), color="grey", linestyle=":", label="base rate")
        ax.set_xscale("log")
        ax.set_xlabel("flagged fraction of the training split (k / n)")
        ax.set_ylabel("precision@k")
        ax.set_ylim(0, 1.02)
        ax.set_title(task)
        ax.legend(fontsize=8)
    return _png(fig)


def accuracy_vs_noise_png(long: pd.DataFrame, tasks: list[str]) -> bytes | None:
    """Noisy-baseline accuracy (mean ± std over seeds) at every noise rate run (0 = the clean
    ceiling), with DiffInf and removal at the task's own rate."""
    tasks = [t for t in tasks if (long["task"] == t).any()]
    if not tasks:
        return None
    fig, axes = _subplots(len(tasks))
    for ax, task in zip(axes, tasks, strict=True):
        part = long[long["task"] == task]
        base = part[part["condition"].isin(["noisy", "clean"])].groupby("noise_rate")["accuracy"]
        stats = base.agg(["mean", "std", "count"]).sort_index()
        if len(stats):
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o",
                        capsize=3, label="trained on noisy labels")
        for cond, marker in (("diffinf", "*"), ("removal", "s")):
            c = part[(part["condition"] == cond) & (part["run"] == "methods")]
            if len(c):
                ax.errorbar([c["noise_rate"].mean()], [c["accuracy"].mean()],
                            yerr=[c["accuracy"].std() if len(c) > 1 else 0], marker=marker,
                            ms=10 if marker == "*" else 6, linestyle="none", capsize=3,
                            label=CONDITIONS[cond])
        ax.set_xlabel("noise rate")
        ax.set_ylabel("clean-test accuracy (%)")
        ax.set_title(task)
        ax.legend(fontsize=8)
    return _png(fig)


def _copy_grids(runs: list[Run], out: Location) -> list[tuple[str, str]]:
    """Per task, the before/after grids of the first seed whose report has them ->
    out/grids/<task>_grid_<class>.png; returns (title, relative file)."""
    copied = []
    done_tasks: set[str] = set()
    for run in runs:  # seed-major: the first seed comes first
        if run.kind != "methods" or run.task in done_tasks:
            continue
        report = _run_root(run).child("report")
        names = [p.rsplit("/", 1)[-1] for p in report.list_files(suffix=".png")]
        for name in (n for n in names if n.startswith("grid_")):
            dest = f"grids/{run.task}_{name}"
            out.child(*dest.split("/")).write_bytes(report.child(name).read_bytes())
            copied.append((f"{run.task}, label {name[5:-4]} (seed {run.seed})", dest))
            done_tasks.add(run.task)
    return copied


def _run_status(location: Location) -> pd.DataFrame:
    loc = location.child("experiment.json")
    runs = loc.read_json().get("runs", {}) if loc.exists() else {}
    rows = [{"run": rid, "status": r.get("status", "?"),
             "errors": "; ".join(f"{k}: {v}" for k, v in (r.get("errors") or {}).items()) or "-"}
            for rid, r in sorted(runs.items())]
    return pd.DataFrame(rows, columns=["run", "status", "errors"])


def write_table(exp: ExperimentConfig, runs: list[Run] | None = None) -> dict[str, str]:
    """Aggregate every run and write <root>/table/ (see the module docstring). Returns the
    written files' locations by name."""
    runs = runs or plan(exp)
    location = experiment_location(exp, runs)
    out = location.child("table")
    tasks = list(exp.tasks)
    long = aggregate(exp, runs)
    lpips = aggregate_lpips(exp, runs)
    table = format_table(long, tasks)
    lp_table = format_lpips_table(lpips, tasks)
    status = _run_status(location)

    images: list[tuple[str, str, bytes]] = []  # (title, relative file, PNG)
    plots = (("Detection: precision@k per detector", "plots/detection_curves.png",
              detection_curves_png(aggregate_detection(exp, runs), tasks)),
             ("Accuracy vs noise rate", "plots/accuracy_vs_noise.png",
              accuracy_vs_noise_png(long, tasks)))
    for title, rel, png in plots:
        if png is not None:
            out.child(*rel.split("/")).write_bytes(png)
            images.append((title, rel, png))
    for title, rel in _copy_grids(runs, out):
        images.append((f"Before/after edits, {title}", rel,
                       out.child(*rel.split("/")).read_bytes()))

    task_rate = {r.task: r.noise_rate for r in runs if r.kind == "methods"}
    rates = ", ".join(f"{t} {task_rate[t]:.0%}" for t in tasks)
    intro = (f"Clean test split; {len(exp.seeds)} seeds ({', '.join(map(str, exp.seeds))}); "
             f"noise rate per task: {rates}. Cells: mean ± sample std over seeds (n = seeds "
             f"measured); accuracy in %, AUROC x100, linear kappa, ECE; - = not measured.")
    md = [f"# Experiment {exp.name}: Table 1\n\n", intro, "\n\n", _markdown(table),
          f"\n## {LPIPS_TITLE}\n\n", _markdown(lp_table)]
    md += [f"\n## {title}\n\n{markdown_image(title, rel)}\n" for title, rel, _ in images]
    md += ["\n## Runs\n\n", _markdown(status)]
    files = {
        "table.md": "".join(md).encode(),
        "table.csv": table.to_csv(index=False).encode(),
        "metrics_long.csv": long.to_csv(index=False).encode(),
        "lpips_long.csv": lpips.to_csv(index=False).encode(),
        "table.html": _html(exp.name, intro, table, lp_table, images, status).encode(),
    }
    for name, data in files.items():
        out.child(name).write_bytes(data)
    return {name: out.child(name).display for name in [*files, *(rel for _, rel, _ in images)]}


def _html(name: str, intro: str, table: pd.DataFrame, lp_table: pd.DataFrame,
          images: list[tuple[str, str, bytes]], status: pd.DataFrame) -> str:
    """One self-contained page: the tables and every image inlined as base64."""
    def tbl(df: pd.DataFrame) -> str:
        return html_table(df, empty=NOTHING_MEASURED)

    parts = [html_heading(1, f"Experiment {name}: Table 1"), html_paragraph(intro), tbl(table),
             html_heading(2, LPIPS_TITLE), tbl(lp_table)]
    parts += [html_heading(2, title) + html_inline_png(title, png) for title, _, png in images]
    parts += [html_heading(2, "Runs"), tbl(status)]
    return html_page(name, parts, style="td,th{padding:4px 8px}")


# -- command line ------------------------------------------------------------------------------

def _print_plan(runs: list[Run]) -> None:
    print(f"{len(runs)} runs:")
    for r in runs:
        print(f"  {r.id:<32} noise {r.noise_rate:<5g} {display_uri(r.root)}\n"
              f"  {'':<32} stages {', '.join(r.stages)}")


def run_command(args) -> int:
    """`diffinf experiment` with parsed arguments (config, tasks, dry_run, table_only; see
    cli.add_experiment_arguments). Exit status 0; 1 when some run (or the table) failed,
    listing them; a config error is raised (the CLI prints it, exit status 2)."""
    exp = load_experiment(args.config)
    if args.table_only:
        files = write_table(exp)
        print(Path(args.config).name, "->")
        print("\n".join(f"  {v}" for v in files.values()))
        return 0
    result = run_experiment(exp, only_tasks=args.tasks, dry_run=args.dry_run)
    if args.dry_run:
        _print_plan(result.runs)
        return 0
    print(f"\ntable: {experiment_location(exp).child('table', 'table.md').display}")
    if result.table_error:
        print(f"error: the table could not be written: {result.table_error}", file=sys.stderr)
    for o in result.failures:
        print(f"failed: {o.run.id}: " + "; ".join(f"{k}: {v}" for k, v in o.errors.items()),
              file=sys.stderr)
    return 1 if result.failures or result.table_error else 0


def main(argv: list[str] | None = None) -> int:
    """`diffinf experiment CONFIG [--task T ...] [--dry-run] [--table-only]` (diffinf_ray.cli)."""
    from diffinf_ray.cli import main as diffinf_main

    return diffinf_main(["experiment", *(sys.argv[1:] if argv is None else argv)])

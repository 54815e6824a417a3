"""The numbers behind the table: every run's outputs read into long form (one row per task,
run, condition and seed; per class for LPIPS; per k for detection), and from it the means and
paired differences per condition with their 95% intervals. Runs not (yet) run add no rows."""

from __future__ import annotations

import io

import pandas as pd

from diffinf_ray.detection_plot import detection_rows
from diffinf_ray.detectors import detection_stages
from diffinf_ray.experiment.plan import Run, plan
from diffinf_ray.experiment.spec import METRICS, ExperimentConfig


def run_root(run: Run):
    """The run's root as the pipeline opens it."""
    from diffinf_ray.pipeline import open_run_root

    return open_run_root(run.config)


def aggregate(exp: ExperimentConfig, runs: list[Run] | None = None) -> pd.DataFrame:
    """Long form of every run's clean-test metrics: task, run (kind), condition, seed,
    noise_rate, accuracy (%), auroc (x100), kappa, ece, and `commit`: None for figures read
    from the run root, the record's commit for a run the ledger holds (experiment/held.py)
    whose root has none. The clean run's condition is "clean"; a noise-rate run's is "noisy".
    Runs not (yet) run contribute no rows."""
    from diffinf_ray.experiment.held import held_records
    from diffinf_ray.stages.report import condition_metrics

    runs = runs or plan(exp)
    held = held_records(exp, runs)
    rows = []
    for run in runs:
        metrics, commit = condition_metrics(run_root(run)), None
        if metrics.empty and run.id in held:
            record = held[run.id]
            commit = record.get("commit")
            metrics = pd.DataFrame([{"condition": c, **m}
                                    for c, m in record.get("metrics", {}).items()])
        if metrics.empty:
            continue
        if run.kind != "methods":  # baseline-only runs: their one condition is the noisy model
            metrics = metrics[metrics["condition"] == "noisy"].assign(
                condition="clean" if run.kind == "clean" else "noisy")
        for m in metrics.to_dict(orient="records"):
            rows.append({"task": run.task, "run": run.kind, "condition": m["condition"],
                         "seed": run.seed, "noise_rate": run.noise_rate,
                         **{k: m.get(k) for k in METRICS}, "commit": commit})
    columns = ["task", "run", "condition", "seed", "noise_rate", *METRICS, "commit"]
    return pd.DataFrame(rows, columns=columns).astype({k: float for k in METRICS})


def aggregate_lpips(exp: ExperimentConfig, runs: list[Run] | None = None) -> pd.DataFrame:
    """Per task, seed and class: the edits' mean perceptual distance to their originals (from
    report/lpips_by_class.csv, else computed from edits/edits.parquet)."""
    from diffinf_ray.stages.report import lpips_by_class

    rows = []
    for run in runs or plan(exp):
        if run.kind != "methods":
            continue
        root = run_root(run)
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
        root = run_root(run)
        for folder in detection_stages():
            loc = root.child(folder, "detection.json")
            if not loc.exists():
                continue
            rows += [{"task": run.task, "seed": run.seed, **row}
                     for row in detection_rows(loc.read_json())]
    return pd.DataFrame(rows, columns=["task", "seed", "detector", "k", "fraction", "precision",
                                       "base_rate"])



INTERVAL_COLUMNS = ["task", "condition", "vs", "n", "mean", "std", "lo", "hi"]


def condition_intervals(long: pd.DataFrame, against: tuple[str, ...] = ("noisy", "removal"),
                        metric: str = "accuracy") -> pd.DataFrame:
    """From `aggregate`'s long form, per task and condition at the task's own noise rate (the
    methods runs) and the clean ceiling: `metric`'s mean and 95% t interval over seeds
    (`vs` empty), and its paired difference against each condition of `against` (same seed =
    same noisy labels and flagged set; `vs` that condition; none against itself). Columns:
    task, condition, vs, n (seeds), mean, std, lo, hi (None where undefined)."""
    from diffinf_ray.intervals import t_interval

    own = long[long["run"].isin(["methods", "clean"])] if "run" in long else long
    rows = []
    for task in dict.fromkeys(own["task"]):
        part = own[own["task"] == task]
        by_seed = {c: g.set_index("seed")[metric].dropna()
                   for c, g in part.groupby("condition", sort=False)}
        for cond, values in by_seed.items():
            rows.append({"task": task, "condition": cond, "vs": "",
                         **t_interval(values.tolist())})
            for ref in against:
                if ref == cond or ref not in by_seed:
                    continue
                seeds = values.index.intersection(by_seed[ref].index)
                if len(seeds):
                    diffs = (values[seeds] - by_seed[ref][seeds]).tolist()
                    rows.append({"task": task, "condition": cond, "vs": ref,
                                 **t_interval(diffs)})
    return pd.DataFrame(rows, columns=INTERVAL_COLUMNS)

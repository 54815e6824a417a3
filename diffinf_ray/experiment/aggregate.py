"""The numbers behind the table: every run's outputs read into long form (one row per task,
run, condition and seed; per class for LPIPS; per k for detection). Runs not (yet) run add
no rows."""

from __future__ import annotations

import io

import pandas as pd

from diffinf_ray.detectors import detection_stages
from diffinf_ray.experiment.plan import Run, plan
from diffinf_ray.experiment.spec import METRICS, ExperimentConfig


def run_root(run: Run):
    """The run's root as the pipeline opens it."""
    from diffinf_ray.pipeline import open_run_root

    return open_run_root(run.config)


def aggregate(exp: ExperimentConfig, runs: list[Run] | None = None) -> pd.DataFrame:
    """Long form of every run's clean-test metrics: task, run (kind), condition, seed,
    noise_rate, accuracy (%), auroc (x100), kappa, ece. The clean run's condition is "clean";
    a noise-rate run's is "noisy". Runs not (yet) run contribute no rows."""
    from diffinf_ray.stages.report import condition_metrics

    rows = []
    for run in runs or plan(exp):
        metrics = condition_metrics(run_root(run))
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


"""A sweep's results under its root: results.csv (one row per trial, best first), best.json
(with the command that reproduces it) and objective_vs_<param>.png."""

from __future__ import annotations

import json
import posixpath

from diffinf_ray.config import override_args
from diffinf_ray.render import figure_png, pyplot
from diffinf_ray.sweep.plan import SweepPlan
from diffinf_ray.sweep.spec import LogUniform


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
    metric, spec = plan.spec.metric, plan.spec.params[key]
    points = [r for r in rows if r[metric] is not None and r[key] is not None]
    numeric = all(isinstance(r[key], int | float) and not isinstance(r[key], bool)
                  for r in points)
    categories = [json.dumps(v) for v in spec.candidates()] if not numeric else []
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
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
    plan.root.child(f"objective_vs_{key}.png").write_bytes(figure_png(fig))



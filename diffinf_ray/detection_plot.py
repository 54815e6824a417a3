"""precision@k of every detector against the injected corruption, as a picture: the run
report draws one run's, the experiment's table the mean over seeds per task.

    detection_rows(reports)  {detector: detection report} (detection.json) -> rows: detector,
                             k, fraction (k / training rows), precision, base_rate
    detection_curves_png(detection, tasks)  rows with task and seed too -> PNG bytes
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from diffinf_ray.render import figure_png, pyplot


def detection_rows(reports: dict) -> list[dict]:
    """The precision@k curve of every report that has one (detectors/base.py's schema), one
    row per k; reports without a curve or a row count are skipped."""
    rows = []
    for detector, rep in reports.items():
        if not (isinstance(rep, dict) and "precision_at_k" in rep and rep.get("n")):
            continue
        curve = rep["precision_at_k"]
        for k, p in zip(curve["k"], curve["precision"], strict=True):
            rows.append({"detector": detector, "k": k, "fraction": k / rep["n"],
                         "precision": p, "base_rate": rep["n_corrupted"] / rep["n"]})
    return rows


def _subplots(n: int):
    fig, axes = pyplot().subplots(1, n, figsize=(6.5 * n, 3.8), squeeze=False)
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
                            label=detector if len(curves) == 1
                            else f"{detector} ({len(curves)} seeds)")
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
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves
    return figure_png(fig)

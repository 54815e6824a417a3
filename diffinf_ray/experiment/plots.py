"""The experiment's plots (PNG bytes): detection curves and accuracy against the noise rate."""

from __future__ import annotations

import numpy as np
import pandas as pd

from diffinf_ray.experiment.spec import CONDITIONS
from diffinf_ray.render import figure_png, pyplot


def _subplots(n: int):
    fig, axes = pyplot().subplots(1, n, figsize=(5 * n, 3.8), squeeze=False)
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
    return figure_png(fig)


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
    return figure_png(fig)


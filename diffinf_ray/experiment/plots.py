"""The experiment's plots (PNG bytes): detection curves, accuracy and paired differences per
treatment with their intervals, and accuracy against the noise rate."""

from __future__ import annotations

import pandas as pd

from diffinf_ray.detection_plot import detection_curves_png  # noqa: F401  (re-exported)
from diffinf_ray.experiment.spec import CONDITIONS
from diffinf_ray.intervals import Panel, intervals_png
from diffinf_ray.render import figure_png, pyplot


def _subplots(n: int):
    fig, axes = pyplot().subplots(1, n, figsize=(5 * n, 3.8), squeeze=False)
    return fig, list(axes[0])


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



def treatment_intervals_png(intervals: pd.DataFrame, task: str,
                            order: list[str]) -> bytes | None:
    """One task's `aggregate.condition_intervals` rows as three panels: accuracy per
    condition, and its paired difference against the noisy classifier and against removal,
    each a mean over seeds with its 95% t interval; one row per condition (in `order`,
    labelled as in Table 1) across the panels. None when the task has no row."""
    part = intervals[intervals["task"] == task]
    if part.empty:
        return None
    rank = {c: i for i, c in enumerate(order)}
    part = part.assign(rank=part["condition"].map(lambda c: rank.get(c, len(rank))))
    part = part.sort_values("rank", kind="stable")
    panels = []
    for vs, title, xlabel in (
            ("", f"{task}: accuracy", "clean-test accuracy (%)"),
            ("noisy", f"{task}: paired difference vs noisy", "minus the noisy classifier (points)"),
            ("removal", f"{task}: paired difference vs removal", "minus removal (points)")):
        rows = part[part["vs"] == vs]
        panels.append(Panel(title, pd.DataFrame({
            "label": [CONDITIONS.get(c, c) for c in rows["condition"]],
            "mean": rows["mean"].to_numpy(float), "lo": rows["lo"].to_numpy(float),
            "hi": rows["hi"].to_numpy(float)}), xlabel, zero_line=bool(vs)))
    return intervals_png(panels, share_labels=True)

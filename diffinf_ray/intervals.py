"""Means over seeds with their 95% t intervals, and the picture of them: one horizontal bar per
row (a forest plot), for accuracies per condition and paired differences per setting.

    t_interval(values)  -> {"n", "mean", "std", "lo", "hi"}   (std, lo, hi None under two values)
    intervals_png(panels)   -> PNG bytes; panels: [Panel(title, rows, xlabel, zero_line)],
                               rows a DataFrame (label, mean, lo, hi), drawn top to bottom

Used by the experiment's table (experiment/plots.py) and `diffinf ledger --html` (ledger.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from diffinf_ray.render import figure_png, pyplot


def t_interval(values: Iterable[float]) -> dict:
    """Mean, sample std (ddof 1) and the two-sided 95% t interval of the finite `values`;
    std, lo and hi are None with fewer than two values, everything but n with none."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "lo": None, "hi": None}
    mean = sum(v) / n
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "lo": None, "hi": None}
    from scipy import stats

    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "lo": mean - half, "hi": mean + half}


class Panel(NamedTuple):
    """One panel: `rows` (label, mean, lo, hi) under `title`, `xlabel` below; a dotted line
    at 0 when `zero_line` (differences)."""
    title: str
    rows: pd.DataFrame
    xlabel: str
    zero_line: bool = False


def intervals_png(panels: Sequence[Panel], share_labels: bool = False,
                  dpi: int = 90) -> bytes | None:
    """The panels side by side; each row a dot at its mean with its interval as a bar (lo/hi
    None or NaN: an open dot, no bar), top to bottom in the frame's order. `share_labels`: one
    row per label across all panels (in order of first appearance), named on the first panel
    only; a panel without a label leaves its row empty. Panels without a row with a mean are
    left out; None when none is left."""
    panels = [p._replace(rows=p.rows[p.rows["mean"].notna()]) for p in panels]
    panels = [p for p in panels if len(p.rows)]
    if not panels:
        return None
    shared = list(dict.fromkeys(str(s) for p in panels for s in p.rows["label"]))
    rows = len(shared) if share_labels else max(len(p.rows) for p in panels)
    label_width = max(len(s) for s in shared)
    label_inches = min(3.5, 0.5 + 0.075 * label_width)
    panel_inches = 3.4 if share_labels else 3.4 + label_inches
    fig, axes = pyplot().subplots(
        1, len(panels), squeeze=False, sharey=share_labels,
        figsize=(label_inches * share_labels + panel_inches * len(panels), 1.4 + 0.32 * rows))
    for i, (ax, (title, df, xlabel, zero_line)) in enumerate(zip(axes[0], panels, strict=True)):
        labels = [str(s) for s in df["label"]]
        order = shared if share_labels else labels
        y = np.array([len(order) - 1 - order.index(s) for s in labels], dtype=float)
        mean = df["mean"].to_numpy(float)
        lo = pd.to_numeric(df["lo"], errors="coerce").to_numpy(float)
        hi = pd.to_numeric(df["hi"], errors="coerce").to_numpy(float)
        has = ~(np.isnan(lo) | np.isnan(hi))
        ax.errorbar(mean[has], y[has], xerr=[(mean - lo)[has], (hi - mean)[has]], fmt="o",
                    capsize=3)
        if (~has).any():  # one seed: no interval
            ax.plot(mean[~has], y[~has], "o", mfc="none", color="grey")
        if zero_line:
            ax.axvline(0, color="grey", linestyle=":")
        if i == 0 or not share_labels:
            ax.set_yticks(range(len(order)), order[::-1], fontsize=9)
        ax.set_ylim(-0.7, len(order) - 0.3)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.supxlabel("dot: mean over seeds; bar: its 95% t interval; open dot: one seed (no "
                  "interval)", fontsize=8, color="dimgrey")
    return figure_png(fig, dpi=dpi)

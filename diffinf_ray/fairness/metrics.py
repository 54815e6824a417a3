"""Group metrics: average accuracy, worst-group accuracy and a per-group table.

In: true labels, predicted labels and each sample's group (any hashable names, e.g. the
synthfaces cells "young|tone_dark"). Accuracies are in percent, like the project's other
metrics. Ray-free and torch-free.
"""

from __future__ import annotations

import numpy as np


def group_accuracy(y_true, y_pred, groups) -> dict:
    """{"accuracy": average over samples, "worst_group_accuracy": the lowest group accuracy,
    "worst_group": its name, "mean_group_accuracy": unweighted mean over groups, "per_group":
    {group: {"n", "accuracy"}}} (percent). An empty input is a ValueError."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    groups = np.asarray(groups).astype(str)
    if not (len(y_true) == len(y_pred) == len(groups)):
        raise ValueError(f"group_accuracy: lengths differ ({len(y_true)}, {len(y_pred)}, "
                         f"{len(groups)})")
    if len(y_true) == 0:
        raise ValueError("group_accuracy: no samples")
    correct = y_true == y_pred
    per_group = {}
    for g in sorted(set(groups.tolist())):
        sel = groups == g
        per_group[g] = {"n": int(sel.sum()), "accuracy": 100.0 * float(correct[sel].mean())}
    worst = min(per_group, key=lambda g: (per_group[g]["accuracy"], g))
    return {
        "accuracy": 100.0 * float(correct.mean()),
        "worst_group_accuracy": per_group[worst]["accuracy"],
        "worst_group": worst,
        "mean_group_accuracy": float(np.mean([v["accuracy"] for v in per_group.values()])),
        "per_group": per_group,
    }


def per_group_table(metrics_by_method: dict[str, dict]) -> str:
    """A markdown table: one row per group, one column per method (accuracy %, n). Groups are
    "<class>|<value>" cells: render.markdown_table escapes their pipe."""
    import pandas as pd

    from diffinf_ray.render import markdown_table

    groups = sorted({g for m in metrics_by_method.values() for g in m["per_group"]})
    rows = []
    for g in groups:
        n = next(m["per_group"][g]["n"] for m in metrics_by_method.values()
                 if g in m["per_group"])
        rows.append({"group": g, "n": n, **{
            name: f"{m['per_group'][g]['accuracy']:.1f}" if g in m["per_group"] else "-"
            for name, m in metrics_by_method.items()}})
    columns = ["group", "n", *metrics_by_method]
    return markdown_table(pd.DataFrame(rows, columns=columns)).rstrip("\n")

"""The fairness table and plot from the cell results (runner.py).

Rows: one per (severity, method) with n seeds; average and worst-group test accuracy as
mean ± std (ddof 1) over seeds; the paired difference to the reference method (`erm`, same
seed = same draw and initial weights) as mean ± std of the per-seed differences.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

METRICS = (("accuracy", "average"), ("worst_group_accuracy", "worst-group"))


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = float(np.mean(values))
    return mean, (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def _fmt(mean: float, std: float | None) -> str:
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def selected_results(results: list[dict], select: dict[str, list[str]]) -> list[dict]:
    """Per (severity, seed) and row of `select` ({row: candidate methods}), the candidate cell
    with the best validation worst-group accuracy (ties: the first listed), as a result named
    `row` with `selected` = the chosen method: model selection as in Sagawa et al., the test
    split never looked at."""
    cells = {(r["severity"], r["seed"], r["method"]): r for r in results}
    out = []
    for severity, seed in dict.fromkeys((r["severity"], r["seed"]) for r in results):
        for row, candidates in select.items():
            found = [cells[(severity, seed, c)] for c in candidates
                     if (severity, seed, c) in cells]
            if found:
                best = max(found, key=lambda r: r["val"]["worst_group_accuracy"])
                out.append({**best, "method": row, "selected": best["method"]})
    return out


def summary_rows(results: list[dict], reference: str = "erm") -> list[dict]:
    """One dict per (severity, method): n, <metric>_mean/_std, <metric>_diff_mean/_std."""
    by_key: dict[tuple[float, str], dict[int, dict]] = {}
    methods: list[str] = []
    for r in results:
        by_key.setdefault((r["severity"], r["method"]), {})[r["seed"]] = r["test"]
        if r["method"] not in methods:
            methods.append(r["method"])
    rows = []
    for severity in sorted({s for s, _ in by_key}):
        for method in methods:
            cells = by_key.get((severity, method))
            if not cells:
                continue
            row = {"severity": severity, "method": method, "n": len(cells)}
            ref = by_key.get((severity, reference), {})
            for key, _ in METRICS:
                row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([c[key] for c in
                                                                  cells.values()])
                paired = [cells[s][key] - ref[s][key] for s in sorted(cells) if s in ref]
                if method != reference and paired:
                    row[f"{key}_diff_mean"], row[f"{key}_diff_std"] = _mean_std(paired)
            rows.append(row)
    return rows


def table_markdown(rows: list[dict], reference: str = "erm") -> str:
    """The fairness table: one markdown row per `summary_rows` row (render.markdown_table)."""
    import pandas as pd

    from diffinf_ray.render import markdown_table

    def signed(r: dict, key: str) -> str:
        if f"{key}_diff_mean" not in r:
            return "-"
        sign = "+" if r[f"{key}_diff_mean"] >= 0 else ""
        return sign + _fmt(r[f"{key}_diff_mean"], r[f"{key}_diff_std"])

    columns = ["severity", "method", "seeds", "average acc. (%)", "worst-group acc. (%)",
               f"Δ average vs {reference}", f"Δ worst-group vs {reference}"]
    table = pd.DataFrame(
        [[f"{r['severity']:g}", r["method"], r["n"],
          *(_fmt(r[f"{k}_mean"], r[f"{k}_std"]) for k, _ in METRICS),
          *(signed(r, k) for k, _ in METRICS)] for r in rows], columns=columns)
    return markdown_table(table).rstrip("\n")


def per_group_markdown(results: list[dict]) -> str:
    """Per severity: per-group test accuracy of each method, mean over seeds."""
    from diffinf_ray.fairness.metrics import per_group_table

    out = []
    for severity in sorted({r["severity"] for r in results}):
        merged: dict[str, dict] = {}
        for r in results:
            if r["severity"] != severity:
                continue
            m = merged.setdefault(r["method"], {"per_group": {}})
            for g, v in r["test"]["per_group"].items():
                m["per_group"].setdefault(g, {"n": v["n"], "acc": []})["acc"].append(
                    v["accuracy"])
        for m in merged.values():
            m["per_group"] = {g: {"n": v["n"], "accuracy": float(np.mean(v["acc"]))}
                              for g, v in m["per_group"].items()}
        out += [f"### severity {severity:g} (test accuracy %, mean over seeds; n of the "
                "first seed)", "", per_group_table(merged), ""]
    return "\n".join(out)


def plot_worst_group(rows: list[dict], path: Path) -> None:
    """Worst-group accuracy vs severity, one line per method, ± std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    severities = [r["severity"] for r in rows]
    # each method's points shifted a little sideways, so that error bars at one severity do
    # not hide each other
    step = 0.01 * max(max(severities) - min(severities), 0.1)
    for i, method in enumerate(methods):
        pts = sorted((r["severity"], r["worst_group_accuracy_mean"],
                      r["worst_group_accuracy_std"] or 0.0) for r in rows if r["method"] == method)
        xs, ys, es = zip(*pts, strict=True)
        shift = (i - (len(methods) - 1) / 2) * step
        ax.errorbar([x + shift for x in xs], ys, yerr=es, marker="o", capsize=3, label=method)
    ax.set_xticks(sorted(set(severities)))  # the severities run, not the shifted points
    ax.set_xlim(min(severities) - 8 * step, max(severities) + 8 * step)
    ax.set_xlabel("severity (share of each training class in its majority group)")
    ax.set_ylabel("worst-group test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(root: str | Path, results: list[dict], reference: str = "erm") -> list[dict]:
    """table.md, table.csv, per_group.md and worst_group_vs_severity.png under `root`."""
    import csv

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(results, reference)
    chosen = [f"- {r['method']}, severity {r['severity']:g} seed {r['seed']}: {r['selected']}"
              for r in results if "selected" in r]
    (root / "table.md").write_text(table_markdown(rows, reference) + "\n" + (
        "\nChosen on the validation split's worst group:\n\n" + "\n".join(chosen) + "\n"
        if chosen else ""))
    (root / "per_group.md").write_text(per_group_markdown(results))
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("severity", "method",
                                                                          "n"), k))
    with open(root / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None or (isinstance(r.get(k), float) and
                                                            math.isnan(r[k])) else r.get(k))
                             for k in keys})
    if rows:
        plot_worst_group(rows, root / "worst_group_vs_severity.png")
    return rows

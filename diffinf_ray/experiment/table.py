"""Table 1 and its companions under <root>/table/ (package docstring, "Out"): cells, the
formatted tables, and the files (markdown, CSV, self-contained HTML) through diffinf_ray.render."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from diffinf_ray.experiment.aggregate import (
    aggregate,
    aggregate_detection,
    aggregate_lpips,
    condition_intervals,
    run_root,
)
from diffinf_ray.experiment.held import head_commit
from diffinf_ray.experiment.plan import Run, experiment_location, plan
from diffinf_ray.experiment.plots import (
    accuracy_vs_noise_png,
    detection_curves_png,
    treatment_intervals_png,
)
from diffinf_ray.experiment.spec import CONDITIONS, METRICS, PAPER_ROWS, ExperimentConfig
from diffinf_ray.render import (
    html_heading,
    html_inline_png,
    html_page,
    html_paragraph,
    html_table,
    markdown_image,
    markdown_table,
)
from diffinf_ray.storage import Location

NOTHING_MEASURED = "(nothing measured yet)"  # an empty table
LPIPS_TITLE = "LPIPS between originals and edits, per class (label)"
PAIRED_TITLE = "Accuracy and paired differences per treatment (95% t intervals over seeds)"
PAIRED_NOTE = ("The last epoch's clean-test accuracy (the paper's protocol), then the accuracy "
               "of the checkpoint with the best validation accuracy (best val); a paired "
               "difference is taken seed by seed (same seed = same noisy labels and flagged "
               "set), in percentage points.")

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
    extra = sorted(set(present) - {*PAPER_ROWS, "clean"})
    return [*PAPER_ROWS, *extra, "clean"]


OLDER_MARK = " †"  # a cell that includes a ledger record of another commit than the checkout's


def older_commits(long: pd.DataFrame, head: str | None) -> list[str]:
    """The commits (short) of the ledger records behind `long` that are not `head` (all of
    them when the checkout's commit is unknown)."""
    if "commit" not in long:
        return []
    commits = long["commit"].dropna()
    return sorted({str(c)[:7] for c in commits if head is None or c != head})


def format_table(long: pd.DataFrame, tasks: list[str] | None = None,
                 head: str | None = None) -> pd.DataFrame:
    """Table 1 from the long form of `aggregate`: one row per condition (label in `method`),
    per task the columns "<task> acc (%)", "<task> AUROC", "<task> kappa", "<task> ECE" (the last
    epoch's) and "<task> acc, best val (%)" (the best-validation checkpoint's). A cell with a
    figure from a ledger record of another commit than `head` ends in OLDER_MARK."""
    # Only the runs at each task's own rate (and the ceiling) belong in Table 1.
    table_rows = long[long["run"].isin(["methods", "clean"])] if "run" in long else long
    tasks = tasks or list(dict.fromkeys(long["task"]))
    out = []
    for cond in condition_order(table_rows["condition"]):
        row = {"method": CONDITIONS.get(cond, cond)}
        for task in tasks:
            part = table_rows[(table_rows["task"] == task) & (table_rows["condition"] == cond)]
            mark = OLDER_MARK if older_commits(part, head) else ""
            for metric, (label, digits) in METRICS.items():
                cell = mean_std_cell(part[metric].tolist(), digits)
                row[f"{task} {label}"] = cell + (mark if cell != "-" else "")
        out.append(row)
    return pd.DataFrame(out)


def interval_cell(row: dict, signed: bool) -> str:
    """"mean [lo, hi] (n=N)" of a `condition_intervals` row ("mean (n=1)" for one seed, "-"
    for none); `signed`: with a + or - sign (differences)."""
    if not row or row.get("n", 0) == 0 or row["mean"] is None or pd.isna(row["mean"]):
        return "-"
    fmt = "{:+.2f}" if signed else "{:.2f}"
    if row["lo"] is None or pd.isna(row["lo"]):
        return f"{fmt.format(row['mean'])} (n={row['n']})"
    return (f"{fmt.format(row['mean'])} [{fmt.format(row['lo'])}, {fmt.format(row['hi'])}] "
            f"(n={row['n']})")


def format_paired_table(intervals: pd.DataFrame, tasks: list[str],
                        best_val: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per task and condition (Table 1's order): accuracy (%) and its paired differences
    against the noisy classifier and against removal (points), each "mean [95% t interval]
    (n=seeds)"; with `best_val` (condition_intervals of accuracy_best_val) the same three
    under best-validation selection."""
    columns = ["task", "method", "acc (%)", "minus noisy", "minus removal"]
    sources = [("", intervals)]
    if best_val is not None:
        columns += ["best val: acc (%)", "best val: minus noisy", "best val: minus removal"]
        sources.append(("best val: ", best_val))
    out = []
    for task in tasks:
        conditions = intervals[intervals["task"] == task]["condition"]
        for cond in condition_order(conditions):
            row = {"task": task, "method": CONDITIONS.get(cond, cond)}
            for prefix, source in sources:
                part = source[(source["task"] == task) & (source["condition"] == cond)]
                rows = {r["vs"]: r for r in part.to_dict(orient="records")}
                row.update({f"{prefix}acc (%)": interval_cell(rows.get(""), False),
                            f"{prefix}minus noisy": interval_cell(rows.get("noisy"), True),
                            f"{prefix}minus removal": interval_cell(rows.get("removal"), True)})
            if row["acc (%)"] != "-" or row.get("best val: acc (%)", "-") != "-":
                out.append(row)
    return pd.DataFrame(out, columns=columns)


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

def _copy_grids(runs: list[Run], out: Location) -> list[tuple[str, str]]:
    """Per task, the before/after grids of the first seed whose report has them ->
    out/grids/<task>_grid_<class>.png; returns (title, relative file)."""
    copied = []
    done_tasks: set[str] = set()
    for run in runs:  # seed-major: the first seed comes first
        if run.kind != "methods" or run.task in done_tasks:
            continue
        report = run_root(run).child("report")
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
             "ledger record": r.get("ledger_record") or "-",
             "errors": "; ".join(f"{k}: {v}" for k, v in (r.get("errors") or {}).items()) or "-"}
            for rid, r in sorted(runs.items())]
    return pd.DataFrame(rows, columns=["run", "status", "ledger record", "errors"])


def write_table(exp: ExperimentConfig, runs: list[Run] | None = None) -> dict[str, str]:
    """Aggregate every run and write <root>/table/ (see the module docstring). Returns the
    written files' locations by name."""
    runs = runs or plan(exp)
    location = experiment_location(exp, runs)
    out = location.child("table")
    tasks = list(exp.tasks)
    long = aggregate(exp, runs)
    lpips = aggregate_lpips(exp, runs)
    head = head_commit()
    table = format_table(long, tasks, head)
    lp_table = format_lpips_table(lpips, tasks)
    intervals = condition_intervals(long)
    best_val = condition_intervals(long, metric="accuracy_best_val")
    paired = format_paired_table(intervals, tasks, best_val)
    status = _run_status(location)

    images: list[tuple[str, str, bytes]] = []  # (title, relative file, PNG)
    plots = (("Detection: precision@k per detector", "plots/detection_curves.png",
              detection_curves_png(aggregate_detection(exp, runs), tasks)),
             *((f"{PAIRED_TITLE}: {task}{label}", f"plots/treatments_{task}{suffix}.png",
                treatment_intervals_png(source, task, condition_order(long["condition"])))
               for task in tasks for label, suffix, source in (
                   ("", "", intervals),
                   (", best-validation checkpoint", "_best_val", best_val))),
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
             f"measured); accuracy in %, AUROC x100, linear kappa, ECE of the last epoch's "
             f"model (the paper's protocol), and the accuracy of the checkpoint with the best "
             f"validation accuracy on the assigned labels; - = not measured.")
    older = older_commits(long, head)
    if older:
        intro += (f" {OLDER_MARK.strip()} = includes figures from ledger records written by other "
                  f"code than this checkout's (commits {', '.join(older)}; {exp.ledger}).")
    md = [f"# Experiment {exp.name}: Table 1\n\n", intro, "\n\n", _markdown(table),
          f"\n## {PAIRED_TITLE}\n\n{PAIRED_NOTE}\n\n", _markdown(paired),
          f"\n## {LPIPS_TITLE}\n\n", _markdown(lp_table)]
    md += [f"\n## {title}\n\n{markdown_image(title, rel)}\n" for title, rel, _ in images]
    md += ["\n## Runs\n\n", _markdown(status)]
    files = {
        "table.md": "".join(md).encode(),
        "table.csv": table.to_csv(index=False).encode(),
        "paired.csv": pd.concat([intervals.assign(metric="accuracy"),
                                 best_val.assign(metric="accuracy_best_val")]
                                ).to_csv(index=False).encode(),
        "metrics_long.csv": long.to_csv(index=False).encode(),
        "lpips_long.csv": lpips.to_csv(index=False).encode(),
        "table.html": _html(exp.name, intro, table, paired, lp_table, images, status).encode(),
    }
    for name, data in files.items():
        out.child(name).write_bytes(data)
    return {name: out.child(name).display for name in [*files, *(rel for _, rel, _ in images)]}


def _html(name: str, intro: str, table: pd.DataFrame, paired: pd.DataFrame,
          lp_table: pd.DataFrame, images: list[tuple[str, str, bytes]],
          status: pd.DataFrame) -> str:
    """One self-contained page: the tables and every image inlined as base64."""
    def tbl(df: pd.DataFrame) -> str:
        return html_table(df, empty=NOTHING_MEASURED)

    parts = [html_heading(1, f"Experiment {name}: Table 1"), html_paragraph(intro), tbl(table),
             html_heading(2, PAIRED_TITLE), html_paragraph(PAIRED_NOTE), tbl(paired),
             html_heading(2, LPIPS_TITLE), tbl(lp_table)]
    parts += [html_heading(2, title) + html_inline_png(title, png, rel.startswith("grids/"))
              for title, rel, png in images]
    parts += [html_heading(2, "Runs"), tbl(status)]
    return html_page(name, parts, style="td,th{padding:4px 8px} img{max-width:100%}")


"""The detector x treatment factorial (issue 15) from the results ledger's records.

    cells = factorial_cells(records)     one cell per (setting, detector, treatment)
    print(format_factorial(cells))       the table the closing notes and RESULTS.md quote

A record is one run root's results at one seed (ledger.py): the noisy fit, and the removal,
oracle-relabel and DiffInf fits of the flagged set of one detector (`influence.flag_by`). So
every treatment is paired with the noisy fit and the removal fit *of the same record* (same
seed: same noisy labels, same flagged set), which stays right when records of several commits
are mixed. The clean-label ceiling is a record of the same setting at `noise.rate` 0 and the
same seed; with it each cell says what share of the noisy -> clean gap it recovers.

The noisy-label methods of Table 1 (stage `baselines`: Small-loss, ELR+, ProSelfLC, ProMix) train
on all the noisy labels and flag nothing, so they are rows without a detector, paired with the
noisy fit of the same record. Their settings (`baselines`) and the stage list stay out of the
group key, so a baselines-only run of a setting joins that setting's factorial.

Rows (columns of `factorial_cells`): task, group (the setting without detector, treatment and
seeds), detector, treatment, seeds, values, mean, std, vs_noisy and vs_removal (paired
differences: mean, ci95), gap_share, commits, and on the noisy row noisy_fits_differ: the seeds
whose records hold different noisy fits (averaged there).
"""

from __future__ import annotations

import hashlib
import json

from diffinf_ray.baselines.registry import METHODS
from diffinf_ray.detectors import DETECTORS
from diffinf_ray.intervals import t_interval
from diffinf_ray.ledger import SEED_KEYS, latest_per_seed

DEFAULT_DETECTOR = "tracin"
# treatment keys of a record's metrics, in table order; diffinf is named by its edit method
TREATMENTS = ("removal", "oracle_relabel", "diffinf")
# settings that say which cell of the factorial a record is (not which experiment it belongs to)
CELL_KEYS = (("influence", "flag_by"), ("edit", "method"), ("edit", "gate", "enabled"))
# what only the noisy-label methods' rows depend on (they are rows of every cell's table)
BASELINE_KEYS = (("baselines",),)


def _without(config: dict, paths) -> dict:
    config = json.loads(json.dumps(config))
    for path in paths:
        node = config
        for key in path[:-1]:
            node = node.get(key, {})
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return config


def _hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def group_key(record: dict) -> str:
    """The experiment a record belongs to: its config without seeds, stage list, run root and
    name, and the settings that pick its cell (CELL_KEYS); the noise setting stays in."""
    config = _without(record.get("config", {}), [*SEED_KEYS, *CELL_KEYS, *BASELINE_KEYS,
                                                 ("stages",), ("run", "root"), ("run", "name")])
    return _hash(config)


def ceiling_key(record: dict) -> str:
    """What a clean-label run shares with the noisy runs it is the ceiling of: the group key
    without the noise section."""
    config = _without(record.get("config", {}), [*SEED_KEYS, *CELL_KEYS, *BASELINE_KEYS,
                                                 ("stages",), ("run", "root"), ("run", "name"),
                                                 ("noise",)])
    return _hash(config)


def _cell_of(config: dict) -> tuple[str, str]:
    detector = config.get("influence", {}).get("flag_by", DEFAULT_DETECTOR)
    edit = config.get("edit", {})
    method = edit.get("method", "latent")
    gated = edit.get("gate", {}).get("enabled", False) and method != "oracle_repair"
    return detector, f"diffinf {method}" + (" + gate" if gated else "")


def _interval(diffs: list[float]) -> dict:
    t = t_interval(diffs)
    return {"mean": t["mean"], "ci95": None if t["lo"] is None else (t["lo"], t["hi"])}


def factorial_cells(records: list[dict], metric: str = "accuracy",
                    commit: str | None = None) -> list[dict]:
    """One row per (group, detector, treatment) over the newest record of each seed, plus one
    `noisy` row per group and one `clean ceiling` row where the ledger holds the ceiling;
    `commit` (a prefix) keeps only the records of that commit."""
    if commit:
        records = [r for r in records if str(r.get("commit", "")).startswith(commit)]
    # oldest first: where records of several settings fill one cell and seed, the newest wins
    latest = sorted(latest_per_seed(records).values(), key=lambda r: r["date"])
    ceilings = {(ceiling_key(r), r["seed"]): r["metrics"]["noisy"][metric] for r in latest
                if r["noise"]["rate"] == 0 and r["metrics"].get("noisy", {}).get(metric) is not None}
    # (group, detector, treatment) -> {seed: (value, noisy, removal, clean, commit)}
    found: dict[tuple, dict[int, tuple]] = {}
    meta: dict[str, dict] = {}
    for r in latest:
        m = r["metrics"]
        if r["noise"]["rate"] == 0 or m.get("noisy", {}).get(metric) is None:
            continue
        group = group_key(r)
        meta[group] = {"task": r["task"], "run": r["run"], "noise_rate": r["noise"]["rate"]}
        detector, diffinf = _cell_of(r.get("config", {}))
        noisy = m["noisy"][metric]
        removal = m.get("removal", {}).get(metric)
        clean = ceilings.get((ceiling_key(r), r["seed"]))
        cells = ([("-", "noisy")]
                 + [("-", name) for name in METHODS if m.get(name, {}).get(metric) is not None]
                 + [(detector, diffinf if t == "diffinf" else t)
                    for t in TREATMENTS if m.get(t, {}).get(metric) is not None])
        for det, treatment in cells:
            source = "diffinf" if treatment.startswith("diffinf") else treatment
            value = m[source][metric]
            if det == "-" and treatment in METHODS:
                removal_of_row = None  # a noisy-label method has no flagged set to remove
            else:
                removal_of_row = removal
            found.setdefault((group, det, treatment), {})[r["seed"]] = (
                value, noisy, removal_of_row, clean, r.get("commit", "")[:7])
        if clean is not None:
            found.setdefault((group, "-", "clean ceiling"), {})[r["seed"]] = (
                clean, noisy, None, clean, "")
    # Records of one seed whose noisy fits differ (other code, a failed-over fit): the noisy
    # row averages them; every other row stays paired with its own record's noisy fit.
    noisy_fits: dict[tuple, set] = {}  # (group, seed) -> the noisy fits the rows are paired with
    for (group, _, treatment), by_seed in found.items():
        if treatment not in ("noisy", "clean ceiling"):
            for seed, entry in by_seed.items():
                noisy_fits.setdefault((group, seed), set()).add(entry[1])
    differ = {}
    for (group, seed), values in noisy_fits.items():
        if len(values) > 1:
            differ.setdefault(group, []).append(seed)
            mean = sum(values) / len(values)
            found[(group, "-", "noisy")][seed] = (mean, mean,
                                                   *found[(group, "-", "noisy")][seed][2:])
    rows = []
    for (group, detector, treatment), by_seed in found.items():
        seeds = sorted(by_seed)
        values = [by_seed[s][0] for s in seeds]
        spread = t_interval(values)
        mean, std = spread["mean"], spread["std"]
        vs_noisy = _interval([by_seed[s][0] - by_seed[s][1] for s in seeds])
        with_removal = [s for s in seeds if by_seed[s][2] is not None]
        vs_removal = (_interval([by_seed[s][0] - by_seed[s][2] for s in with_removal])
                      if with_removal and treatment not in ("noisy", "removal", "clean ceiling")
                      else None)
        with_clean = [s for s in seeds if by_seed[s][3] is not None]
        gap = sum(by_seed[s][3] - by_seed[s][1] for s in with_clean)
        gap_share = (sum(by_seed[s][0] - by_seed[s][1] for s in with_clean) / gap
                     if with_clean and gap > 0 else None)
        rows.append({**meta[group], "group": group, "detector": detector,
                     "treatment": treatment, "seeds": seeds, "values": values, "mean": mean,
                     "std": std, "vs_noisy": vs_noisy if treatment != "noisy" else None,
                     "vs_removal": vs_removal, "gap_share": gap_share,
                     "noisy_fits_differ": sorted(differ.get(group, []))
                     if treatment == "noisy" else [],
                     "commits": sorted({by_seed[s][4] for s in seeds} - {""})})
    order = {"noisy": 0, "clean ceiling": 9, **{t: i + 1 for i, t in enumerate(METHODS)},
             **{t: i + 1 for i, t in enumerate(TREATMENTS)}}
    detectors = {"-": 0, "tracin": 1, "oracle": 9}
    return sorted(rows, key=lambda r: (r["task"], r["run"], r["group"],
                                       detectors.get(r["detector"], 5), r["detector"],
                                       order.get(r["treatment"], 4), r["treatment"]))


def detection_rows(records: list[dict], commit: str | None = None) -> list[dict]:
    """Per (group, detector): the flagged set's precision and recall at the budget tau and the
    AUROC against the injected corruption, mean over seeds (one record per group and seed: the
    scores do not depend on which detector flagged). Read from the summary of each registered
    detector's stage that every record keeps (cleanlab: its top-tau figures)."""
    if commit:
        records = [r for r in records if str(r.get("commit", "")).startswith(commit)]
    per_seed: dict[tuple, dict] = {}
    for r in latest_per_seed(records).values():
        for detector in DETECTORS.values():
            rep = r.get("stages", {}).get(detector.stage, {}).get("summary", {}).get(
                detector.name)
            if not isinstance(rep, dict) or "auroc" not in rep:
                continue
            # cleanlab's own precision/recall are of find_label_issues' set: its top tau's apart
            rep = {"precision": rep.get("top_tau_precision", rep["precision"]),
                   "recall": rep.get("top_tau_recall", rep["recall"]), "auroc": rep["auroc"]}
            per_seed[(group_key(r), r["task"], r["noise"]["rate"], detector.name, r["seed"])] = rep
    cells: dict[tuple, list[dict]] = {}
    for (group, task, rate, name, _), rep in per_seed.items():
        cells.setdefault((group, task, rate, name), []).append(rep)
    return [{"group": g, "task": t, "noise_rate": rate, "detector": name, "seeds": len(reps),
             **{k: sum(rep[k] for rep in reps) / len(reps) for k in ("precision", "recall",
                                                                     "auroc")}}
            for (g, t, rate, name), reps in sorted(cells.items())]


def format_detection(rows: list[dict]) -> str:
    import pandas as pd

    from diffinf_ray.render import markdown_table

    table = pd.DataFrame([{"task": r["task"], "noise": r["noise_rate"], "detector": r["detector"],
                           "seeds": r["seeds"], "precision@tau": f"{r['precision']:.3f}",
                           "recall@tau": f"{r['recall']:.3f}", "AUROC": f"{r['auroc']:.3f}"}
                          for r in rows],
                         columns=["task", "noise", "detector", "seeds", "precision@tau",
                                  "recall@tau", "AUROC"])
    return ("detection of the injected corruption (flagged set = top tau; mean over seeds)\n\n"
            + markdown_table(table, empty="(no detection figures in the ledger)"))


def format_factorial(rows: list[dict], metric: str = "accuracy") -> str:
    """A markdown table of `factorial_cells` rows (render.markdown_table, as every table)."""
    import pandas as pd

    from diffinf_ray.render import markdown_table

    def paired(d) -> str:
        if d is None:
            return "-"
        if d["ci95"] is None:
            return f"{d['mean']:+.2f}"
        return f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"

    table = pd.DataFrame([{
        "task": r["task"], "noise": r["noise_rate"], "detector": r["detector"],
        "treatment": r["treatment"], "seeds": ",".join(map(str, r["seeds"])),
        metric: f"{r['mean']:.2f}" + ("" if r["std"] is None else f" ± {r['std']:.2f}"),
        "vs noisy": paired(r["vs_noisy"]), "vs removal": paired(r["vs_removal"]),
        "share of noisy→clean gap": "-" if r["gap_share"] is None else f"{r['gap_share']:.2f}",
        "commits": ",".join(r["commits"]) or "-"} for r in rows],
        columns=["task", "noise", "detector", "treatment", "seeds", metric, "vs noisy",
                 "vs removal", "share of noisy→clean gap", "commits"])
    differ = sorted({s for r in rows for s in r.get("noisy_fits_differ", [])})
    note = ("" if not differ else
            f"\nAt seed(s) {', '.join(map(str, differ))} the records' noisy fits differ (other "
            "code, or a fit that failed over): the noisy row averages them; every other row is "
            "paired with the noisy fit of its own record.\n")
    return (f"detector x treatment, {metric} on the clean test split (mean ± std over seeds; "
            "differences paired by seed within a record, 95% t interval; the share of the "
            "noisy→clean gap over the seeds with a clean-ceiling record)\n\n"
            + markdown_table(table, empty="(no record in the ledger)") + note)

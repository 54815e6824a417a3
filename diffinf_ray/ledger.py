"""The results ledger: one small JSON record per finished run, committed with the code, so that
tables too large for one session (several seeds of every condition) accumulate across sessions
and machines without anyone pretending one session ran them.

    record = run_record(cfg, root)          what a finished run measured, and where and when
    path = write_record(record, folder)     a new file; an existing record is never rewritten
    records = read_ledger(folder)           every record, oldest first
    paired = paired_differences(records, "diffinf", "removal")
    page = paired_html(paired, "diffinf", "removal", "accuracy")   the same as one HTML page

A record (schema 1): run name, task, noise (kind, rate), seed; the config (without the run
root, which only names a folder on one machine) and `setting`, the hash of that config without
its seeds: records of the same setting and different seeds are the repeats of one cell; every
done stage's fingerprint, wall seconds and summary (the stage records under <root>/stages/); the
clean-test metrics of every condition the run trained (noisy, removal, the baselines, diffinf:
`stages/report.condition_metrics`); the git commit (and whether the tree had uncommitted
changes); the machine (platform, CPUs, accelerator); the date the record was written.

Records are only ever added: a rerun of the same run is a new record with a new date. A table
built from the ledger marks the records whose commit is not the checkout's (`stale`), so no row
is presented as fresher than the code that produced it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

from diffinf_ray.intervals import t_interval

SCHEMA = 1
DEFAULT_FOLDER = Path("benchmarks/ledger")
# settings that say which repeat a run is, not what it measures
SEED_KEYS = (("run", "seed"), ("noise", "seed"))
# the stage whose outputs each condition's metrics are (stages/report.condition_metrics); any
# other condition is a noisy-label method of the `baselines` stage
CONDITION_STAGES = {"noisy": "evaluate", "removal": "removal", "oracle_relabel": "relabel",
                    "diffinf": "retrain"}


def git_commit(cwd: str | Path | None = None) -> dict:
    """{"commit": HEAD's hash or None, "dirty": uncommitted changes to tracked files}."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=cwd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": head, "dirty": bool(status.strip())}


def machine() -> dict:
    """Where a run ran: enough to tell a 2-core CPU box from a GPU node."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "accelerator": None}
    try:
        import torch

        if torch.cuda.is_available():
            info["accelerator"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def provenance(cwd: str | Path | None = None) -> dict:
    """Where a result came from, for any JSON it is written to: {"commit", "dirty" (of the
    checkout at `cwd`, default the working directory), "machine", "date" (UTC, now)}."""
    return {**git_commit(cwd), "machine": machine(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _config_without_root(cfg) -> dict:
    config = cfg.model_dump(mode="json")
    config["run"].pop("root", None)
    return config


def setting_hash(config: dict) -> str:
    """The hash of a record's config without its seeds: what makes two runs repeats."""
    unseeded = json.loads(json.dumps(config))
    for section, key in SEED_KEYS:
        unseeded.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(unseeded, sort_keys=True).encode()).hexdigest()[:16]


def _none_if_nan(value):
    """A figure a condition lacks (pandas fills it with NaN) as JSON null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def run_record(cfg, root, *, now: float | None = None, commit: dict | None = None,
               host: dict | None = None) -> dict:
    """The record of a run root's finished stages (module docstring). Raises ValueError when
    no stage is done, or when a done stage's fingerprint is not the config's (its outputs
    belong to other settings)."""
    from diffinf_ray.stage_registry import fingerprint
    from diffinf_ray.stages.report import condition_metrics

    stages, stale = {}, []
    for stage in cfg.stages:
        rec = root.stage_record(stage)
        if rec and rec.get("status") == "done":
            stages[stage] = {k: rec.get(k) for k in
                             ("fingerprint", "wall_seconds", "finished_at", "summary")}
            if rec.get("fingerprint") != fingerprint(cfg, stage):
                stale.append(stage)
    if not stages:
        raise ValueError(f"{root.base.display}: no finished stage to record")
    if stale:  # their outputs were made with other settings than the config says
        raise ValueError(f"{root.base.display}: stages {', '.join(stale)} finished with other "
                         "settings than this config's; run the config first")
    metrics = condition_metrics(root)
    # only what a done stage of this config produced (a stage that failed half-way, e.g. one
    # baseline method of four, or outputs of an earlier config are left out)
    metrics = metrics[[CONDITION_STAGES.get(c, "baselines") in stages
                       for c in metrics["condition"]]] if not metrics.empty else metrics
    config = _config_without_root(cfg)
    return {
        "schema": SCHEMA,
        "run": cfg.run.name,
        "task": cfg.data.task,
        "source": cfg.data.source,
        "noise": {"kind": cfg.noise.kind, "rate": cfg.noise.rate},
        "seed": cfg.run.seed,
        "setting": setting_hash(config),
        "config": config,
        "stages": stages,
        "metrics": {m.pop("condition"): {k: _none_if_nan(v) for k, v in m.items()}
                    for m in metrics.to_dict(orient="records")},
        **(commit if commit is not None else git_commit()),
        "machine": host if host is not None else machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
    }


def record_name(record: dict) -> str:
    stamp = record["date"].replace(":", "").replace("-", "")
    return f"{stamp}_{record['run']}_{record['task']}_seed{record['seed']}_{record['setting'][:8]}.json"


def write_record(record: dict, folder: str | Path = DEFAULT_FOLDER) -> Path:
    """Write `record` as a new file in `folder`; refuses to replace an existing one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / record_name(record)
    with open(path, "x") as f:  # "x": a record is never rewritten
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    return path


def _merge(defaults: dict, given: dict) -> dict:
    out = dict(defaults)
    for key, value in given.items():
        out[key] = (_merge(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out


def comparable_config(config: dict) -> dict:
    """A pipeline record's config as the current schema reads it, so that records of several
    commits land in one setting when they ran the same settings: keys renamed since are moved
    to their new names (`config.RENAMED_KEYS`; edit.l_perc -> edit.loss_terms.perc) and
    settings added since (a new section, a new term's weight) take their current defaults,
    which by this project's rule keep the earlier behaviour. Keys the schema no longer has stay,
    so a setting that was removed still tells its records apart."""
    from diffinf_ray.config import RENAMED_KEYS, Config

    config = json.loads(json.dumps(config))
    for old, new in RENAMED_KEYS.items():
        *parents, leaf = old.split(".")
        node = config
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            value = node.pop(leaf)
            *new_parents, new_leaf = new.split(".")
            target = config
            for key in new_parents:
                target = target.setdefault(key, {})
            target[new_leaf] = value
    defaults = Config().model_dump(mode="json")
    defaults["run"].pop("root", None)
    return _merge(defaults, config)


def read_ledger(folder: str | Path = DEFAULT_FOLDER) -> list[dict]:
    """Every record in `folder`, oldest first; a file that is not a schema-1 record is an error
    naming it. A pipeline record's config and setting are read as the current schema reads them
    (`comparable_config`; the file keeps what was written, `recorded_setting` its setting)."""
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("schema") != SCHEMA:
            raise ValueError(f"{path}: not a ledger record of schema {SCHEMA}")
        record["_file"] = path.name
        if record.get("kind", "pipeline") == "pipeline":
            record["recorded_setting"] = record["setting"]
            record["config"] = comparable_config(record.get("config", {}))
            record["setting"] = setting_hash(record["config"])
        records.append(record)
    return sorted(records, key=lambda r: r["date"])


def latest_per_seed(records: list[dict]) -> dict[tuple, dict]:
    """{(setting, seed): the newest record}: a rerun supersedes, it does not add a repeat."""
    latest = {}
    for record in records:  # oldest first
        latest[(record["setting"], record["seed"])] = record
    return latest


def paired_differences(records: list[dict], a: str, b: str, metric: str = "accuracy",
                       head: str | None = None) -> list[dict]:
    """Per setting: condition `a` minus condition `b` on `metric`, paired by seed (same seed =
    same noisy labels and flagged set). Each row: setting, run, task, noise_rate, seeds,
    differences, mean, std (ddof 1), ci95 (t interval, None under two seeds), stale (records
    whose commit is not `head`, when given)."""
    groups: dict[str, list[dict]] = {}
    for (setting, _), record in latest_per_seed(records).items():
        m = record["metrics"]
        if a in m and b in m and m[a].get(metric) is not None and m[b].get(metric) is not None:
            groups.setdefault(setting, []).append(record)
    rows = []
    for setting, group in groups.items():
        group.sort(key=lambda r: r["seed"])
        diffs = [r["metrics"][a][metric] - r["metrics"][b][metric] for r in group]
        t = t_interval(diffs)
        rows.append({
            "setting": setting, "config": group[0].get("config", {}),
            "run": group[0]["run"], "task": group[0]["task"],
            "noise_rate": group[0]["noise"]["rate"], "seeds": [r["seed"] for r in group],
            "differences": diffs, "mean": t["mean"], "std": t["std"],
            "ci95": None if t["lo"] is None else (t["lo"], t["hi"]),
            "stale": sum(1 for r in group if head is not None and r.get("commit") != head),
        })
    return sorted(rows, key=lambda r: (r["task"], r["run"], r["setting"]))


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree if isinstance(tree, str) else json.dumps(tree, sort_keys=True)}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}


def setting_labels(rows: list[dict]) -> list[str]:
    """What tells each row's setting apart from the other settings of its run and task: the
    config keys whose values differ among them (`edit.method=guided`), "-" when alone."""
    flat = [_flat(r.get("config", {})) for r in rows]
    labels = []
    for i, row in enumerate(rows):
        peers = [flat[j] for j, r in enumerate(rows)
                 if j != i and (r["run"], r["task"]) == (row["run"], row["task"])]
        keys = sorted(k for k in set(flat[i]).union(*peers)
                      if any(p.get(k) != flat[i].get(k) for p in peers))
        labels.append(", ".join(f"{k}={flat[i].get(k, '(unset)')}" for k in keys) or "-")
    return labels


PAIRED_COLUMNS = ["run", "setting", "task", "noise", "seeds", "mean", "std", "95% interval",
                  "stale records"]


def paired_table(rows: list[dict]):
    """`paired_differences` rows as a DataFrame of text cells (PAIRED_COLUMNS), one per
    setting, in the rows' order."""
    import pandas as pd

    def signed(value) -> str:
        return f"{value:+.2f}"

    return pd.DataFrame([{
        "run": r["run"], "setting": label, "task": r["task"], "noise": r["noise_rate"],
        "seeds": ",".join(map(str, r["seeds"])), "mean": signed(r["mean"]),
        "std": "-" if r["std"] is None else f"{r['std']:.2f}",
        "95% interval": "-" if r["ci95"] is None else
        f"[{signed(r['ci95'][0])}, {signed(r['ci95'][1])}]",
        "stale records": r["stale"]} for r, label in zip(rows, setting_labels(rows), strict=True)],
        columns=PAIRED_COLUMNS)


def _title(a: str, b: str, metric: str) -> str:
    return f"{a} - {b}, {metric} (paired by seed; 95% t interval)"


def format_paired(rows: list[dict], a: str, b: str, metric: str) -> str:
    """A markdown table of `paired_differences` rows (render.markdown_table, as every table)."""
    from diffinf_ray.render import markdown_table

    return (f"{_title(a, b, metric)}\n\n"
            + markdown_table(paired_table(rows), empty="(no setting has both conditions)"))


def paired_png(rows: list[dict], a: str, b: str, metric: str) -> bytes | None:
    """The paired differences as a forest plot: one bar per setting, labelled "#i" as the
    HTML table's rows, with its task, noise rate and seed count; None without rows."""
    import pandas as pd

    from diffinf_ray.intervals import Panel, intervals_png

    frame = pd.DataFrame([{
        "label": f"#{i} {r['task']} {r['noise_rate']:.0%} ({len(r['seeds'])} seed"
                 + ("s)" if len(r["seeds"]) > 1 else ")"),
        "mean": r["mean"], "lo": None if r["ci95"] is None else r["ci95"][0],
        "hi": None if r["ci95"] is None else r["ci95"][1]} for i, r in enumerate(rows, 1)],
        columns=["label", "mean", "lo", "hi"])
    return intervals_png([Panel(f"{a} - {b}, paired by seed", frame, f"{a} - {b}, {metric}",
                                zero_line=True)])


def paired_html(rows: list[dict], a: str, b: str, metric: str, note: str = "") -> str:
    """One self-contained page (`diffinf ledger --html`): `note`, the paired-differences plot
    (base64 PNG) and the table, its rows numbered as the plot's bars."""
    from diffinf_ray.render import (
        html_heading,
        html_inline_png,
        html_page,
        html_paragraph,
        html_table,
    )

    title = _title(a, b, metric)
    table = paired_table(rows)
    table.insert(0, "#", [f"#{i}" for i in range(1, len(table) + 1)])
    parts = [html_heading(1, f"Results ledger: {title}")]
    if note:
        parts.append(html_paragraph(note))
    png = paired_png(rows, a, b, metric)
    if png is not None:
        parts.append(html_inline_png(f"paired differences: {a} - {b}", png, pixelated=False))
    parts.append(html_table(table, empty="(no setting has both conditions)"))
    return html_page(f"ledger: {a} - {b}", parts,
                     style="td,th{padding:4px 8px;vertical-align:top;text-align:left} "
                     "img{max-width:100%}")

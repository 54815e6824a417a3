"""Report stage: one page per run with everything the method is judged by.

In:  evaluation/, removal/evaluation/, relabel/evaluation/, baselines/<method>/evaluation/,
     retrain/evaluation/
     (metrics.json each: whichever exist), edits/edits.parquet, oracle/report.json,
     lossnets/lossnets.json, influence/ and predictor/ reports, stages/*.json (wall times).
Out: report/metrics.csv        one row per training condition: accuracy, AUROC (x100), kappa, ECE
     report/lpips_by_class.csv per-class perceptual distance of the edits (mean, std, count)
     report/grid_<class>.png   originals (top row of each pair) above their edits
     report/gate_grid_accepted.png, gate_grid_rejected.png  the same, per verdict of the
                               edit gate (edit.gate; when the edits have its columns)
     report/score_hist.png     TracIn's score histogram, clean vs corrupted (the influence
                               stage's influence/score_hist.png)
     report/precision_at_k.png precision@k of every detector the run scored (detection.json)
     report/subgroup_audit.csv per `group` of the training rows: flag rate and ratio, detection
                               precision/recall, edit success and identity retention by the
                               judges, gate acceptance, test accuracy per condition
                               (subgroup_audit.py; warnings in the report)
     report/report.md, report/report.html  the tables, the oracle and identity figures, the
                               distances used (LPIPS or the stated fallback), the gate's counts
                               (accepted / fallen back, and to what), stage wall times; the
                               HTML embeds every image above (base64): one self-contained file
"""

from __future__ import annotations

import io
import re

import pandas as pd

from diffinf_ray.config import STAGES, Config
from diffinf_ray.datasets import manifest_columns
from diffinf_ray.detectors import DETECTORS, read_detection
from diffinf_ray.run_root import RunRoot

STAGE_FOLDER = "report"
GRID_COLUMNS = 8


def _read_json(location):
    return location.read_json() if location.exists() else None


def condition_metrics(root: RunRoot) -> pd.DataFrame:
    """Test metrics of every training condition the run has, one row each: the last epoch's
    (the paper's protocol), and the accuracy and epoch of the best-validation checkpoint
    (None for checkpoints saved without their epoch figures)."""
    conditions = [("noisy", root.child("evaluation")),
                  ("removal", root.child("removal", "evaluation")),
                  ("oracle_relabel", root.child("relabel", "evaluation"))]
    baselines = root.child("baselines")
    if baselines.exists():
        for method in sorted(d.rsplit("/", 1)[-1] for d in baselines.list_dirs()):
            conditions.append((method, baselines.child(method, "evaluation")))
    conditions.append(("diffinf", root.child("retrain", "evaluation")))
    rows = []
    for name, folder in conditions:
        m = _read_json(folder.child("metrics.json"))
        if m is None:
            continue
        best = m.get("best_val") or {}  # best-validation selection (models/evaluation.py)
        rows.append({"condition": name, "accuracy": m["accuracy"],
                     "auroc": m.get("auroc_macro_ovr"), "kappa": m.get("kappa_linear"),
                     "ece": m.get("ece"), "epoch": m.get("epoch"),
                     "accuracy_best_val": best.get("accuracy"), "epoch_best_val": best.get("epoch")})
    return pd.DataFrame(rows)


def lpips_by_class(edits: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    rows = []
    for c, name in enumerate(class_names):
        values = edits.loc[edits["label"] == c, "lpips"].to_numpy(float)
        rows.append({"class": name, "edits": len(values),
                     "lpips_mean": float(values.mean()) if len(values) else None,
                     "lpips_std": float(values.std()) if len(values) else None})
    return pd.DataFrame(rows)


def before_after_grid(edits: pd.DataFrame, columns: int = GRID_COLUMNS) -> bytes:
    """PNG: pairs of rows, originals above their edits, `columns` samples per row."""
    import torch
    from PIL import Image

    from diffinf_ray.data.images import to_tensor_batch
    from diffinf_ray.diffae.quality import image_grid

    rows = []
    for start in range(0, len(edits), columns):
        part = edits.iloc[start:start + columns]
        rows.append(list(torch.from_numpy(to_tensor_batch(list(part["image_original"])))))
        rows.append(list(torch.from_numpy(to_tensor_batch(list(part["image"])))))
    buf = io.BytesIO()
    Image.fromarray(image_grid(rows)).save(buf, format="PNG")
    return buf.getvalue()


GATE_VERDICTS = (("accepted", True), ("rejected", False))


def gate_section(cfg: Config, edits: pd.DataFrame, out) -> tuple[list[str], dict]:
    """Markdown lines and summary of the edit gate's verdicts (none for edits without the
    gate's columns), with a before/after grid per verdict written to `out`."""
    if "gate_accepted" not in edits.columns:
        return [], {}
    gate = cfg.edit.gate
    accepted = edits["gate_accepted"].to_numpy(bool)
    summary = {"enabled": gate.enabled, "fallback": gate.fallback,
               "accepted": int(accepted.sum()), "fallen_back": int((~accepted).sum())}
    if not gate.enabled:
        return ["\n### Gate\n", "The gate is off (edit.gate.enabled: false): every edit "
                "replaces its original.\n"], summary
    fate = ("left the refined set (removal)" if gate.fallback == "remove"
            else "kept their original image")
    md = ["\n### Gate (the removal stage's classifier, which never guided an edit)\n",
          f"{summary['accepted']} edits accepted (they replace their original); "
          f"{summary['fallen_back']} rejected, which {fate}"
          + (f"; min_identity {gate.min_identity}" if gate.min_identity is not None else "")
          + ".\n"]
    for verdict, value in GATE_VERDICTS:
        part = edits[accepted == value]
        if len(part):
            file = f"gate_grid_{verdict}.png"  # not grid_*: those are per class
            out.child(file).write_bytes(before_after_grid(part.head(2 * GRID_COLUMNS)))
            md.append(f"\n**gate {verdict}** ({len(part)} edits, mean gate confidence in the "
                      f"label {part['gate_confidence'].mean():.3f}; originals above edits)"
                      f"\n\n![gate {verdict}]({file})\n")
    return md, summary


def _table_md(df: pd.DataFrame, digits: int = 3) -> str:
    from diffinf_ray.render import markdown_table

    return markdown_table(df, digits, empty="(none)")


WEAK_IDENTITY_ORACLE_AUROC = 0.75


def _identity_oracle_quality(io: dict) -> str:
    """How far to trust the identity figures: the identity oracle's verification AUROC on the
    held-out people of its own draw (same- vs different-person pairs), flagged when weak."""
    auroc = io.get("verification_auroc")
    if auroc is None:
        return ""
    line = (f"\nIdentity oracle: verification AUROC {auroc:.3f} on {io.get('val_identities')} "
            "held-out people of its draw.")
    if auroc < WEAK_IDENTITY_ORACLE_AUROC:
        line += (f" **A weak judge** (below {WEAK_IDENTITY_ORACLE_AUROC}): the identity "
                 "retention figures below say little; give the judges a larger draw or more "
                 "epochs (oracle.num_samples, lossnets.identity_epochs).")
    return line + "\n"


def stage_times(root: RunRoot) -> pd.DataFrame:
    rows = []
    for stage in STAGES:
        rec = root.stage_record(stage)
        if rec and rec.get("status") == "done":
            rows.append({"stage": stage, "wall_seconds": rec.get("wall_seconds")})
    return pd.DataFrame(rows)


def detection_section(root: RunRoot, tau: float, summary: dict,
                      flag_by: str = "tracin") -> list[str]:
    """Markdown lines on how well the detectors found the injected corruption: the flagged
    set's (`influence.flag_by`, TracIn by default), then every registered detector the run
    scored (into `summary` too)."""
    md: list[str] = []
    influence = _read_json(root.child("influence", "detection.json"))
    if influence and flag_by in influence:
        t = influence[flag_by]
        what = ("TracIn self-influence" if flag_by == "tracin"
                else f"flagged by {flag_by}: {DETECTORS[flag_by].description}")
        md += [f"\n## Detection ({what} vs the injected corruption)\n",
               f"top-{tau:.0%}: precision {t['precision']:.3f}, recall "
               f"{t['recall']:.3f}; AUROC {t['auroc']:.3f}\n"]
    found = read_detection(root)
    if len(found) > 1:  # every registered detector this run scored, at the same budget
        table = pd.DataFrame([
            {"detector": name, "what": DETECTORS[name].description if name in DETECTORS else "",
             f"top-{tau:.0%} precision": rep.get("precision"),
             "recall": rep.get("recall"), "AUROC": rep.get("auroc")}
            for name, rep in found.items()])
        md += ["\nEvery detector at the same budget:\n\n", _table_md(table), "\n"]
        summary["detection"] = table.to_dict(orient="records")
    return md


def detection_plots(cfg: Config, root: RunRoot, out) -> list[str]:
    """Markdown lines of the detection pictures, written to `out`: TracIn's score histogram
    (copied from influence/) and precision@k of every detector the run scored (drawn from
    their detection.json); none for what the run lacks."""
    from diffinf_ray.detection_plot import detection_curves_png, detection_rows

    md = []
    hist = root.child("influence", "score_hist.png")
    if hist.exists():
        out.child("score_hist.png").write_bytes(hist.read_bytes())
        md.append("\n**TracIn self-influence**, injected-corruption rows against the rest\n\n"
                  "![score histogram](score_hist.png)\n")
    rows = detection_rows(read_detection(root))
    if rows:
        frame = pd.DataFrame(rows).assign(task=cfg.data.task, seed=cfg.run.seed)
        out.child("precision_at_k.png").write_bytes(detection_curves_png(frame, [cfg.data.task]))
        md.append("\n**precision@k** of every detector (k as a fraction of the training rows)"
                  "\n\n![precision at k](precision_at_k.png)\n")
    return md


def oracle_section(root: RunRoot, summary: dict) -> list[str]:
    """Markdown lines of the independent judges' verdicts on the edits (oracle/report.json;
    into `summary` too)."""
    oracle = _read_json(root.child("oracle", "report.json"))
    if not oracle:
        return []
    a = oracle["all"]
    rows = [(f"{key} ({oracle[key]['edits']})", oracle[key]["oracle_target_before"],
             oracle[key]["oracle_target_after"])
            for key in ("all", "corrupted_label", "clean_label") if oracle[key].get("edits")]
    md = ["\n## Independent judges (oracle; never used by the edit)\n",
          f"Attribute oracle (clean labels, separate draw): test accuracy "
          f"{oracle['attribute_oracle']['test_accuracy']:.1f}%.\n\n",
          _table_md(pd.DataFrame(rows, columns=["edits", "oracle says target label: before",
                                                "after"]))]
    io = oracle["identity_oracle"]
    md.append(_identity_oracle_quality(io))
    md.append(f"\nIdentity oracle on its own test split: mean similarity of same-person pairs "
              f"{io['mean_same_person_similarity']:.4f}, different-person pairs "
              f"{io['mean_different_person_similarity']:.4f}; edit vs original: "
              f"{oracle['mean_identity_similarity_oracle']:.4f}.\n\n"
              f"Identity retention (share of edits above the threshold): "
              f"{oracle['identity_retention_at_eer']:.3f} at the equal-error-rate threshold "
              f"{io['threshold_at_eer']:.3f} (same-person pairs pass at "
              f"{io['same_person_accept_rate_at_eer']:.3f}); "
              f"{oracle['identity_retention']:.3f} at the 1%-false-accept threshold "
              f"{io['threshold_at_far_1pct']:.3f} (same-person pairs pass at "
              f"{io['same_person_accept_rate']:.3f}).\n")
    summary["oracle"] = {"target_before": a.get("oracle_target_before"),
                         "target_after": a.get("oracle_target_after"),
                         "identity_retention": oracle["identity_retention"],
                         "identity_retention_at_eer": oracle["identity_retention_at_eer"]}
    return md


AUDIT_CONDITIONS = {"noisy": ("evaluation",), "removal": ("removal", "evaluation"),
                    "oracle_relabel": ("relabel", "evaluation"),
                    "diffinf": ("retrain", "evaluation")}


def audit_section(cfg: Config, root: RunRoot, summary: dict) -> list[str]:
    """Markdown lines of the subgroup audit (subgroup_audit.py), written to
    report/subgroup_audit.csv and into `summary`; none without flagged rows or groups."""
    from diffinf_ray.artifacts import read_edits, read_influence
    from diffinf_ray.datasets import read_split
    from diffinf_ray.subgroup_audit import AuditThresholds, subgroup_audit

    influence_loc = root.child("influence", "influence.parquet")
    if not influence_loc.exists() or "group" not in manifest_columns(root.noisy_manifest):
        return []
    train = read_split(root.noisy_manifest, "train", ["group"])
    if train["group"].isna().all():
        return []
    influence = read_influence(root, ["sample_id", "is_high", "is_corrupted"]).to_pandas()
    accuracy = {}
    for condition, folder in AUDIT_CONDITIONS.items():
        m = _read_json(root.child(*folder, "metrics.json"))
        if m and m.get("per_group_accuracy"):
            accuracy[condition] = m["per_group_accuracy"]
    judgements_loc = root.child("oracle", "judgements.parquet")
    judgements = judgements_loc.read_table().to_pandas() if judgements_loc.exists() else None
    oracle = _read_json(root.child("oracle", "report.json")) or {}
    threshold = oracle.get("identity_oracle", {}).get("threshold_at_eer")
    edits_loc = root.child("edits", "edits.parquet")
    edits = (read_edits(root, ["sample_id", "gate_accepted"]).to_pandas()  # no image read
             if edits_loc.exists() and "gate_accepted" in manifest_columns(edits_loc) else None)
    thresholds = AuditThresholds(cfg.report.audit_flag_ratio, cfg.report.audit_accuracy_drop)
    table, warnings = subgroup_audit(train, influence, accuracy, judgements, edits, threshold,
                                     thresholds)
    root.child(STAGE_FOLDER, "subgroup_audit.csv").write_bytes(table.to_csv(index=False).encode())
    summary["subgroup_audit"] = {"table": table.to_dict(orient="records"), "warnings": warnings}
    md = ["\n## Subgroup audit (per `group` of the training rows)\n",
          "Flag ratio: a group's share of the flagged rows over its share of the rows (1 = in "
          "proportion). Precision and recall against the injected corruption; the oracle's "
          "target-label share and identity retention (equal-error-rate threshold) of the "
          "group's edits; test accuracy (%) per condition and DiffInf's change against the "
          "noisy classifier (points).\n\n", _table_md(table), "\n"]
    md += ([f"- **Warning:** {w}\n" for w in warnings] if warnings
           else ["No group is flagged out of proportion or left worse off by DiffInf "
                 f"(flag ratio <= {thresholds.flag_ratio}, accuracy drop <= "
                 f"{thresholds.accuracy_drop} points).\n"])
    return md


def run_report(cfg: Config, root: RunRoot) -> dict:
    out = root.child(STAGE_FOLDER)
    names = cfg.class_names
    metrics = condition_metrics(root)
    out.child("metrics.csv").write_bytes(metrics.to_csv(index=False).encode())
    md = [f"# DiffInf report: {cfg.run.name}\n",
          f"Task `{cfg.data.task}` ({', '.join(names)}), {cfg.noise.kind} noise at "
          f"{cfg.noise.rate:.0%}, data `{cfg.data.source}`, seed {cfg.run.seed}.\n",
          "## Clean test split\n", _table_md(metrics, 2)]
    summary: dict = {"conditions": metrics.to_dict(orient="records")}

    md += detection_section(root, cfg.influence.tau, summary, cfg.influence.flag_by)
    md += detection_plots(cfg, root, out)
    predictor = _read_json(root.child("predictor", "report.json"))
    if predictor:
        md.append(f"\nInfluence predictor h_w: held-out AUROC {predictor['heldout_auroc']:.3f} "
                  f"({predictor['heldout_rows']} held-out rows).\n")

    edits_loc = root.child("edits", "edits.parquet")
    grids = []
    if edits_loc.exists():
        edits = edits_loc.read_table().to_pandas().sort_values("sample_id", kind="stable")
        lossnets = _read_json(root.child("lossnets", "lossnets.json")) or {}
        lp = lpips_by_class(edits, names)
        out.child("lpips_by_class.csv").write_bytes(lp.to_csv(index=False).encode())
        perceptual = lossnets.get("perceptual", {}).get("name", "unknown")
        identity = lossnets.get("identity", {})
        md += ["\n## Edits\n",
               f"{len(edits)} edits. Perceptual distance: **{perceptual}**. Identity network: "
               f"**{identity.get('kind', 'unknown')}**"
               + (f" ({identity['note']})" if identity.get("note") else "") + ".\n\n",
               _table_md(lp), "\n",
               f"Mean identity similarity to the original (F_id): "
               f"{edits['identity_similarity'].mean():.3f}; mean p_high before "
               f"{edits['p_high_before'].mean():.3f}, after {edits['p_high_after'].mean():.3f}.\n"]
        summary["lpips_by_class"] = lp.to_dict(orient="records")
        for c, name in enumerate(names):
            part = edits[edits["label"] == c].head(2 * GRID_COLUMNS)
            if len(part):
                file = f"grid_{name}.png"
                out.child(file).write_bytes(before_after_grid(part))
                grids.append((name, file))
        for name, file in grids:
            md.append(f"\n**{name}** (label; originals above edits)\n\n![{name}]({file})\n")
        gate_md, gate_summary = gate_section(cfg, edits, out)
        md += gate_md
        if gate_summary:
            summary["gate"] = gate_summary

    md += oracle_section(root, summary)
    md += audit_section(cfg, root, summary)
    times = stage_times(root)
    md += ["\n## Stage wall times (s)\n", _table_md(times, 1)]
    text = "".join(md)
    out.child("report.md").write_bytes(text.encode())
    out.child("report.html").write_bytes(_html(text, cfg.run.name, out).encode())
    return summary


def _html(markdown_text: str, title: str, out) -> str:
    """A self-contained HTML page of the report: its tables, and every image it names (files
    in `out`) embedded as base64, so the page needs no other file."""
    from diffinf_ray.render import markdown_to_html

    names = dict.fromkeys(re.findall(r"^!\[[^\]]*\]\(([^)]+)\)", markdown_text, re.M))
    images = {n: out.child(n).read_bytes() for n in names if out.child(n).exists()}
    return markdown_to_html(markdown_text, title, images)

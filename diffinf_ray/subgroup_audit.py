"""Subgroup audit of a DiffInf run: does the correction treat every group alike?

DiffInf's authors name the risk themselves: repairing supervision must not amplify bias. The
audit puts, per subgroup (the manifest's `group`; synthfaces: skin-tone group), every figure
the method is judged by side by side, and warns where a group is flagged out of proportion or
ends up worse off.

In:  train rows   sample_id, group                      (manifest_noisy, train split)
     influence    sample_id, is_high, is_corrupted       (influence/influence.parquet)
     judgements   sample_id, label, oracle_pred_before, oracle_pred_after,
                  identity_similarity_oracle             (oracle/judgements.parquet; optional)
     edits        sample_id, gate_accepted               (edits/edits.parquet; optional)
     accuracy     condition -> {group: test accuracy %}  (per_group_accuracy of metrics.json)
Out: one row per group: rows, share, flagged, flag_rate, flag_ratio (its share of the flagged
     set over its share of the rows), precision (corrupted among its flagged rows), recall
     (flagged among its corrupted rows), edits, oracle_target_before/after (the independent
     attribute oracle sees the assigned label), identity_retention (edits above the identity
     oracle's equal-error-rate threshold), gate_accept_rate, accuracy_<condition> and
     accuracy_change (diffinf - noisy, points); and the warnings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

# The conditions whose per-group test accuracy the audit compares, in the order of the method.
CONDITIONS = ("noisy", "removal", "diffinf")


@dataclass(frozen=True)
class AuditThresholds:
    """When the audit warns: a group's flag ratio above `flag_ratio`, or its accuracy after
    DiffInf more than `accuracy_drop` points below the noisy classifier's."""

    flag_ratio: float = 2.0
    accuracy_drop: float = 0.0


def _mean(values) -> float | None:
    values = np.asarray(values, dtype=float)
    return float(values.mean()) if len(values) else None


def detection_by_group(train: pd.DataFrame, influence: pd.DataFrame) -> pd.DataFrame:
    """Per group: rows, share of the training rows, flagged rows, flag rate, flag ratio,
    detection precision and recall against the injected corruption."""
    df = train[["sample_id", "group"]].merge(
        influence[["sample_id", "is_high", "is_corrupted"]], on="sample_id", how="inner")
    df["group"] = df["group"].fillna("unknown").astype(str)
    total_rows, total_flagged = len(df), int(df["is_high"].sum())
    rows = []
    for group, part in df.groupby("group", sort=True):
        flagged = part["is_high"].to_numpy(bool)
        corrupted = part["is_corrupted"].to_numpy(bool)
        share = len(part) / total_rows
        rows.append({
            "group": group, "rows": len(part), "share": share, "flagged": int(flagged.sum()),
            "flag_rate": float(flagged.mean()),
            "flag_ratio": (flagged.sum() / total_flagged) / share if total_flagged else None,
            "precision": float(corrupted[flagged].mean()) if flagged.any() else None,
            "recall": float(flagged[corrupted].mean()) if corrupted.any() else None})
    return pd.DataFrame(rows)


def edits_by_group(train: pd.DataFrame, judgements: pd.DataFrame | None,
                   edits: pd.DataFrame | None, identity_threshold: float | None) -> pd.DataFrame:
    """Per group: edits, the oracle's target-label share before and after, identity retention
    at `identity_threshold`, and the gate's acceptance rate (columns only where known)."""
    groups = train[["sample_id", "group"]].assign(group=lambda d: d["group"].fillna("unknown")
                                                  .astype(str))
    out = pd.DataFrame({"group": sorted(groups["group"].unique())})
    if judgements is not None and len(judgements):
        j = judgements.merge(groups, on="sample_id", how="left")
        j["group"] = j["group"].fillna("unknown")
        rows = []
        for group, part in j.groupby("group", sort=True):
            target = part["label"].to_numpy()
            row = {"group": group, "edits": len(part),
                   "oracle_target_before": _mean(part["oracle_pred_before"].to_numpy() == target),
                   "oracle_target_after": _mean(part["oracle_pred_after"].to_numpy() == target)}
            if identity_threshold is not None:
                row["identity_retention"] = _mean(
                    part["identity_similarity_oracle"].to_numpy(float) >= identity_threshold)
            rows.append(row)
        out = out.merge(pd.DataFrame(rows), on="group", how="left")
    if edits is not None and "gate_accepted" in edits.columns and len(edits):
        e = edits[["sample_id", "gate_accepted"]].merge(groups, on="sample_id", how="left")
        rate = e.groupby(e["group"].fillna("unknown"))["gate_accepted"].mean()
        out["gate_accept_rate"] = out["group"].map(rate)
    if "edits" in out:
        out["edits"] = out["edits"].fillna(0).astype(int)
    return out


def accuracy_by_group(accuracy: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Per group: test accuracy (%) under each condition present, and DiffInf's change
    against the noisy classifier (points)."""
    present = [c for c in CONDITIONS if accuracy.get(c)]
    groups = sorted({g for c in present for g in accuracy[c]})
    out = pd.DataFrame({"group": groups})
    for c in present:
        out[f"accuracy_{c}"] = out["group"].map(accuracy[c])
    if "noisy" in present and "diffinf" in present:
        out["accuracy_change"] = out["accuracy_diffinf"] - out["accuracy_noisy"]
    return out


def subgroup_audit(train: pd.DataFrame, influence: pd.DataFrame,
                   accuracy: dict[str, dict[str, float]], judgements: pd.DataFrame | None = None,
                   edits: pd.DataFrame | None = None, identity_threshold: float | None = None,
                   thresholds: AuditThresholds = AuditThresholds()) -> tuple[pd.DataFrame, list[str]]:
    """The audit table (one row per group; see the module docstring) and its warnings."""
    table = detection_by_group(train, influence)
    table = table.merge(edits_by_group(train, judgements, edits, identity_threshold),
                        on="group", how="left")
    acc = accuracy_by_group(accuracy)
    if len(acc):
        table = table.merge(acc, on="group", how="outer")
    return table, audit_warnings(table, thresholds)


def audit_warnings(table: pd.DataFrame, thresholds: AuditThresholds) -> list[str]:
    """One line per group flagged out of proportion or left worse off by DiffInf."""
    warnings = []
    for row in table.to_dict(orient="records"):
        ratio = row.get("flag_ratio")
        if ratio is not None and not pd.isna(ratio) and ratio > thresholds.flag_ratio:
            warnings.append(
                f"group {row['group']}: flagged {ratio:.2f}x its share of the training rows "
                f"({row['flagged']} of {row['rows']} rows; warning above {thresholds.flag_ratio}x)")
        change = row.get("accuracy_change")
        if change is not None and not pd.isna(change) and change < -thresholds.accuracy_drop:
            warnings.append(
                f"group {row['group']}: test accuracy falls {-change:.2f} points after DiffInf "
                f"({row['accuracy_noisy']:.2f} -> {row['accuracy_diffinf']:.2f}; warning when "
                f"it falls more than {thresholds.accuracy_drop} points)")
    return warnings

"""The subgroup audit (diffinf_ray/subgroup_audit.py) on tables small enough to count by hand,
and its section of the run report on a hand-made run root."""

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffinf_ray.subgroup_audit import AuditThresholds, audit_warnings, subgroup_audit


def _tables():
    # group a: 6 rows, 3 flagged (2 corrupted among them), 1 more corrupted unflagged;
    # group b: 4 rows, 1 flagged (corrupted), none other corrupted
    train = pd.DataFrame({"sample_id": [f"s{i}" for i in range(10)],
                          "group": ["a"] * 6 + ["b"] * 4})
    influence = pd.DataFrame({
        "sample_id": [f"s{i}" for i in range(10)],
        "is_high": [True, True, True, False, False, False, True, False, False, False],
        "is_corrupted": [True, True, False, True, False, False, True, False, False, False]})
    judgements = pd.DataFrame({  # the four flagged rows' edits
        "sample_id": ["s0", "s1", "s2", "s6"], "label": [1, 0, 1, 2],
        "oracle_pred_before": [0, 0, 0, 1], "oracle_pred_after": [1, 0, 0, 2],
        "identity_similarity_oracle": [0.9, 0.2, 0.8, 0.7]})
    edits = pd.DataFrame({"sample_id": ["s0", "s1", "s2", "s6"],
                          "gate_accepted": [True, False, False, True]})
    accuracy = {"noisy": {"a": 80.0, "b": 70.0}, "removal": {"a": 75.0, "b": 72.0},
                "diffinf": {"a": 82.0, "b": 65.0}}
    return train, influence, judgements, edits, accuracy


def test_audit_figures_counted_by_hand():
    train, influence, judgements, edits, accuracy = _tables()
    table, _ = subgroup_audit(train, influence, accuracy, judgements, edits,
                              identity_threshold=0.75)
    a, b = (table.set_index("group").loc[g] for g in ("a", "b"))
    assert (a["rows"], a["flagged"], b["rows"], b["flagged"]) == (6, 3, 4, 1)
    assert a["share"] == pytest.approx(0.6) and a["flag_rate"] == pytest.approx(0.5)
    assert a["flag_ratio"] == pytest.approx((3 / 4) / 0.6)  # share of flagged / share of rows
    assert b["flag_ratio"] == pytest.approx((1 / 4) / 0.4)
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(2 / 3)
    assert b["precision"] == 1.0 and b["recall"] == 1.0
    assert (a["edits"], b["edits"]) == (3, 1)
    assert a["oracle_target_before"] == pytest.approx(1 / 3)  # s1 only: label 0, oracle 0
    assert a["oracle_target_after"] == pytest.approx(2 / 3)   # s0 and s1
    assert a["identity_retention"] == pytest.approx(2 / 3)    # 0.9 and 0.8 of 0.9, 0.2, 0.8
    assert a["gate_accept_rate"] == pytest.approx(1 / 3) and b["gate_accept_rate"] == 1.0
    assert a["accuracy_change"] == pytest.approx(2.0) and b["accuracy_change"] == pytest.approx(-5)


def test_warnings_name_the_group_and_respect_the_thresholds():
    train, influence, judgements, edits, accuracy = _tables()
    table, warnings = subgroup_audit(train, influence, accuracy)
    # b's accuracy falls 5 points; a's flag ratio 1.25 is under the default 2x
    assert len(warnings) == 1 and "group b" in warnings[0] and "falls 5.00 points" in warnings[0]
    assert audit_warnings(table, AuditThresholds(flag_ratio=2.0, accuracy_drop=5.0)) == []
    flagged = audit_warnings(table, AuditThresholds(flag_ratio=1.2, accuracy_drop=10.0))
    assert len(flagged) == 1 and "group a: flagged 1.25x" in flagged[0]


def test_audit_without_edits_or_accuracy_keeps_the_detection_columns():
    train, influence, *_ = _tables()
    table, warnings = subgroup_audit(train, influence, accuracy={})
    assert list(table["group"]) == ["a", "b"] and warnings == []
    assert "edits" not in table and "accuracy_change" not in table


def _write_run_root(base, accuracy):
    train, influence, judgements, edits, _ = _tables()
    (base / "manifest_noisy").mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(train.assign(split="train"), preserve_index=False),
                   base / "manifest_noisy" / "part-0.parquet")
    (base / "influence").mkdir()
    pq.write_table(pa.Table.from_pandas(influence, preserve_index=False),
                   base / "influence" / "influence.parquet")
    for condition, folder in (("noisy", "evaluation"), ("diffinf", "retrain/evaluation")):
        (base / folder).mkdir(parents=True)
        (base / folder / "metrics.json").write_text(
            json.dumps({"accuracy": 70.0, "per_group_accuracy": accuracy[condition]}))


def test_report_section_on_a_run_root(tmp_path):
    from diffinf_ray.config import load_config
    from diffinf_ray.run_root import RunRoot
    from diffinf_ray.stages.report import audit_section

    _write_run_root(tmp_path, _tables()[4])
    cfg = load_config(None, {"run.root": str(tmp_path), "report.audit_accuracy_drop": 1.0})
    summary: dict = {}
    md = "".join(audit_section(cfg, RunRoot(str(tmp_path)), summary))
    assert "## Subgroup audit" in md and "**Warning:** group b" in md
    saved = pd.read_csv(tmp_path / "report" / "subgroup_audit.csv")
    assert list(saved["group"]) == ["a", "b"] and summary["subgroup_audit"]["warnings"]

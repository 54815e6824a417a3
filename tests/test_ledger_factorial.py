"""The detector x treatment table from ledger records: every treatment paired with the noisy and
removal fits of its own record, the share of the noisy -> clean gap from the ceiling records of
the same setting, and the detection figures per detector."""

import pytest
from scipy import stats

from diffinf_ray import ledger
from diffinf_ray.ledger_factorial import detection_rows, factorial_cells, format_factorial


def record(seed, flag_by, metrics, *, rate=0.3, epochs=8, method="oracle_repair", gate=False,
           commit="aaaaaaa1", stages=None, baselines=None, stage_list=("train",)):
    config = {"run": {"seed": seed}, "noise": {"rate": rate, "seed": seed, "kind": "symmetric"},
              "train": {"epochs": epochs}, "influence": {"flag_by": flag_by, "tau": 0.1},
              "edit": {"method": method, "gate": {"enabled": gate}}, "stages": list(stage_list),
              "baselines": baselines or {"methods": ["small_loss"], "options": {}}}
    return {"schema": 1, "config": config, "setting": ledger.setting_hash(config), "seed": seed,
            "noise": {"rate": rate}, "task": "age", "run": "f", "commit": commit,
            "date": f"2026-12-05T00:0{seed}:00Z", "stages": stages or {},
            "metrics": {k: {"accuracy": v} for k, v in metrics.items()}}


def cell(rows, detector, treatment):
    [row] = [r for r in rows if (r["detector"], r["treatment"]) == (detector, treatment)]
    return row


def test_each_treatment_is_paired_with_its_own_records_noisy_and_removal_fits():
    # the cleanlab records come from other code: their noisy fit differs at the same seed
    records = [record(s, "tracin", {"noisy": 50 + s, "removal": 52 + s, "diffinf": 55 + 2 * s})
               for s in range(3)]
    records += [record(s, "cleanlab", {"noisy": 40.0, "removal": 45 + s, "oracle_relabel": 47.0},
                       commit="bbbbbbb2") for s in range(3)]
    rows = factorial_cells(records)
    repair = cell(rows, "tracin", "diffinf oracle_repair")
    diffs = [5.0, 6.0, 7.0]  # diffinf - noisy of each tracin record
    t = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert repair["vs_noisy"]["mean"] == pytest.approx(6.0)
    assert repair["vs_noisy"]["ci95"] == pytest.approx((t.low, t.high))
    assert repair["vs_removal"]["mean"] == pytest.approx(4.0)  # 3, 4, 5
    relabel = cell(rows, "cleanlab", "oracle_relabel")
    assert relabel["vs_noisy"]["mean"] == pytest.approx(7.0)  # against 40, not the tracin noisy
    assert relabel["vs_removal"]["mean"] == pytest.approx(1.0)  # 2, 1, 0
    assert relabel["commits"] == ["bbbbbbb"]
    assert cell(rows, "cleanlab", "removal")["vs_removal"] is None
    assert [r["gap_share"] for r in rows] == [None] * len(rows)  # no ceiling in the ledger
    # only one commit's records
    assert {r["detector"] for r in factorial_cells(records, commit="bbb")} == {"-", "cleanlab"}


def test_the_share_of_the_gap_comes_from_the_ceiling_of_the_same_setting_and_seed():
    records = [record(s, "oracle", {"noisy": 50.0, "removal": 55.0 + s, "diffinf": 60.0},
                      method="guided", gate=True) for s in range(2)]
    records += [record(s, "tracin", {"noisy": 70.0 + s}, rate=0.0) for s in range(2)]  # ceiling
    records += [record(0, "tracin", {"noisy": 99.0}, rate=0.0, epochs=3)]  # another setting's
    rows = factorial_cells(records)
    assert cell(rows, "-", "clean ceiling")["values"] == [70.0, 71.0]
    # removal: (5 + 6) / (20 + 21); guided + gate: (10 + 10) / 41
    assert cell(rows, "oracle", "removal")["gap_share"] == pytest.approx(11 / 41)
    assert cell(rows, "oracle", "diffinf guided + gate")["gap_share"] == pytest.approx(20 / 41)
    assert cell(rows, "-", "noisy")["gap_share"] == 0.0
    text = format_factorial(rows)
    assert "| age | 0.3 | oracle | diffinf guided + gate | 0,1 | 60.00 ± 0.00 |" in text


def test_noisy_label_methods_are_rows_without_a_detector_paired_with_the_noisy_fit():
    # a baselines-only run (other stage list, ProMix's warm-up set) joins the factorial's setting
    records = [record(s, "tracin", {"noisy": 50.0 + s, "removal": 49.0}) for s in range(2)]
    records += [record(s, "tracin", {"noisy": 50.0 + s, "small_loss": 55.0 + 2 * s,
                                     "promix": 52.0},
                       stage_list=("ingest", "noise", "train", "baselines"),
                       baselines={"methods": ["small_loss", "promix"],
                                  "options": {"promix": {"pretrain_epochs": 3}}})
                for s in range(2)]
    records += [record(s, "tracin", {"noisy": 60.0 + s}, rate=0.0) for s in range(2)]  # ceiling
    rows = factorial_cells(records)
    small = cell(rows, "-", "small_loss")
    assert small["values"] == [55.0, 57.0]
    assert small["vs_noisy"]["mean"] == pytest.approx(5.5)  # 5, 6
    assert small["vs_removal"] is None  # it removes nothing
    assert small["gap_share"] == pytest.approx(11 / 20)
    assert cell(rows, "-", "promix")["vs_noisy"]["mean"] == pytest.approx(1.5)  # 2, 1
    assert cell(rows, "tracin", "removal")["values"] == [49.0, 49.0]  # the same group
    assert cell(rows, "-", "noisy")["noisy_fits_differ"] == []
    order = [(r["detector"], r["treatment"]) for r in rows]
    assert order[:4] == [("-", "noisy"), ("-", "small_loss"), ("-", "promix"),
                         ("-", "clean ceiling")]


def test_a_seed_whose_records_hold_different_noisy_fits_is_averaged_and_named():
    records = [record(0, "tracin", {"noisy": 50.0, "removal": 52.0}),
               record(0, "oracle", {"noisy": 54.0, "removal": 60.0}, commit="bbbbbbb2"),
               record(1, "tracin", {"noisy": 40.0, "removal": 41.0})]
    rows = factorial_cells(records)
    noisy = cell(rows, "-", "noisy")
    assert noisy["values"] == [52.0, 40.0] and noisy["noisy_fits_differ"] == [0]
    assert cell(rows, "oracle", "removal")["vs_noisy"]["mean"] == pytest.approx(6.0)  # own fit
    assert "At seed(s) 0 the records' noisy fits differ" in format_factorial(rows)


def test_a_rerun_supersedes_its_record_and_does_not_add_a_seed():
    old = record(0, "tracin", {"noisy": 50.0, "removal": 40.0})
    new = {**record(0, "tracin", {"noisy": 50.0, "removal": 60.0}), "date": "2026-12-06T00:00:00Z"}
    assert cell(factorial_cells([old, new]), "tracin", "removal")["values"] == [60.0]


def test_detection_rows_average_each_detectors_figures_over_seeds():
    def stages(p):
        return {"influence": {"summary": {"flag_by": "tracin", "tau": 0.1,
                                          "tracin": {"precision": p, "recall": p / 3, "auroc": 0.7}}},
                "cleanlab": {"summary": {"cleanlab": {
                    "precision": 0.9, "recall": 0.2,  # find_label_issues' own set: not shown
                    "top_tau_precision": 0.8, "top_tau_recall": 0.25, "auroc": 0.85}}}}

    records = [record(s, "tracin", {"noisy": 50.0}, stages=stages(0.4 + 0.1 * s))
               for s in range(3)]
    # a second cell of seed 0 carries the same scores: counted once
    records.append(record(0, "cleanlab", {"noisy": 50.0}, stages=stages(0.4)))
    rows = {r["detector"]: r for r in detection_rows(records)}
    assert rows["tracin"]["seeds"] == 3 and rows["tracin"]["precision"] == pytest.approx(0.5)
    assert rows["cleanlab"]["seeds"] == 3
    assert rows["cleanlab"]["precision"] == pytest.approx(0.8)
    assert rows["cleanlab"]["recall"] == pytest.approx(0.25)


def test_the_ledger_command_prints_the_factorial(tmp_path, capsys):
    from diffinf_ray import cli

    for s in range(2):
        ledger.write_record(record(s, "cleanlab", {"noisy": 50.0, "removal": 53.0}),
                            tmp_path / "ledger")
    assert cli.main(["-q", "ledger", "--ledger", str(tmp_path / "ledger"), "--factorial"]) == 0
    out = capsys.readouterr().out
    assert "| age | 0.3 | cleanlab | removal | 0,1 | 53.00 ± 0.00 | +3.00 [+3.00, +3.00] |" in out
    assert "detection of the injected corruption" in out

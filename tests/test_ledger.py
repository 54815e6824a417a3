"""The results ledger: a record from a run root's stage records and metrics, written once, read
back, and paired differences over seeds that equal scipy's paired t interval."""

import json

import pytest

from diffinf_ray import ledger
from diffinf_ray.config import load_config
from diffinf_ray.pipeline import open_run_root
from diffinf_ray.stage_registry import fingerprint

TINY = "jobs/configs/tiny.yaml"
STAGES = "stages=[ingest,noise,train,evaluate,influence,removal]"
HOST = {"platform": "test", "python": "3", "cpus": 2, "accelerator": None}


def finished_run(root, seed: int, noisy: float, removal: float, *extra):
    """A run root whose stages are marked done with the config's fingerprints and whose noisy
    and removal evaluations hold the given accuracies (no training: the ledger reads records)."""
    cfg = load_config(TINY, [f"run.root={root}", f"run.seed={seed}", STAGES, *extra])
    run = open_run_root(cfg)
    for stage in cfg.stages:
        run.mark_done(stage, fingerprint(cfg, stage), {"stage": stage}, seconds=1.5)
    for folder, acc in ((run.evaluation, noisy), (run.child("removal", "evaluation"), removal)):
        folder.child("metrics.json").write_json(
            {"accuracy": acc, "auroc_macro_ovr": 70.0, "kappa_linear": 0.5, "ece": 0.1})
    return cfg, run


def record_of(cfg, run, now: float = 0.0) -> dict:
    return ledger.run_record(cfg, run, now=now, commit={"commit": "abc", "dirty": False},
                             host=HOST)


def test_a_record_holds_what_the_run_measured_and_is_never_rewritten(tmp_path):
    cfg, run = finished_run(tmp_path / "run", 0, noisy=50.0, removal=55.0)
    best = {"epoch": 1, "val_accuracy": 40.0, "accuracy": 52.5, "auroc_macro_ovr": 71.0,
            "kappa_linear": 0.5, "ece": 0.1}  # the noisy model's best-validation checkpoint
    noisy = run.evaluation.child("metrics.json")
    noisy.write_json({**noisy.read_json(), "best_val": best})
    record = record_of(cfg, run)
    assert record["metrics"]["noisy"]["accuracy"] == 50.0
    assert record["metrics"]["removal"]["accuracy"] == 55.0
    assert record["metrics"]["noisy"]["accuracy_best_val"] == 52.5
    assert record["metrics"]["removal"]["accuracy_best_val"] is None  # not NaN: valid JSON
    json.dumps(record, allow_nan=False)
    assert set(record["stages"]) == set(cfg.stages)
    assert record["stages"]["train"]["fingerprint"] == fingerprint(cfg, "train")
    assert record["stages"]["train"]["wall_seconds"] == 1.5
    assert "root" not in record["config"]["run"]  # a folder on one machine says nothing
    assert record["date"] == "1970-01-01T00:00:00Z" and record["commit"] == "abc"

    path = ledger.write_record(record, tmp_path / "ledger")
    assert json.loads(path.read_text())["setting"] == record["setting"]
    with pytest.raises(FileExistsError):
        ledger.write_record(record, tmp_path / "ledger")
    [back] = ledger.read_ledger(tmp_path / "ledger")
    assert back["metrics"] == record["metrics"]


def test_a_record_leaves_out_conditions_whose_stage_is_not_done(tmp_path):
    """A stage that failed half-way (one noisy-label method of four evaluated, say) leaves
    outputs in the run root; they are not the stage's results, so the record leaves them out."""
    cfg, run = finished_run(tmp_path / "run", 0, noisy=50.0, removal=55.0)
    run.child("baselines", "promix", "evaluation", "metrics.json").write_json(
        {"accuracy": 60.0, "auroc_macro_ovr": 70.0, "kappa_linear": 0.5, "ece": 0.1})
    assert set(record_of(cfg, run)["metrics"]) == {"noisy", "removal"}
    run.base.child("stages", "removal.json").write_json({"status": "failed"})
    assert set(record_of(cfg, run)["metrics"]) == {"noisy"}


def test_seeds_share_a_setting_and_other_settings_do_not(tmp_path):
    a = record_of(*finished_run(tmp_path / "a", 0, 50.0, 55.0))
    b = record_of(*finished_run(tmp_path / "b", 1, 50.0, 55.0, "noise.seed=7"))
    c = record_of(*finished_run(tmp_path / "c", 0, 50.0, 55.0, "noise.rate=0.3"))
    assert a["setting"] == b["setting"] != c["setting"]


def test_records_of_an_earlier_schema_join_the_setting_they_ran(tmp_path):
    """A record written before a setting was renamed (edit.l_perc -> edit.loss_terms.perc) or a
    section added (ekfac) is read as the current schema reads it: same settings, same setting."""
    now = record_of(*finished_run(tmp_path / "a", 0, 50.0, 55.0))
    older = json.loads(json.dumps(record_of(*finished_run(tmp_path / "b", 1, 51.0, 56.0))))
    terms = older["config"]["edit"].pop("loss_terms")
    older["config"]["edit"].update({f"l_{k}": v for k, v in terms.items() if k != "id"})
    del older["config"]["ekfac"]
    older["setting"] = "written-then"
    other = json.loads(json.dumps(older))  # the same earlier schema, another perceptual weight
    other["config"]["edit"]["l_perc"] = 0.0
    for i, r in enumerate((now, older, other)):
        ledger.write_record({**r, "date": f"2026-12-0{i + 1}T00:00:00Z"}, tmp_path / "ledger")
    back = ledger.read_ledger(tmp_path / "ledger")
    assert back[0]["setting"] == back[1]["setting"] != back[2]["setting"]
    assert back[1]["recorded_setting"] == "written-then"
    assert back[2]["config"]["edit"]["loss_terms"]["perc"] == 0.0
    assert "l_perc" not in back[2]["config"]["edit"]
    [row] = [r for r in ledger.paired_differences(back, "removal", "noisy")
             if r["setting"] == back[0]["setting"]]
    assert row["seeds"] == [0, 1]


def test_stale_stages_and_empty_roots_are_refused(tmp_path):
    cfg, run = finished_run(tmp_path / "run", 0, 50.0, 55.0)
    changed = load_config(TINY, [f"run.root={tmp_path / 'run'}", STAGES, "train.epochs=3"])
    with pytest.raises(ValueError, match="train.*other settings"):
        ledger.run_record(changed, run)
    empty = load_config(TINY, [f"run.root={tmp_path / 'empty'}", STAGES])
    with pytest.raises(ValueError, match="no finished stage"):
        ledger.run_record(empty, open_run_root(empty))


def test_paired_differences_equal_scipys_paired_t_interval(tmp_path):
    from scipy import stats

    removal, noisy = [55.0, 52.0, 58.0, 51.0], [50.0, 51.5, 53.0, 50.0]
    folder = tmp_path / "ledger"
    for seed, (r, n) in enumerate(zip(removal, noisy, strict=True)):
        ledger.write_record(record_of(*finished_run(tmp_path / f"s{seed}", seed, n, r)), folder)
    # a rerun of seed 0 supersedes the first record instead of adding a repeat
    rerun = record_of(*finished_run(tmp_path / "s0b", 0, 49.0, 56.0), now=10.0)
    rerun["commit"] = "newer"
    ledger.write_record(rerun, folder)
    noisy[0], removal[0] = 49.0, 56.0

    [row] = ledger.paired_differences(ledger.read_ledger(folder), "removal", "noisy",
                                      head="newer")
    test = stats.ttest_rel(removal, noisy)
    low, high = test.confidence_interval(0.95)
    assert row["seeds"] == [0, 1, 2, 3]
    assert row["mean"] == pytest.approx(sum(removal) / 4 - sum(noisy) / 4)
    assert row["ci95"] == pytest.approx((low, high))
    assert row["stale"] == 3  # seeds 1-3 come from commit abc, not the checkout's
    text = ledger.format_paired([row], "removal", "noisy", "accuracy")
    assert f"[{low:+.2f}, {high:+.2f}]" in text


def test_each_setting_of_a_run_is_named_by_what_sets_it_apart(tmp_path):
    folder = tmp_path / "ledger"
    for seed in (0, 1):
        for tau in (0.1, 0.2):
            ledger.write_record(record_of(*finished_run(
                tmp_path / f"s{seed}_{tau}", seed, 50.0, 52.0 + 10 * tau,
                f"influence.tau={tau}")), folder)
    rows = ledger.paired_differences(ledger.read_ledger(folder), "removal", "noisy")
    assert len(rows) == 2
    assert sorted(ledger.setting_labels(rows)) == ["influence.tau=0.1", "influence.tau=0.2"]
    text = ledger.format_paired(rows, "removal", "noisy", "accuracy")
    assert "| influence.tau=0.2 |" in text and "| +4.00 |" in text
    assert ledger.setting_labels(rows[:1]) == ["-"]  # alone: nothing to tell apart


def test_record_and_ledger_commands(tmp_path, capsys):
    from diffinf_ray.cli import main

    root = tmp_path / "run"
    finished_run(root, 0, 50.0, 55.0)
    args = [TINY, f"run.root={root}", STAGES, "--ledger", str(tmp_path / "ledger")]
    assert main(["record", *args]) == 0
    assert "noisy 50.00, removal 55.00" in capsys.readouterr().out
    assert main(["ledger", "--ledger", str(tmp_path / "ledger"), "--a", "removal",
                 "--b", "noisy"]) == 0
    out = capsys.readouterr().out
    assert "1 records" in out and "| +5.00 | - | - |" in out  # one seed: no interval

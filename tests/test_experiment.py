"""The Table-1 experiment runner: config validation, the plan, failure handling and resume
(stand-in stages, no Ray) and the table's formatting. The one tiny real experiment runs as a
`ray job submit` job: tests/test_job_submit.py::test_ray_job_submit_experiment."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from diffinf_ray import experiment as ex
from diffinf_ray.config import ConfigError

TINY = Path("jobs/configs/tiny.yaml").resolve()


def write_experiment(tmp_path: Path, text: str) -> Path:
    (tmp_path / "base.yaml").write_text(TINY.read_text())
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


GOOD = """
name: t
root: {root}
base: base.yaml
tasks:
  age: {{data.task: age, noise.rate: 0.3}}
  expression: {{data.task: expression, noise.rate: 0.2}}
"""


# -- config and plan -------------------------------------------------------------------------

def test_unknown_key_is_named(tmp_path):
    path = write_experiment(tmp_path, GOOD.format(root=tmp_path / "r") + "seed: [0]\n")
    with pytest.raises(ConfigError, match="unknown key 'seed'") as err:
        ex.load_experiment(path)
    assert str(path) in str(err.value)


def test_bad_task_override_names_task_and_key(tmp_path):
    text = GOOD.format(root=tmp_path / "r").replace("noise.rate: 0.2", "noise.rat: 0.2")
    with pytest.raises(ConfigError) as err:
        ex.load_experiment(write_experiment(tmp_path, text))
    assert "expression/methods" in str(err.value) and "noise.rat" in str(err.value)


def test_runner_managed_keys_are_refused(tmp_path):
    text = GOOD.format(root=tmp_path / "r") + "overrides: {run.seed: 3}\n"
    with pytest.raises(ConfigError, match="'run.seed' is set by the runner"):
        ex.load_experiment(write_experiment(tmp_path, text))


def test_wrong_type_and_stage_names(tmp_path):
    text = GOOD.format(root=tmp_path / "r") + "seeds: [0, 0]\nstages: [ingest, trian]\n"
    with pytest.raises(ConfigError) as err:
        ex.load_experiment(write_experiment(tmp_path, text))
    assert "'seeds'" in str(err.value) and "'stages.1'" in str(err.value)


def test_plan_roots_seeds_overrides_and_ceiling(tmp_path):
    root = tmp_path / "r"
    text = GOOD.format(root=root) + ("seeds: [3, 5]\noverrides: {train.epochs: 1}\n"
                                     "noise_rates: [0.0, 0.1, 0.3]\nstages: [ingest, noise]\n")
    exp = ex.load_experiment(write_experiment(tmp_path, text))
    assert exp.base == str(tmp_path / "base.yaml")  # relative to the experiment file
    runs = ex.plan(exp)
    assert [r.id for r in runs] == [
        "age/methods/seed_3", "age/clean/seed_3", "age/noisy_0.1/seed_3",  # 0.3 = age's own
        "expression/methods/seed_3", "expression/clean/seed_3", "expression/noisy_0.1/seed_3",
        "expression/noisy_0.3/seed_3",
        "age/methods/seed_5", "age/clean/seed_5", "age/noisy_0.1/seed_5",
        "expression/methods/seed_5", "expression/clean/seed_5", "expression/noisy_0.1/seed_5",
        "expression/noisy_0.3/seed_5"]
    assert [r.id for r in ex.plan(exp)] == [r.id for r in runs]  # deterministic
    for r in runs:
        cfg = r.config
        assert cfg.run.root == str(root / r.task / r.kind / f"seed_{r.seed}")
        assert cfg.run.seed == cfg.noise.seed == r.seed
        assert cfg.data.task == r.task
        assert cfg.train.epochs == 1
        assert cfg.data.synthfaces.num_samples == 160  # untouched base value
    by_id = {r.id: r.config for r in runs}
    assert by_id["age/methods/seed_3"].noise.rate == 0.3
    assert by_id["age/methods/seed_3"].stages == ["ingest", "noise"]
    assert by_id["expression/methods/seed_5"].noise.rate == 0.2
    assert by_id["age/clean/seed_5"].noise.rate == 0.0
    assert by_id["age/clean/seed_5"].stages == ex.BASELINE_STAGES
    assert by_id["expression/noisy_0.3/seed_3"].noise.rate == 0.3
    assert len({c.run.root for c in by_id.values()}) == len(runs)


def test_s3_root_keeps_its_query():
    exp = ex.ExperimentConfig(name="t", root="s3://b/x?endpoint_override=http://h:9&region=r",
                              base=str(TINY), seeds=[0], tasks={"age": {"data.task": "age"}},
                              clean_ceiling=False)
    [run] = ex.plan(exp)
    assert run.root == "s3://b/x/age/methods/seed_0?endpoint_override=http://h:9&region=r"


def test_shipped_configs_validate():
    for name in ("experiment.yaml", "experiment_tiny.yaml"):
        exp = ex.load_experiment(Path("jobs/configs") / name)
        assert len(exp.seeds) >= 2 and ex.plan(exp)
    full = ex.load_experiment("jobs/configs/experiment.yaml")
    assert {t: r.noise_rate for r in ex.plan(full) if r.kind == "methods"
            for t in [r.task]} == {"age": 0.3, "expression": 0.2}


# -- table formatting (pure) -----------------------------------------------------------------

def test_format_table_mean_std_against_numpy():
    rng = np.random.default_rng(0)
    rows = []
    for task in ("age", "expression"):
        for cond in ("diffinf", "noisy", "promix", "clean", "standard"):
            for seed in range(3):
                rows.append({"task": task, "run": "clean" if cond == "clean" else "methods",
                             "condition": cond, "seed": seed, "noise_rate": 0.3,
                             "accuracy": rng.uniform(60, 90), "auroc": rng.uniform(80, 99),
                             "kappa": rng.uniform(0.5, 0.9), "ece": rng.uniform(0, 0.2),
                             "accuracy_best_val": rng.uniform(60, 90)})
    long = pd.DataFrame(rows)
    long.loc[(long.task == "age") & (long.condition == "promix") & (long.seed == 2), "auroc"] = None
    # another noise rate's run must not leak into Table 1
    long = pd.concat([long, long.iloc[:1].assign(run="noisy_0.1", noise_rate=0.1, accuracy=0.0)])
    table = ex.format_table(long, ["age", "expression"])

    assert list(table["method"]) == [
        "trained on noisy labels", "Small-loss", "ELR+", "self-influence removal",
        "DiffInf (self-influence generation)", "ProSelfLC", "ProMix", "standard",
        "clean labels (ceiling)"]
    assert list(table.columns[1:5]) == ["age acc (%)", "age AUROC", "age kappa", "age ECE"]
    t = table.set_index("method")
    for task in ("age", "expression"):
        for metric, (label, digits) in ex.METRICS.items():
            v = long[(long.task == task) & (long.condition == "diffinf")
                     & (long.run == "methods")][metric].to_numpy(float)
            expected = f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f} (n=3)"
            assert t.loc["DiffInf (self-influence generation)", f"{task} {label}"] == expected
    v = long[(long.task == "age") & (long.condition == "promix")]["auroc"].dropna().to_numpy()
    assert t.loc["ProMix", "age AUROC"] == f"{v.mean():.2f} ± {v.std(ddof=1):.2f} (n=2)"
    assert t.loc["Small-loss", "age acc (%)"] == "-"  # never run
    assert t.loc["self-influence removal"].iloc[1:].eq("-").all()


def test_mean_std_cell_edge_cases():
    assert ex.mean_std_cell([], 2) == "-"
    assert ex.mean_std_cell([None, float("nan")], 2) == "-"
    assert ex.mean_std_cell([81.234], 2) == "81.23 (n=1)"
    assert ex.mean_std_cell([1.0, 2.0, 3.0], 1) == "2.0 ± 1.0 (n=3)"


# -- runner with stand-in stages (no Ray) ----------------------------------------------------

FAIL = {"train": set()}  # run roots whose train stage raises


def _metrics(cfg, condition: str) -> dict:
    # distinct, known numbers per run and condition
    offset = {"noisy": 0, "removal": 1, "small_loss": 2, "elr_plus": 3, "proselflc": 4,
              "promix": 5, "diffinf": 6}[condition]
    acc = 90 - 100 * cfg.noise.rate + offset + cfg.run.seed
    return {"accuracy": acc, "auroc_macro_ovr": acc + 5, "kappa_linear": acc / 100,
            "ece": 0.01 * (1 + cfg.run.seed)}


def _png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 4), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _fake_stage(stage: str):
    def run(cfg, root) -> dict:
        if stage == "train" and cfg.run.root in FAIL["train"]:
            raise RuntimeError("out of memory (stand-in)")
        if stage == "evaluate":
            root.child("evaluation", "metrics.json").write_json(_metrics(cfg, "noisy"))
        elif stage == "removal":
            root.child("removal", "evaluation", "metrics.json").write_json(_metrics(cfg, "removal"))
        elif stage == "baselines":
            for m in cfg.baselines.methods:
                root.child("baselines", m, "evaluation", "metrics.json").write_json(
                    _metrics(cfg, m))
        elif stage == "retrain":
            root.child("retrain", "evaluation", "metrics.json").write_json(
                _metrics(cfg, "diffinf"))
        elif stage == "influence":
            n, ks = 100, [1, 5, 10, 30]
            root.child("influence", "detection.json").write_json({
                name: {"n": n, "n_corrupted": int(n * cfg.noise.rate),
                       "precision_at_k": {"k": ks, "precision": [p - 0.01 * k for k in ks]}}
                for name, p in (("tracin", 0.9), ("loss", 0.7))})
        elif stage == "report":
            names = cfg.class_names
            pd_csv = pd.DataFrame({"class": names, "edits": [4] * len(names),
                                   "lpips_mean": [0.2 + 0.01 * i + 0.001 * cfg.run.seed
                                                  for i in range(len(names))],
                                   "lpips_std": [0.05] * len(names)})
            root.child("report", "lpips_by_class.csv").write_bytes(pd_csv.to_csv(index=False).encode())
            root.child("report", f"grid_{names[0]}.png").write_bytes(_png_bytes())
        return {"stage": stage}

    return run


@pytest.fixture
def fake_stages(monkeypatch):
    import diffinf_ray.pipeline as pipeline
    import diffinf_ray.ray_session as ray_session

    monkeypatch.setattr(pipeline, "stage_function", _fake_stage)
    monkeypatch.setattr(ray_session, "ray_session", lambda cfg: contextlib.nullcontext())
    FAIL["train"].clear()
    yield
    FAIL["train"].clear()


def test_failure_is_recorded_and_the_runner_goes_on_then_resumes(fake_stages, tmp_path, capsys):
    text = GOOD.format(root=tmp_path / "r") + "seeds: [0, 1]\nnoise_rates: [0.1]\n"
    path = write_experiment(tmp_path, text)
    exp = ex.load_experiment(path)
    failing = next(r for r in ex.plan(exp) if r.id == "expression/methods/seed_1")
    FAIL["train"].add(failing.root)

    assert ex.main([str(path)]) == 1
    err = capsys.readouterr().err
    assert "failed: expression/methods/seed_1: train: RuntimeError: out of memory" in err
    state = json.loads((tmp_path / "r" / "experiment.json").read_text())
    assert len(state["runs"]) == len(ex.plan(exp)) == 12
    rec = state["runs"]["expression/methods/seed_1"]
    assert rec["status"] == "failed"
    assert rec["errors"]["evaluate"] == "not run: needs train"
    assert set(rec["errors"]) == {"train", "evaluate", "influence", "removal", "predictor",
                                  "edit", "refine", "retrain", "oracle"}
    # stages that do not read train's outputs still ran; the report shows what exists
    assert rec["stages_ran"] == ["ingest", "noise", "baselines", "autoencoder", "lossnets",
                                 "judges", "report"]
    assert all(r["status"] == "done" for k, r in state["runs"].items() if k != failing.id)

    table = (tmp_path / "r" / "table" / "table.md").read_text()
    assert "(n=1)" in table and "(n=2)" in table  # expression lost a seed, age did not

    # resume: the fixed run finishes its missing stages; nothing else re-runs
    FAIL["train"].clear()
    result = ex.run_experiment(exp)
    assert result.failures == []
    ran = {o.run.id: o.stages_ran for o in result.outcomes}
    assert ran.pop(failing.id) == ["train", "evaluate", "influence", "removal", "predictor",
                                   "edit", "refine", "retrain", "oracle", "report"]
    assert all(stages == [] for stages in ran.values())


def test_table_files_from_stand_in_runs(fake_stages, tmp_path):
    text = GOOD.format(root=tmp_path / "r") + "seeds: [0, 1, 2]\nnoise_rates: [0.1]\n"
    exp = ex.load_experiment(write_experiment(tmp_path, text))
    ex.run_experiment(exp, only_tasks=["age"])
    out = tmp_path / "r" / "table"

    table = pd.read_csv(out / "table.csv").set_index("method")
    acc = [90 - 30 + 6 + s for s in range(3)]  # DiffInf on age, seeds 0..2
    assert table.loc["DiffInf (self-influence generation)", "age acc (%)"] == \
        f"{np.mean(acc):.2f} ± {np.std(acc, ddof=1):.2f} (n=3)"
    clean = [90 + s for s in range(3)]
    assert table.loc["clean labels (ceiling)", "age acc (%)"] == \
        f"{np.mean(clean):.2f} ± {np.std(clean, ddof=1):.2f} (n=3)"
    assert table["expression acc (%)"].eq("-").all()  # not run
    long = pd.read_csv(out / "metrics_long.csv")
    assert set(long[long.run == "noisy_0.1"].condition) == {"noisy"}
    assert sorted(long.noise_rate.unique()) == [0.0, 0.1, 0.3]

    md = (out / "table.md").read_text()
    assert md.index("trained on noisy labels") < md.index("Small-loss") < md.index("ELR+") \
        < md.index("self-influence removal") < md.index("DiffInf") < md.index("ProSelfLC") \
        < md.index("ProMix") < md.index("clean labels (ceiling)")
    lp = [0.2 + 0.001 * s for s in range(3)]  # class 0's per-seed means
    assert f"{np.mean(lp):.3f} ± {np.std(lp, ddof=1):.3f} (n=3)" in md
    for png in ("plots/detection_curves.png", "plots/accuracy_vs_noise.png",
                "grids/age_grid_young.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
        assert f"]({png})" in md
    page = (out / "table.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "<table" in page and "±" in page
    # the stand-in runs have no best-validation figures: its paired columns and plot are empty
    assert "| best val: acc (%) |" in md and not (out / "plots" / "treatments_age_best_val.png").exists()
    assert (out / "plots" / "treatments_age.png").read_bytes()[:4] == b"\x89PNG"

    # --table-only re-aggregates without running anything
    (out / "table.md").unlink()
    assert ex.main([str(tmp_path / "exp.yaml"), "--table-only"]) == 0
    assert (out / "table.md").exists()


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    path = write_experiment(tmp_path, GOOD.format(root=tmp_path / "r"))
    assert ex.main([str(path), "--dry-run", "--task", "age"]) == 0
    out = capsys.readouterr().out
    assert "6 runs" in out and "age/clean/seed_2" in out and "expression" not in out
    assert not (tmp_path / "r").exists()
    assert ex.main([str(path), "--task", "nope"]) == 2


def test_a_ledger_holds_finished_runs_and_the_table_marks_older_code(fake_stages, tmp_path,
                                                                      monkeypatch, capsys):
    """With `ledger:` every finished run is recorded; a later invocation (here: on a machine
    without the run roots, at a newer commit) runs nothing the ledger holds, takes the figures
    from the records and marks them as older code's; a changed setting is not held."""
    import shutil

    import diffinf_ray.ledger as ledger
    import diffinf_ray.pipeline as pipeline

    text = (GOOD.format(root=tmp_path / "r") + "seeds: [0, 1]\n"
            f"ledger: {tmp_path / 'ledger'}\n"
            "stages: [ingest, noise, train, evaluate, influence, removal]\n")
    path = write_experiment(tmp_path, text)
    exp = ex.load_experiment(path)
    commit = {"commit": "a" * 40, "dirty": False}
    monkeypatch.setattr(ledger, "git_commit", lambda cwd=None: dict(commit))
    first = ex.run_experiment(exp, only_tasks=["age"])
    assert [o.status for o in first.outcomes] == ["done"] * 4  # methods + clean, 2 seeds
    assert len(list((tmp_path / "ledger").glob("*.json"))) == 4
    table = pd.read_csv(tmp_path / "r" / "table" / "table.csv").set_index("method")
    removal = table.loc["self-influence removal", "age acc (%)"]
    assert "†" not in removal  # the records are this checkout's

    shutil.rmtree(tmp_path / "r")
    commit["commit"] = "b" * 40
    ran = []
    real = pipeline.stage_function
    monkeypatch.setattr(pipeline, "stage_function",
                        lambda stage: (ran.append(stage), real(stage))[1])
    again = ex.run_experiment(exp, only_tasks=["age"])
    assert [o.status for o in again.outcomes] == ["held"] * 4 and ran == []
    assert again.failures == []
    out = tmp_path / "r" / "table"
    table = pd.read_csv(out / "table.csv").set_index("method")
    assert table.loc["self-influence removal", "age acc (%)"] == removal + " †"
    acc = [90 - 30 + 1 + s for s in range(2)]  # the stand-in removal's, seeds 0 and 1
    assert removal == f"{np.mean(acc):.2f} ± {np.std(acc, ddof=1):.2f} (n=2)"
    assert table.loc["clean labels (ceiling)", "age acc (%)"].endswith(" †")
    md = (out / "table.md").read_text()
    assert "commits aaaaaaa" in md
    state = json.loads((tmp_path / "r" / "experiment.json").read_text())
    assert {r["status"] for r in state["runs"].values()} == {"held"}
    assert ex.main([str(path), "--task", "age", "--dry-run"]) == 0
    assert "4 runs, 4 held by the ledger (not run):" in capsys.readouterr().out

    # another setting: its fingerprints differ, so the ledger does not hold it
    changed = write_experiment(tmp_path, text + "overrides: {train.epochs: 3}\n")
    third = ex.run_experiment(ex.load_experiment(changed), only_tasks=["age"])
    assert [o.status for o in third.outcomes] == ["done"] * 4 and "train" in ran
    assert len(list((tmp_path / "ledger").glob("*.json"))) == 8

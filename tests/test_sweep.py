"""`diffinf sweep`: the sweep file, which stages trials share with the base run, and a tiny
real Ray Tune sweep that is interrupted after its first trial and then restored."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
from ray import tune

from diffinf_ray.config import STAGES, ConfigError, fingerprint, load_config, override_config
from diffinf_ray.run_root import RunRoot
from diffinf_ray.stage_registry import REGISTRY
from diffinf_ray.sweep import (
    SharedRunRoot,
    load_sweep,
    main,
    plot_objective,
    run_sweep,
)
from diffinf_ray.sweep.run import _check_same_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def write_sweep(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- the sweep file -----------------------------------------------------------------------


def test_shipped_sweeps_share_the_upstream_stages():
    plan = load_sweep(CONFIGS / "sweep.yaml")
    assert plan.shared == ["ingest", "noise", "train", "autoencoder", "lossnets"]
    # the edit gate reads the removal classifier, which drops the flagged set: tau retrains it
    assert plan.per_trial == ["influence", "removal", "predictor", "edit", "refine", "retrain"]
    assert plan.max_reports == 5  # 10 epochs, 2 per report
    assert plan.root.path.endswith("runs/diffinf_age32/sweeps/edit_weights_tau")

    tiny = load_sweep(CONFIGS / "sweep_tiny.yaml")
    assert tiny.shared == ["ingest", "noise", "train"]
    assert tiny.per_trial == ["influence", "removal"]
    assert tiny.total_trials == 2


def test_relative_roots_are_fixed_to_the_driver_directory(tmp_path, monkeypatch):
    """Tune runs each trial in its own working directory; a relative run.root would send the
    trial to an empty run root there (and rerun every shared stage)."""
    monkeypatch.chdir(tmp_path)
    plan = load_sweep(CONFIGS / "sweep_tiny.yaml")  # run.root=./runs/tiny_sweep
    setup = plan.trial_setup()
    assert setup.base_uri == str(tmp_path / "runs" / "tiny_sweep")
    assert setup.trials_uri.startswith(str(tmp_path / "runs" / "tiny_sweep" / "sweeps"))
    assert plan.base.run.root == setup.base_uri
    weights = load_sweep(CONFIGS / "sweep_tiny.yaml", ["train.weights_uri=w/resnet.pt",
                                                        "train.weights_sha256=" + "ab" * 32])
    assert weights.base.train.weights_uri == str(tmp_path / "w" / "resnet.pt")
    rooted = load_sweep(CONFIGS / "sweep_tiny.yaml", ["root=./elsewhere"])
    assert rooted.trial_setup().trials_uri == str(tmp_path / "elsewhere" / "trials")


def test_trials_that_leave_no_cpu_for_reads_are_refused():
    """On 2 CPUs a trial driver (0.5) + a Train worker (1) leave 0.5: Ray Data's read task
    (1 CPU) never starts and the trial hangs; the shipped sweeps give the worker 0.5."""
    from diffinf_ray.sweep import check_trial_resources

    plan = load_sweep(CONFIGS / "sweep_age32_weights.yaml")
    check_trial_resources(plan, 2.0)
    hungry = load_sweep(CONFIGS / "sweep_age32_weights.yaml", ["train.cpus_per_worker=1"])
    with pytest.raises(ConfigError, match="would hang"):
        check_trial_resources(hungry, 2.0)
    check_trial_resources(hungry, 8.0)


def test_sweeping_noise_rate_reruns_from_the_noise_stage():
    plan = load_sweep(CONFIGS / "sweep_tiny.yaml", ["params.noise.rate={uniform: [0.1, 0.4]}"])
    assert plan.shared == ["ingest"]
    assert plan.per_trial == ["noise", "train", "influence", "removal"]


def test_the_guided_sweep_varies_the_edit_knobs_and_shares_every_stage_before_the_edit():
    """jobs/configs/sweep_demo_guided.yaml: a grid over edit.guided.t0 x scale that re-runs only
    edit, refine and the retrain, and that starts on a 2-CPU box."""
    from diffinf_ray.sweep import check_trial_resources

    plan = load_sweep(CONFIGS / "sweep_demo_guided.yaml")
    assert plan.per_trial == ["edit", "refine", "retrain"]
    assert "lossnets" in plan.shared and "autoencoder" in plan.shared
    assert set(plan.spec.params) == {"edit.guided.t0", "edit.guided.scale"}
    assert plan.base.edit.method == "guided" and plan.base.edit.guided.t0 == 0.7
    check_trial_resources(plan, 2.0)


def test_command_line_keys_go_to_the_sweep_or_the_base(tmp_path):
    plan = load_sweep(CONFIGS / "sweep_tiny.yaml",
                      ["num_samples=3", "scheduler.kind=fifo", f"run.root={tmp_path}/b"])
    assert plan.spec.num_samples == 3 and plan.spec.scheduler.kind == "fifo"
    assert plan.base.run.root == f"{tmp_path}/b"
    assert plan.root.path == f"{tmp_path}/b/sweeps/sweep_tiny"


@pytest.mark.parametrize("params, message", [
    ("edit.w_idd: {uniform: [0.1, 1]}", "unknown config key 'edit.w_idd'"),
    ("edit.w_id: {uniform: [1, 0.1]}", "lo < hi"),
    ("edit.w_id: {loguniform: [0, 1]}", "greater than 0"),
    ("edit.w_id: {between: [0, 1]}", "params.edit.w_id"),
    ("influence.tau: {choice: [0.1, 2.0]}", "influence.tau"),  # tau <= 1
    ("edit.w_id: {uniform: [0.1, 1]}", "changes neither objective_stage removal"),
    ("run.root: {choice: [a, b]}", "params.run.root changes neither"),
])
def test_bad_sweep_files_name_the_key(tmp_path, params, message):
    path = write_sweep(tmp_path, f"base: {CONFIGS / 'tiny.yaml'}\nobjective_stage: removal\n"
                                 f"params:\n  {params}\n")
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)


def test_unknown_sweep_key(tmp_path):
    path = write_sweep(tmp_path, f"base: {CONFIGS / 'tiny.yaml'}\nnum_sample: 3\n"
                                 "params: {influence.tau: {grid: [0.1]}}\n")
    with pytest.raises(ConfigError, match="num_sample"):
        load_sweep(path)


def test_restore_refuses_a_changed_search_space(tmp_path):
    plan = load_sweep(CONFIGS / "sweep_tiny.yaml", [f"root={tmp_path}"])
    _check_same_sweep(plan, restoring=False)
    _check_same_sweep(plan, restoring=True)  # same settings: fine
    changed = load_sweep(CONFIGS / "sweep_tiny.yaml", [f"root={tmp_path}", "num_samples=2"])
    with pytest.raises(ConfigError, match="--no-restore"):
        _check_same_sweep(changed, restoring=True)


@pytest.mark.parametrize("points, message", [
    ("[{edit.w_sii: 1.0}]", "not swept params"),
    ("[{edit.w_id: 1.0}, {edit.w_id: 2.0}]", "need num_samples >= 2"),
    ("[{edit.w_id: -1.0}]", r"points_to_evaluate\[0\].*edit.w_id"),
])
def test_bad_points_to_evaluate(tmp_path, points, message):
    path = write_sweep(tmp_path, f"base: {CONFIGS / 'tiny.yaml'}\nnum_samples: 1\n"
                                 f"params: {{edit.w_id: {{loguniform: [0.1, 10]}}}}\n"
                                 f"points_to_evaluate: {points}\n")
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)


def test_points_to_evaluate_run_first_then_seeded_samples(ray_local, tmp_path):
    """The search the sweep hands Tune: the reference point is the first trial and replaces
    one sample; the samples are the seeded draws (dotted keys stay flat)."""
    from diffinf_ray.sweep import search_algorithm

    plan = load_sweep(CONFIGS / "sweep_age32_weights.yaml")
    assert plan.spec.points_to_evaluate == [{"edit.w_id": 1.0, "edit.w_reg": 1.0,
                                             "edit.w_si": 1.0}]

    def configs(spec):
        tuner = tune.Tuner(lambda config: {"score": 0.0}, param_space=plan.param_space(),
                           tune_config=tune.TuneConfig(num_samples=spec.num_samples,
                                                       search_alg=search_algorithm(spec)),
                           run_config=tune.RunConfig(storage_path=str(tmp_path),
                                                     verbose=0))
        trials = sorted(tuner.fit(), key=lambda r: r.path)  # trial ids count up
        return [{k: r.config[k] for k in plan.spec.params} for r in trials]

    first = configs(plan.spec)
    assert len(first) == plan.spec.num_samples
    assert first[0] == plan.spec.points_to_evaluate[0]
    assert all(0.1 <= v <= 10 for c in first[1:] for v in c.values())
    assert len({json.dumps(c, sort_keys=True) for c in first}) == len(first)
    assert configs(plan.spec) == first  # seeded: the same trials again


def test_dry_run_prints_the_plan(capsys):
    assert main([str(CONFIGS / "sweep_tiny.yaml"), "--dry-run", "num_samples=2"]) == 0
    out = capsys.readouterr().out
    assert "shared, run once ingest, noise, train" in out
    assert "per trial        influence, removal" in out


def test_plot_of_a_categorical_param(tmp_path):
    plan = load_sweep(CONFIGS / "sweep_tiny.yaml", [f"root={tmp_path}"])
    rows = [{"influence.layers": None, "val_accuracy": 40.0, "status": "done"},
            {"influence.layers": ["head"], "val_accuracy": 35.0, "status": "stopped"}]
    plot_objective(plan, rows, "influence.layers")
    assert (tmp_path / "objective_vs_influence.layers.png").read_bytes()[:4] == b"\x89PNG"


# -- SharedRunRoot routing (fingerprints only, no Ray) -------------------------------------


def finished_base(tmp_path: Path):
    """A base run root whose every stage is marked done with the base config's fingerprint."""
    cfg = load_config(CONFIGS / "diffinf_age32.yaml", [f"run.root={tmp_path / 'base'}"])
    base = RunRoot(cfg.run.root)
    for stage in STAGES:
        base.mark_done(stage, fingerprint(cfg, stage), {"stage": stage}, 1.0)
    return cfg, base


def test_edit_weight_trial_reads_the_baseline_from_the_base_root(tmp_path):
    cfg, base = finished_base(tmp_path)
    trial_cfg = override_config(cfg, {"edit.w_id": 3.0}, "trial")
    root = SharedRunRoot.for_trial(base, str(tmp_path / "trial"), trial_cfg, exclude={"retrain"})
    in_base = str(tmp_path / "base")
    in_trial = str(tmp_path / "trial")
    # what the baseline, TracIn, the autoencoder and the loss networks wrote: from the base
    assert root.checkpoints.path == f"{in_base}/checkpoints"
    assert root.noisy_manifest.path == f"{in_base}/manifest_noisy"
    for folder in ("influence", "autoencoder", "predictor", "lossnets", "judges"):
        assert root.child(folder, "x.json").path == f"{in_base}/{folder}/x.json"
    # the edit and everything after it: the trial's own
    for folder in ("edits", "refined", "retrain", "oracle", "report"):
        assert root.child(folder).path == f"{in_trial}/{folder}"
    assert root.stage_record("train")["summary"] == {"stage": "train"}  # run_stage skips it
    assert root.stage_record("edit") is None
    root.mark_done("edit", fingerprint(trial_cfg, "edit"), {}, 1.0)
    assert (tmp_path / "trial" / "stages" / "edit.json").exists()
    with pytest.raises(RuntimeError, match="shared with the base run"):
        root.mark_started("train", fingerprint(trial_cfg, "train"))


def test_noise_rate_trial_owns_noise_and_everything_downstream(tmp_path):
    cfg, base = finished_base(tmp_path)
    trial_cfg = override_config(cfg, {"noise.rate": 0.1}, "trial")
    root = SharedRunRoot.for_trial(base, str(tmp_path / "trial"), trial_cfg)
    # no labels in ingest or lossnets; the judges draw their own data
    assert root.shared_stages == {"ingest", "lossnets", "judges"}
    assert root.manifest.path == str(tmp_path / "base" / "manifest")
    owned = {folder for stage in STAGES if stage not in root.shared_stages
             for folder in REGISTRY[stage].outputs}
    for folder in owned:
        assert root.child(folder).path == str(tmp_path / "trial" / folder)
    assert root.checkpoints.path == str(tmp_path / "trial" / "checkpoints")


def test_trial_root_pickled_keeps_its_routing(tmp_path):
    """The edit stage's actors receive the root pickled: its routing travels with it."""
    import pickle

    cfg, base = finished_base(tmp_path)
    root = SharedRunRoot.for_trial(base, str(tmp_path / "trial"),
                                   override_config(cfg, {"edit.w_si": 0.5}))
    again = pickle.loads(pickle.dumps(root))
    assert isinstance(again, SharedRunRoot)
    assert again.checkpoints.path == root.checkpoints.path == str(tmp_path / "base/checkpoints")
    # a sub-root inside the trial (the oracle's own draw) is a plain run root
    oracle = RunRoot(root.child("oracle").uri, root.options)
    assert type(oracle) is RunRoot
    assert oracle.checkpoints.path == str(tmp_path / "trial" / "oracle" / "checkpoints")


# -- a tiny real sweep, interrupted and restored ------------------------------------------

_interrupted: list[str] = []  # module state, so the pickled callback fires once per process


class InterruptAfterFirstTrial(tune.Callback):
    """Ctrl-C-like stop (SIGUSR1, Tune's graceful-interrupt signal) once the first trial has
    finished, while no other trial runs (max_concurrent_trials=1)."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not _interrupted:
            _interrupted.append(trial.trial_id)
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture(scope="module")
def tiny_sweep(ray_local, tmp_path_factory):
    import time

    tmp = tmp_path_factory.mktemp("sweep")
    path = write_sweep(tmp, f"""
base: {CONFIGS / 'tiny.yaml'}
overrides: [run.root={tmp / 'base'}, data.synthfaces.num_samples=120,
            data.synthfaces.num_identities=30, train.epochs=2, train.cpus_per_worker=0.5,
            train.batch_size=20]   # 97 train rows (87, 78 after removal): no batch of 1
params:
  influence.tau: {{grid: [0.1, 0.2]}}
objective_stage: removal
scheduler: {{kind: asha, grace_period: 2}}   # no rung before the end: both trials finish
epochs_per_report: 1
trial_cpus: 0.5
""", name="tiny_tau.yaml")
    started = time.perf_counter()
    first = run_sweep(load_sweep(path), callbacks=[InterruptAfterFirstTrial()])
    plan = load_sweep(path)
    finished = plan.trials.child(_interrupted[0], "stages", "removal.json").read_json()
    second = run_sweep(plan)
    print(f"tiny sweep wall time (interrupted + restored): {time.perf_counter() - started:.0f} s")
    return plan, tmp, first, finished, second


@pytest.mark.timeout(1800)  # the fixture's sweep runs here; slow on a loaded 2-core box
def test_interrupted_sweep_reports_it(tiny_sweep):
    _, _, first, _, _ = tiny_sweep
    assert first["interrupted"] and first["done"] == 1


def test_restore_finishes_the_rest_without_rerunning_finished_trials(tiny_sweep, ray_local):
    plan, _, _, finished, second = tiny_sweep
    assert not second["interrupted"] and second["done"] == 2 and second["error"] == 0
    again = plan.trials.child(_interrupted[0], "stages", "removal.json").read_json()
    assert again["finished_at"] == finished["finished_at"]
    progress = pd.read_csv(Path(plan.experiment.path) / _interrupted[0] / "progress.csv")
    assert progress["epoch"].tolist() == [1, 2]  # one report per chunk, none repeated
    # every Train placement group was released (RAY_NOTES 3.2)
    groups = ray_local.util.placement_group_table().values()
    assert all(g["state"] == "REMOVED" for g in groups)


def test_baseline_trained_once_and_trials_train_the_objective(tiny_sweep):
    plan, tmp, _, _, _ = tiny_sweep
    assert sorted(p.name for p in (tmp / "base" / "checkpoints").glob("epoch_*")) == \
        ["epoch_0001", "epoch_0002"]
    trials = sorted((tmp / "base" / "sweeps" / "tiny_tau" / "trials").iterdir())
    assert len(trials) == 2
    for trial in trials:
        assert not (trial / "checkpoints").exists()  # the baseline is read from the base
        assert not (trial / "manifest_noisy").exists()
        assert (trial / "influence" / "influence.parquet").exists()  # tau is a trial's own
        assert sorted(p.name for p in (trial / "removal" / "checkpoints").glob("epoch_*")) == \
            ["epoch_0001", "epoch_0002"]  # two chunks, the second resumed the first
        assert json.loads((trial / "stages" / "removal.json").read_text())["status"] == "done"
        assert not (trial / "stages" / "train.json").exists()


def test_results_best_and_plots(tiny_sweep):
    plan, _, _, _, second = tiny_sweep
    root = Path(plan.root.path)
    results = pd.read_csv(root / "results.csv")
    assert sorted(results["influence.tau"]) == [0.1, 0.2]
    assert (results["status"] == "done").all()
    assert results["val_accuracy"].between(0, 100).all()
    assert results["test_accuracy"].between(0, 100).all()
    assert (results["epochs"] == 2).all()
    best = json.loads((root / "best.json").read_text())
    assert best == second["best"]
    assert best["value"] == results["val_accuracy"].max()
    assert f"influence.tau={best['params']['influence.tau']}" in best["reproduce"]
    assert (root / "objective_vs_influence.tau.png").read_bytes()[:4] == b"\x89PNG"

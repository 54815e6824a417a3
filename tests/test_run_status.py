"""`diffinf status`: what each stage recorded under a run root, and which stages a config would
re-run and why. The run roots are made by the real writers (RunRoot.mark_started / mark_done /
mark_failed, and the config.yaml that run_pipeline writes): no Ray, no training."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffinf_ray import cli
from diffinf_ray.config import dump_config, load_config
from diffinf_ray.run_root import RunRoot
from diffinf_ray.run_status import rerun_plan, stage_statuses, status_command
from diffinf_ray.stage_registry import STAGES, fingerprint

TINY = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml")
WANTED = ["ingest", "noise", "train", "evaluate"]  # tiny.yaml's stages


def finish(root: RunRoot, cfg, stages, seconds: float = 12.5) -> None:
    """Record `stages` done with `cfg`'s fingerprints, each on its upstream's current attempt
    (what run_stage records), and write the run's config.yaml as run_pipeline does."""
    from diffinf_ray.pipeline import upstream_attempts

    root.child("config.yaml").write_bytes(dump_config(cfg).encode())
    for stage in stages:
        root.mark_started(stage, fingerprint(cfg, stage))
        root.mark_done(stage, fingerprint(cfg, stage), {"rows": 1}, seconds,
                       upstream_attempts(root, stage, cfg))


@pytest.fixture
def run(tmp_path):
    cfg = load_config(TINY, [f"run.root={tmp_path / 'run'}"])
    root = RunRoot(cfg.run.root)
    finish(root, cfg, WANTED)
    return cfg, root


def plan_of(root, cfg) -> dict[str, tuple[str, str]]:
    return {p.stage: (p.action, p.reason) for p in rerun_plan(root, cfg)}


def test_statuses_say_done_failed_running_and_not_run(run):
    cfg, root = run
    root.mark_failed("evaluate", fingerprint(cfg, "evaluate"), "ValueError: no test rows")
    root.mark_started("influence", fingerprint(cfg, "influence"))
    got = {s.stage: s for s in stage_statuses(root)}
    assert list(got) == list(STAGES)
    assert got["train"].status == "done"
    assert got["train"].fingerprint == fingerprint(cfg, "train")
    assert got["train"].wall_seconds == 12.5 and got["train"].when
    assert got["evaluate"].status == "failed"
    assert got["evaluate"].error == "ValueError: no test rows" and got["evaluate"].when
    assert got["influence"].status == "running" and got["influence"].when is None
    assert got["report"].status == "not run" and got["report"].fingerprint is None


def test_the_same_config_reruns_nothing(run):
    cfg, root = run
    plan = plan_of(root, cfg)
    assert {s: a for s, (a, _) in plan.items() if s in WANTED} == dict.fromkeys(WANTED, "skip")
    assert plan["influence"][0] == "-"


def test_a_changed_setting_names_the_key_and_reruns_what_depends_on_it(run):
    cfg, root = run
    changed = load_config(TINY, [f"run.root={root}", "train.epochs=3"])
    plan = plan_of(root, changed)
    assert plan["ingest"][0] == plan["noise"][0] == "skip"
    for stage in ("train", "evaluate"):
        action, reason = plan[stage]
        assert action == "run"
        assert "train.epochs 2 -> 3" in reason
        assert fingerprint(cfg, stage) in reason and fingerprint(changed, stage) in reason


def test_a_failed_or_missing_upstream_reruns_its_dependents(run):
    cfg, root = run
    root.mark_failed("noise", fingerprint(cfg, "noise"), "OSError: disk full")
    plan = plan_of(root, cfg)
    assert plan["noise"] == ("run", "failed last time (OSError: disk full); runs again")
    assert plan["train"] == ("run", "upstream noise re-runs")
    assert plan["evaluate"] == ("run", "upstream train re-runs")
    root.child("stages", "noise.json").delete()
    assert plan_of(root, cfg)["noise"] == ("run", "not run yet")


def test_outputs_rebuilt_since_rerun_the_stage_built_on_them(run):
    cfg, root = run
    finish(root, cfg, ["train"])  # train completed again: a new attempt evaluate did not read
    plan = plan_of(root, cfg)
    assert plan["train"][0] == "skip"
    assert plan["evaluate"] == ("run", "built on outputs of train that were rebuilt since")


def test_a_stage_whose_input_is_neither_done_nor_configured_is_blocked(tmp_path):
    cfg = load_config(TINY, [f"run.root={tmp_path}", "stages=[train]"])
    root = RunRoot(cfg.run.root)
    finish(root, cfg, ["ingest"])
    assert plan_of(root, cfg)["train"][0] == "blocked"


def test_the_command_prints_the_table_and_the_plan(run, capsys):
    cfg, root = run
    assert cli.main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"run root: {root}" in out
    [train] = [line for line in out.splitlines() if line.startswith("train ")]
    assert "done" in train and fingerprint(cfg, "train") in train and "12.5 s" in train
    assert "would" not in out  # no config, no plan
    assert cli.main(["status", str(root), TINY, "noise.rate=0.3"]) == 0
    out = capsys.readouterr().out
    assert "run     noise" in out and "noise.rate 0.2 -> 0.3" in out


def test_bad_invocations_are_one_clear_line(tmp_path, capsys):
    assert cli.main(["status", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["status", str(tmp_path), "train.epochs=3"]) == 2
    assert "need a config" in capsys.readouterr().err


def test_status_of_an_s3_run_root(s3_endpoint, tmp_path):
    uri = s3_endpoint.bucket("status-runs").replace("s3://status-runs",
                                                      "s3://status-runs/run1")
    cfg = load_config(TINY, [f"run.root={uri}"])
    root = RunRoot(uri)
    finish(root, cfg, ["ingest", "noise"])
    root.mark_failed("train", fingerprint(cfg, "train"), "RuntimeError: worker lost")
    text = status_command(uri, TINY, [])
    assert "run root: s3://status-runs/run1" in text
    assert "endpoint" not in text  # the URI's query (endpoint) is not printed
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "done" in lines["noise"] and "failed" in lines["train"]
    assert "error: RuntimeError: worker lost" in text
    assert "run     train        failed last time" in text

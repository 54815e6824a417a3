"""The pipeline's lifecycle on stand-in stage bodies: outcomes, failures, re-runs and the view of
the config each stage gets (the real stages run through it in the Ray pipeline tests)."""

import contextlib

import pytest

from diffinf_ray import pipeline
from diffinf_ray.config import load_config
from diffinf_ray.pipeline import run_pipeline
from diffinf_ray.stage_registry import UndeclaredSettingError

WANTED = ["ingest", "noise", "train", "evaluate", "influence", "removal", "judges", "report"]


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setattr("diffinf_ray.ray_session.ray_session", lambda cfg: contextlib.nullcontext())
    return load_config("jobs/configs/tiny.yaml", [f"run.root={tmp_path / 'run'}"])


def recording_bodies(calls: list, fail: str | None = None):
    def body_for(stage):
        def body(cfg, root):
            calls.append(stage)
            if stage == fail:
                raise RuntimeError(f"{stage} broke")
            root.child(stage if stage != "ingest" else "manifest", "out.txt").write_bytes(b"x")
            return {"stage": stage}
        return body
    return {s: body_for(s) for s in WANTED}


def test_outcomes_say_what_ran_and_what_was_skipped(cfg):
    calls: list = []
    first = run_pipeline(cfg, stages=WANTED, bodies=recording_bodies(calls))
    assert first.with_status("ran") == WANTED and calls == WANTED
    assert first["train"] == {"stage": "train"}

    calls.clear()
    again = run_pipeline(cfg, stages=WANTED, bodies=recording_bodies(calls))
    assert again.with_status("skipped") == WANTED and calls == []
    assert again["removal"] == {"stage": "removal"}  # the recorded summary

    calls.clear()
    changed = cfg.model_copy(deep=True)
    changed.influence.tau = 0.3  # influence, removal (reads it) and the report re-run
    third = run_pipeline(changed, stages=WANTED, bodies=recording_bodies(calls))
    assert calls == ["influence", "removal", "report"]
    assert third.with_status("skipped") == ["ingest", "noise", "train", "evaluate", "judges"]


def test_a_failed_stage_blocks_only_what_reads_it(cfg):
    calls: list = []
    with pytest.raises(RuntimeError, match="train broke"):
        run_pipeline(cfg, stages=WANTED, bodies=recording_bodies(calls, fail="train"))
    assert calls == ["ingest", "noise", "train"]

    calls.clear()
    run = run_pipeline(cfg, stages=WANTED, bodies=recording_bodies(calls, fail="train"),
                       keep_going=True)
    assert run.outcomes["train"].status == "failed"
    assert str(run.failed["train"]) == "train broke"
    assert run.with_status("blocked") == ["evaluate", "influence", "removal"]
    assert str(run.outcomes["removal"].error) == "needs train"
    # judges read no other stage; the report shows whatever exists
    assert calls == ["train", "judges", "report"]
    assert "train" not in run and run["judges"] == {"stage": "judges"}
    root = pipeline.open_run_root(cfg)
    assert root.stage_record("train")["status"] == "failed"  # not done: a rerun runs it


def test_a_stage_sees_only_its_declared_settings(cfg):
    def nosy_noise(stage_cfg, root):
        return {"epochs": stage_cfg.train.epochs}  # noise does not read the train section

    with pytest.raises(UndeclaredSettingError, match="stage noise read the setting 'train'"):
        run_pipeline(cfg, stages=["ingest", "noise"],
                     bodies={"ingest": lambda c, r: {}, "noise": nosy_noise})


def test_force_reruns_every_wanted_stage(cfg):
    calls: list = []
    run_pipeline(cfg, stages=WANTED, bodies=recording_bodies(calls))
    calls.clear()
    forced = run_pipeline(cfg, stages=WANTED, bodies=recording_bodies(calls), force=True)
    assert calls == WANTED and forced.with_status("ran") == WANTED


def test_stages_built_on_rebuilt_outputs_run_again(cfg):
    """--force on a few stages rebuilds their outputs: the next run re-runs what read them,
    though no setting changed."""
    calls: list = []
    run_pipeline(cfg, stages=WANTED, bodies=recording_bodies(calls))
    run_pipeline(cfg, stages=["ingest", "noise"], bodies=recording_bodies(calls), force=True)
    calls.clear()
    again = run_pipeline(cfg, stages=WANTED, bodies=recording_bodies(calls))
    assert calls == ["train", "evaluate", "influence", "removal", "report"]
    assert again.with_status("skipped") == ["ingest", "noise", "judges"]
    root = pipeline.open_run_root(cfg)
    assert root.stage_record("train")["inputs"] == {"noise": root.stage_record("noise")["attempt"]}


def test_a_failed_stage_records_its_error(cfg):
    with pytest.raises(RuntimeError):
        run_pipeline(cfg, stages=WANTED, bodies=recording_bodies([], fail="noise"))
    record = pipeline.open_run_root(cfg).stage_record("noise")
    assert record["status"] == "failed" and record["error"] == "RuntimeError: noise broke"
    calls: list = []
    run_pipeline(cfg, stages=WANTED, bodies=recording_bodies(calls))
    assert calls == WANTED[1:]  # ingest was done; noise resumes, the rest follows


def test_a_stage_whose_inputs_are_missing_names_the_stages_to_run(cfg):
    calls: list = []
    with pytest.raises(RuntimeError, match=r"stage removal reads outputs that are not there: "
                                           r"stage ingest, stage noise, stage train, "
                                           r"stage influence has not finished"):
        run_pipeline(cfg, stages=["removal"], bodies=recording_bodies(calls))
    assert calls == []
    run_pipeline(cfg, stages=["report"], bodies=recording_bodies(calls))  # shows what exists
    assert calls == ["report"]

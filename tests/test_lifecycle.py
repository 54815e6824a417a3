"""The stage lifecycle end to end on a real local Ray, through the `diffinf` command in-process:
what re-runs after a changed setting, `--force`, `diffinf stage`, a failed stage, and whether
the removal baseline really trained without the flagged rows.

Everything is judged from outside: the stage records under the run root
(`RunRoot.stage_record`: fingerprint, status, finished_at, wall_seconds, attempt), the files
there, the command's exit code and message. One small run is made once per module; each test
works on its own copy of that run root.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffinf_ray import cli
from diffinf_ray.run_root import RunRoot

TINY = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml")
STAGES = ["ingest", "noise", "train", "evaluate", "influence", "removal"]
# 80 images at 32 px (tiny.yaml), 1 epoch: ~56 training rows, tau 0.1 flags ~6 of them
SMALL = ["data.synthfaces.num_samples=80", "data.synthfaces.num_identities=20", "train.epochs=1"]
# Where each stage writes under the run root (run_root.py's layout).
OUTPUT_FOLDER = {"evaluate": "evaluation", "influence": "influence", "removal": "removal"}
SENTINEL = "stale-output.txt"


def overrides(root: Path, stages: list[str] = STAGES, *extra: str) -> list[str]:
    return [f"run.root={root}", f"stages=[{','.join(stages)}]", *SMALL, *extra]


def diffinf(capsys, *argv: str) -> tuple[int, str]:
    """`diffinf ARGV` in this process (so monkeypatches apply); (exit code, stderr)."""
    code = cli.main(["-q", *argv])
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The command's one error line (Ray's worker logs may come before or after it)."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def records(root: Path) -> dict[str, dict | None]:
    run_root = RunRoot(str(root))
    return {stage: run_root.stage_record(stage) for stage in STAGES}


def reran(before: dict, after: dict) -> set[str]:
    """Stages whose record is a new completion (a new attempt) since `before`."""
    return {s for s in STAGES if after[s] and after[s].get("status") == "done"
            and (before[s] or {}).get("attempt") != after[s].get("attempt")}


class TrainingSetSpy:
    """Records every classifier fit, keyed by its checkpoints folder relative to the run root:
    the ids left out of the train split it was given, and the number of rows handed to it.

    Wraps `split_dataset` (the one reader of a manifest split for training) and `fit_on_ray`
    (the one Ray entry of a classifier fit) of diffinf_ray.models.training. Counting rows runs
    the fit's own train dataset once more (one Ray Data job).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path):
        import diffinf_ray.models.training as train_module

        self.root = root
        self.fits: dict[str, dict] = {}
        self._excluded: set[str] | None = None
        self._relabel: dict[str, int] | None = None
        self._real_split = train_module.split_dataset
        self._real_fit = train_module.fit_on_ray
        monkeypatch.setattr(train_module, "split_dataset", self._split)
        monkeypatch.setattr(train_module, "fit_on_ray", self._fit)

    def _split(self, manifest, split, columns, exclude_ids=None, fold=None, relabel=None):
        if split == "train":
            self._excluded = {str(i) for i in exclude_ids or ()}
            self._relabel = dict(relabel or {})
        return self._real_split(manifest, split, columns, exclude_ids, fold, relabel=relabel)

    def _fit(self, train_loop, loop_config, datasets, cfg, checkpoints):
        folder = str(Path(checkpoints.path).relative_to(self.root))
        self.fits[folder] = {"excluded": self._excluded, "relabel": self._relabel,
                             "rows": datasets["train"].count(), "tag": loop_config["tag"]}
        return self._real_fit(train_loop, loop_config, datasets, cfg, checkpoints)


@pytest.fixture(scope="module")
def finished_run(ray_local, tmp_path_factory):
    """The six stages run once by `diffinf run`, with the training sets recorded."""
    root = tmp_path_factory.mktemp("lifecycle") / "run"
    with pytest.MonkeyPatch.context() as mp:
        spy = TrainingSetSpy(mp, root)
        code = cli.main(["-q", "run", TINY, *overrides(root)])
    assert code == 0
    assert all(r["status"] == "done" for r in records(root).values())
    yield root, spy.fits
    shutil.rmtree(root, ignore_errors=True)  # hundreds of MB of checkpoints: the CI disk is small


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A private copy of the finished run root (the tests change it)."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run[0], copy)
    return copy


def put_sentinels(root: Path) -> None:
    for folder in OUTPUT_FOLDER.values():
        (root / folder / SENTINEL).write_text("left by an earlier run")


def sentinels_left(root: Path) -> set[str]:
    return {s for s, folder in OUTPUT_FOLDER.items() if (root / folder / SENTINEL).exists()}


def test_changed_setting_reruns_exactly_the_dependent_stages(run_copy, capsys):
    """influence.tau is hashed by influence alone; removal reads influence's flagged set."""
    expected = {"influence", "removal"}
    before = records(run_copy)
    put_sentinels(run_copy)
    checkpoints = {p: p.read_bytes() for p in (run_copy / "checkpoints").rglob("checkpoint.pt")}

    code, err = diffinf(capsys, "run", TINY, *overrides(run_copy, STAGES, "influence.tau=0.2"))
    assert code == 0, err

    after = records(run_copy)
    assert reran(before, after) == expected
    for stage in STAGES:
        if stage in expected:
            assert after[stage]["fingerprint"] != before[stage]["fingerprint"], stage
        else:
            assert after[stage] == before[stage], f"{stage} was not skipped"
    # the re-run stages' old files were cleared first; the skipped stages' files are untouched
    assert sentinels_left(run_copy) == set(OUTPUT_FOLDER) - expected
    assert {p: p.read_bytes() for p in checkpoints} == checkpoints
    flagged = pq.read_table(run_copy / "influence" / "influence.parquet").column("is_high")
    assert sum(flagged.to_pylist()) == round(0.2 * len(flagged))
    removal = json.loads((run_copy / "removal" / "evaluation" / "metrics.json").read_text())
    assert removal["removed_rows"] == round(0.2 * len(flagged))


def test_flag_by_oracle_flags_only_corrupted_rows(run_copy, capsys):
    """influence.flag_by=oracle (the factorial's control detector) re-runs the influence stage
    alone (its scores are the same; only the flagged set's ranking changes) and flags truly
    corrupted rows only, at the same budget; its summary names the detector."""
    from diffinf_ray.influence.detection import fraction_count

    wanted = STAGES[:5]
    before = records(run_copy)
    code, err = diffinf(capsys, "run", TINY,
                        *overrides(run_copy, wanted, "influence.flag_by=oracle"))
    assert code == 0, err
    after = records(run_copy)
    assert reran(before, after) == {"influence"}
    table = pq.read_table(run_copy / "influence" / "influence.parquet").to_pandas()
    flagged = table[table.is_high]
    assert len(flagged) == fraction_count(0.1, len(table)) and flagged.is_corrupted.all()
    assert table.is_corrupted.sum() > len(flagged)  # a real choice: more corrupted than budget
    assert after["influence"]["summary"]["flag_by"] == "oracle"


def flag_by_another_stage(capsys, run_copy: Path, detector: str, *extra: str) -> dict:
    """`diffinf run` of ingest..evaluate, the detector's own stage and influence with
    influence.flag_by=detector; only influence re-runs among STAGES. The records after it."""
    wanted = [*STAGES[:4], detector, "influence"]
    before = records(run_copy)
    code, err = diffinf(capsys, "run", TINY, *overrides(run_copy, wanted, *extra,
                                                       f"influence.flag_by={detector}"))
    assert code == 0, err
    after = records(run_copy)
    assert reran(before, after) == {"influence"}
    return after


def test_flag_by_cleanlab_runs_cleanlab_first_and_flags_its_least_confident_rows(
        finished_run, run_copy, capsys):
    """influence.flag_by=cleanlab (the factorial's best other detector): the cleanlab stage runs
    before the influence stage, which keeps its TracIn scores but flags the top tau by lowest
    out-of-sample self-confidence; train, evaluate and the rest upstream are not re-run."""
    from diffinf_ray.influence.detection import fraction_count

    after = flag_by_another_stage(capsys, run_copy, "cleanlab", "cleanlab.folds=2")
    cleanlab_done = RunRoot(str(run_copy)).stage_record("cleanlab")["finished_at"]
    assert cleanlab_done <= after["influence"]["finished_at"]
    table = pq.read_table(run_copy / "influence" / "influence.parquet").to_pandas()
    issues = pq.read_table(run_copy / "cleanlab" / "label_issues.parquet").to_pandas()
    least_confident = issues.sort_values("self_confidence").sample_id[
        :fraction_count(0.1, len(issues))]
    assert set(table.sample_id[table.is_high]) == set(least_confident)
    tracin = pq.read_table(finished_run[0] / "influence" / "influence.parquet").to_pandas()
    assert np.allclose(table.set_index("sample_id").score.sort_index(),
                       tracin.set_index("sample_id").score.sort_index(), rtol=1e-5)
    assert after["influence"]["summary"]["flag_by"] == "cleanlab"


def test_flag_by_ekfac_runs_the_ekfac_stage_first_and_flags_its_top_rows(
        finished_run, run_copy, capsys):
    """influence.flag_by=ekfac: the ekfac stage (one Ray task; only the output head tracked, to
    stay quick) runs before the influence stage, which flags the top tau by EK-FAC
    self-influence; the stage's scores are the core's on the same rows under the last
    checkpoint (computed here in-process), and ekfac/detection.json reports them."""
    from diffinf_ray.datasets import read_split
    from diffinf_ray.influence.detection import fraction_count
    from diffinf_ray.influence.ekfac import EncodedImages, self_influence
    from diffinf_ray.models.checkpoint import load_all
    from diffinf_ray.storage import Location

    after = flag_by_another_stage(capsys, run_copy, "ekfac", "ekfac.layers=[head]")
    ekfac_record = RunRoot(str(run_copy)).stage_record("ekfac")
    assert ekfac_record["status"] == "done"
    assert ekfac_record["finished_at"] <= after["influence"]["finished_at"]
    assert ekfac_record["summary"]["epochs"] == [1]
    table = pq.read_table(run_copy / "influence" / "influence.parquet").to_pandas()
    scores = pq.read_table(run_copy / "ekfac" / "ekfac.parquet").to_pandas()
    assert sorted(scores.sample_id) == sorted(table.sample_id)
    top = scores.sort_values("score", ascending=False).sample_id[:fraction_count(0.1, len(scores))]
    assert set(table.sample_id[table.is_high]) == set(top)
    assert after["influence"]["summary"]["flag_by"] == "ekfac"
    detection = json.loads((run_copy / "ekfac" / "detection.json").read_text())
    assert detection["ekfac"]["n"] == len(scores) and 0 <= detection["ekfac"]["auroc"] <= 1
    rows = read_split(Location(str(run_copy / "manifest_noisy")), "train", ["image", "label"])
    model = load_all(Location(str(run_copy / "checkpoints")))[-1].build_model()
    want = self_influence(model, EncodedImages(rows["image"].tolist(), rows["label"].to_numpy()),
                          layers=["head"], seed=0)
    got = scores.set_index("sample_id").score.reindex(rows.sample_id).to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_relabel_trains_with_the_flagged_corrupted_rows_clean_labels(run_copy, capsys,
                                                                      monkeypatch):
    """The oracle relabel (a control): the fit sees every train row, with exactly the flagged
    rows whose label is wrong given their clean label; relabelled.parquet lists the flagged set.
    flag_by=oracle, so the flagged set is all corrupted and the relabel is never empty."""
    spy = TrainingSetSpy(monkeypatch, run_copy)
    code, err = diffinf(capsys, "run", TINY, *overrides(run_copy, [*STAGES[:5], "relabel"],
                                                       "influence.flag_by=oracle"))
    assert code == 0, err
    table = pq.read_table(run_copy / "influence" / "influence.parquet").to_pandas()
    flagged = set(table.sample_id[table.is_high])
    assert table.is_corrupted.sum() > len(flagged) > 0  # corrupted rows left unflagged
    relabelled = pq.read_table(run_copy / "relabel" / "relabelled.parquet").to_pandas()
    assert set(relabelled.sample_id) == flagged and relabelled.is_corrupted.all()
    assert (relabelled.label != relabelled.label_clean).all()
    fit = spy.fits["relabel/checkpoints"]
    assert fit["tag"] == "relabel"  # its console lines read "[relabel] epoch ..."
    assert fit["relabel"] == dict(zip(relabelled.sample_id, relabelled.label_clean.tolist(),
                                      strict=True))
    assert fit["excluded"] == set() and fit["rows"] == len(table)
    metrics = json.loads((run_copy / "relabel" / "evaluation" / "metrics.json").read_text())
    assert metrics["relabelled_rows"] == metrics["flagged_rows"] == len(flagged)


def test_force_reruns_every_wanted_stage_and_no_other(run_copy, capsys):
    wanted = ["ingest", "noise"]
    before = records(run_copy)
    code, err = diffinf(capsys, "run", TINY, *overrides(run_copy, wanted), "--force")
    assert code == 0, err
    after = records(run_copy)
    assert reran(before, after) == set(wanted)
    for stage in STAGES:  # same settings, so the same fingerprints; only the attempts are new
        assert after[stage]["fingerprint"] == before[stage]["fingerprint"]
        if stage not in wanted:
            assert after[stage] == before[stage]


def test_stage_command_runs_that_stage_only(run_copy, capsys):
    before = records(run_copy)
    code, err = diffinf(capsys, "stage", "noise", TINY, *overrides(run_copy))
    assert code == 0, err
    assert records(run_copy) == before  # done with these settings: skipped

    code, err = diffinf(capsys, "stage", "noise", TINY, *overrides(run_copy), "--force")
    assert code == 0, err
    forced = records(run_copy)
    assert reran(before, forced) == {"noise"}

    # A setting every later stage hashes too: `stage` still runs noise alone (the others are
    # left as they were, for the next `diffinf run` to rebuild).
    code, err = diffinf(capsys, "stage", "noise", TINY, *overrides(run_copy), "noise.rate=0.3")
    assert code == 0, err
    changed = records(run_copy)
    assert reran(forced, changed) == {"noise"}
    assert changed["noise"]["fingerprint"] != forced["noise"]["fingerprint"]
    assert {s: changed[s] for s in STAGES if s != "noise"} == \
        {s: before[s] for s in STAGES if s != "noise"}


@pytest.mark.parametrize(("stage", "missing"), [
    ("evaluate", "train"),
    ("influence", "noise"),
    ("removal", "influence"),
])
def test_stage_without_upstream_outputs_is_a_clear_error(ray_local, tmp_path, capsys, stage,
                                                          missing):
    root = tmp_path / "empty"
    code, err = diffinf(capsys, "stage", stage, TINY, *overrides(root))
    assert code == 2
    message = error_line(err)
    assert "Traceback" not in err
    # names the stage to run, not only a folder of it (".../influence/influence.parquet")
    assert re.search(rf"\b{missing} stage\b|\bstage '?{missing}\b", message), message
    assert (RunRoot(str(root)).stage_record(stage) or {}).get("status") != "done"


def test_removal_retrained_without_exactly_the_flagged_rows(finished_run):
    root, fits = finished_run
    influence = pq.read_table(root / "influence" / "influence.parquet").to_pandas()
    flagged = set(influence.sample_id[influence.is_high].astype(str))
    noisy = pq.read_table(root / "manifest_noisy", columns=["sample_id", "split"]).to_pandas()
    train_ids = set(noisy.sample_id[noisy.split == "train"].astype(str))
    assert flagged and flagged < train_ids

    assert set(fits) == {"checkpoints", "removal/checkpoints"}
    baseline, removal = fits["checkpoints"], fits["removal/checkpoints"]
    assert baseline == {"excluded": set(), "relabel": {}, "rows": len(train_ids), "tag": "train"}
    # the retrain's data set left out the flagged rows, and only those
    assert removal == {"excluded": flagged, "relabel": {}, "rows": len(train_ids) - len(flagged),
                       "tag": "removal"}
    metrics = json.loads((root / "removal" / "evaluation" / "metrics.json").read_text())
    assert metrics["removed_rows"] == len(flagged)


def test_failed_stage_is_not_done_and_the_next_run_runs_it(run_copy, capsys, monkeypatch):
    import diffinf_ray.stages.noise as noise_module

    def broken(*args, **kwargs):
        raise RuntimeError("injected noise failure")

    wanted = ["ingest", "noise"]
    before = records(run_copy)
    monkeypatch.setattr(noise_module, "inject_label_noise", broken)
    code, err = diffinf(capsys, "stage", "noise", TINY, *overrides(run_copy), "--force")
    assert code == 2
    assert error_line(err) == "error: RuntimeError: injected noise failure"
    failed = records(run_copy)
    assert failed["noise"]["status"] != "done"
    assert {s: failed[s] for s in STAGES if s != "noise"} == \
        {s: before[s] for s in STAGES if s != "noise"}

    monkeypatch.undo()
    # The same settings as the finished record had: only the failure makes the stage run again.
    code, err = diffinf(capsys, "run", TINY, *overrides(run_copy, wanted))
    assert code == 0, err
    after = records(run_copy)
    assert reran(failed, after) == {"noise"}
    assert after["noise"]["fingerprint"] == before["noise"]["fingerprint"]
    assert after["ingest"] == before["ingest"]
    assert pq.read_table(run_copy / "manifest_noisy").num_rows == \
        pq.read_table(run_copy / "manifest").num_rows

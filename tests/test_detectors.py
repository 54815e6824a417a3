"""Detector plug-ins: each reads its score from its stage's table; the report they share."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from diffinf_ray.detectors import (
    DETECTORS,
    detection_reports,
    detection_stages,
    detectors_of,
    read_detection,
)
from diffinf_ray.influence.detection import detection_report
from diffinf_ray.run_root import RunRoot


def _run_root(tmp_path, truth):
    rng = np.random.default_rng(0)
    n = len(truth)
    ids = [f"s{i:03d}" for i in range(n)][::-1]  # stored out of order: detectors sort by id
    labels = rng.integers(0, 3, n)
    root = RunRoot(str(tmp_path))
    influence = {"sample_id": ids, "label": labels, "is_corrupted": truth,
                 "score": rng.random(n), "score_last": rng.random(n),
                 "score_early": rng.random(n), "aum": rng.normal(size=n),
                 "loss_last": rng.random(n)}
    root.child("influence", "influence.parquet").write_table(pa.table(influence))
    cleanlab = {"sample_id": ids, "label": labels, "is_corrupted": truth,
                "self_confidence": rng.random(n)}
    root.child("cleanlab", "label_issues.parquet").write_table(pa.table(cleanlab))
    return root, influence, cleanlab


def test_the_detectors_are_registered_where_their_scores_live():
    assert list(DETECTORS) == ["tracin", "tracin_last", "tracin_early", "loss", "aum",
                               "cleanlab", "ekfac", "oracle"]
    assert [d.name for d in detectors_of("influence")] == ["tracin", "tracin_last",
                                                           "tracin_early", "loss", "aum", "oracle"]
    assert detection_stages() == ["influence", "cleanlab", "ekfac"]
    assert [d.name for d in detectors_of("ekfac")] == ["ekfac"]


def test_the_oracle_detector_is_the_injected_corruption(tmp_path):
    truth = [bool(i % 3 == 0) for i in range(30)]  # 10 corrupted
    root, influence, _ = _run_root(tmp_path, truth)
    report = detection_reports(root, "influence", tau=0.2, per_class=False)["oracle"]
    assert report["auroc"] == 1.0
    assert report["n_flagged"] == 6 and report["precision"] == 1.0 and report["recall"] == 0.6


def test_flag_by_picks_the_ranking_of_the_flagged_set():
    from diffinf_ray.stages.influence import flagging_scores

    df = pd.DataFrame({"score": [0.9, 0.1, 0.5], "loss_last": [0.1, 0.8, 0.2],
                       "is_corrupted": [False, True, None]})
    assert flagging_scores(df, "tracin").tolist() == [0.9, 0.1, 0.5]
    assert flagging_scores(df, "loss").tolist() == [0.1, 0.8, 0.2]
    with pytest.raises(ValueError, match="flag_by=oracle: 1 training rows have no is_corrupted"):
        flagging_scores(df, "oracle")
    assert flagging_scores(df.iloc[:2], "oracle").tolist() == [0.0, 1.0]


def test_flag_by_cleanlab_ranks_by_the_cleanlab_stage_table(tmp_path):
    """The flagged set by cleanlab: low out-of-sample self-confidence first, matched to the
    influence table's rows by sample_id whatever order either table is in; a training row the
    cleanlab table lacks is an error, not a silently unflagged row."""
    from diffinf_ray.detectors import flagging_detector
    from diffinf_ray.detectors.base import Detector
    from diffinf_ray.stages.influence import flagging_scores

    truth = [bool(i % 3 == 0) for i in range(12)]
    root, _, cleanlab = _run_root(tmp_path, truth)
    confidence = dict(zip(cleanlab["sample_id"], cleanlab["self_confidence"], strict=True))
    ids = sorted(confidence)
    df = pd.DataFrame({"sample_id": ids, "score": np.zeros(12), "is_corrupted": truth})
    assert flagging_scores(df, "cleanlab", root).tolist() == [-confidence[i] for i in ids]
    with pytest.raises(ValueError, match="flag_by=cleanlab: 1 training rows have no score in "
                                         "cleanlab/label_issues.parquet"):
        flagging_scores(pd.concat([df, df.iloc[:1].assign(sample_id="s999")]), "cleanlab", root)
    # the ekfac stage's table the same way: high second-order self-influence first
    ekfac = {"sample_id": list(confidence)[::-1], "label": np.zeros(12, np.int32),
             "is_corrupted": truth[::-1], "score": np.arange(12.0)}
    root.child("ekfac", "ekfac.parquet").write_table(pa.table(ekfac))
    by_id = dict(zip(ekfac["sample_id"], ekfac["score"], strict=True))
    assert flagging_scores(df, "ekfac", root).tolist() == [by_id[i] for i in ids]
    # a detector of a stage the influence stage never reads cannot rank its flagged set
    import diffinf_ray.detectors as registered

    registered.DETECTORS["per_epoch"] = Detector("per_epoch", "train", "m.parquet", "m", "m")
    try:
        with pytest.raises(ValueError, match="'per_epoch' is not one of"):
            flagging_detector("per_epoch")
    finally:
        del registered.DETECTORS["per_epoch"]


def test_flag_by_is_checked_on_load():
    from diffinf_ray.config import InfluenceSection

    assert InfluenceSection(flag_by="oracle").flag_by == "oracle"
    with pytest.raises(ValueError, match="'tracn' is not one of"):
        InfluenceSection(flag_by="tracn")


def test_reports_equal_the_detection_core_on_each_score(tmp_path):
    truth = [bool(i % 4 == 0) for i in range(40)]
    root, influence, cleanlab = _run_root(tmp_path, truth)
    order = np.argsort(influence["sample_id"])
    y = np.asarray(truth)[order]
    labels = influence["label"][order]
    got = detection_reports(root, "influence", tau=0.1, per_class=False)
    assert got["tracin"] == detection_report(influence["score"][order], y, tau=0.1, labels=labels)
    assert got["loss"] == detection_report(influence["loss_last"][order], y, tau=0.1,
                                           labels=labels)
    for name, column in (("tracin_last", "score_last"), ("tracin_early", "score_early")):
        assert got[name] == detection_report(influence[column][order], y, tau=0.1,
                                             labels=labels)
    # a low margin is suspicious
    assert got["aum"] == detection_report(-influence["aum"][order], y, tau=0.1, labels=labels)
    # low self-confidence is suspicious: the same ranking as 1 - self_confidence
    got = detection_reports(root, "cleanlab", tau=0.2, per_class=True)
    assert got["cleanlab"] == detection_report(1 - cleanlab["self_confidence"][order], y,
                                               tau=0.2, labels=labels, per_class=True)


def test_unknown_truth_is_a_note_not_a_report(tmp_path):
    root, _, _ = _run_root(tmp_path, [False] * 10)
    assert set(detection_reports(root, "influence", 0.1, False)) == {"note"}


def test_read_detection_merges_every_detection_file(tmp_path):
    root, _, _ = _run_root(tmp_path, [i % 3 == 0 for i in range(30)])
    root.child("influence", "detection.json").write_json(
        detection_reports(root, "influence", 0.1, False))
    root.child("cleanlab", "detection.json").write_json(
        {**detection_reports(root, "cleanlab", 0.1, False), "note": "ignored: not a report"})
    assert set(read_detection(root)) == {"tracin", "tracin_last", "tracin_early", "loss", "aum",
                                         "cleanlab", "oracle"}


def test_a_detector_without_scores_in_this_run_is_left_out(tmp_path):
    """tracin_early needs each checkpoint's validation figures: without them its column is NaN
    and the report omits it instead of ranking NaNs."""
    truth = [bool(i % 3 == 0) for i in range(30)]
    root, influence, _ = _run_root(tmp_path, truth)
    influence["score_early"] = np.full(30, np.nan)
    root.child("influence", "influence.parquet").write_table(pa.table(influence))
    assert "tracin_early" not in detection_reports(root, "influence", 0.1, False)
    assert "tracin" in detection_reports(root, "influence", 0.1, False)


def test_scores_before_the_validation_peak(tmp_path):
    from diffinf_ray.models.checkpoint import CHECKPOINT_FILE, checkpoint_dir_name
    from diffinf_ray.stages.influence import scores_before_peak, validation_peak
    from diffinf_ray.storage import Location

    weighted = [[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]]
    assert scores_before_peak(weighted, 1).tolist() == [3.0, 24.0]
    assert scores_before_peak(weighted, 2).tolist() == [7.0, 56.0]
    assert np.isnan(scores_before_peak(weighted, None)).all()
    folder = tmp_path / "checkpoints"
    for epoch, val in ((2, 50.0), (4, 61.0), (6, 61.0), (8, 55.0)):
        (folder / checkpoint_dir_name(epoch)).mkdir(parents=True)
        (folder / checkpoint_dir_name(epoch) / CHECKPOINT_FILE).write_bytes(b"x")
        (folder / checkpoint_dir_name(epoch) / "metrics.json").write_text(
            f'{{"epoch": {epoch}, "val_accuracy": {val}}}')
    assert validation_peak(Location(str(folder))) == 1  # the earliest of a tie
    (folder / checkpoint_dir_name(8) / "metrics.json").unlink()
    assert validation_peak(Location(str(folder))) is None

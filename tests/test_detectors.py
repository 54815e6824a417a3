"""Detector plug-ins: each reads its score from its stage's table; the report they share."""

import numpy as np
import pyarrow as pa

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
                 "score": rng.random(n), "loss_last": rng.random(n)}
    root.child("influence", "influence.parquet").write_table(pa.table(influence))
    cleanlab = {"sample_id": ids, "label": labels, "is_corrupted": truth,
                "self_confidence": rng.random(n)}
    root.child("cleanlab", "label_issues.parquet").write_table(pa.table(cleanlab))
    return root, influence, cleanlab


def test_the_three_detectors_are_registered_where_their_scores_live():
    assert list(DETECTORS) == ["tracin", "loss", "cleanlab"]
    assert [d.name for d in detectors_of("influence")] == ["tracin", "loss"]
    assert detection_stages() == ["influence", "cleanlab"]


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
    assert set(read_detection(root)) == {"tracin", "loss", "cleanlab"}

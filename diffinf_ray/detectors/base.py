"""The detector plug-in point: a per-sample score of how likely a training row's assigned label
is wrong (higher = more suspicious), read from the outputs of the stage that computes it.

A detector is one small module with one `Detector` in it, registered by one line in
`detectors/__init__.py`. Everything downstream (the detection report of its stage, the run
report, the experiment's precision@k curves, the CLI summary) lists whatever is registered.

Detection schema (`<stage>/detection.json`): {detector name: detection_report(...)} with
n, n_corrupted, tau, n_flagged, precision, recall, auroc, precision_at_k {k, precision}
(influence/detection.py), plus whatever a detector adds under its own name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detector:
    """`name`: key in detection.json and in tables; `stage`: the stage (and run-root folder)
    whose `table` holds the score `column` per `sample_id`; `sign`: -1 when a low value of the
    column is suspicious (cleanlab's self-confidence)."""

    name: str
    stage: str
    table: str
    column: str
    description: str
    sign: float = 1.0

    def scores(self, root) -> dict[str, np.ndarray]:
        """{sample_id, label, is_corrupted (None where unknown), score} of every training row,
        sorted by sample_id (plain arrays)."""
        columns = list(dict.fromkeys(["sample_id", "label", "is_corrupted", self.column]))
        table = root.child(self.stage, self.table).read_table(columns=columns)
        order = np.argsort(np.asarray(table.column("sample_id").to_pylist(), dtype=object),
                           kind="stable")
        truth = table.column("is_corrupted").to_pylist()
        return {
            "sample_id": np.asarray(table.column("sample_id").to_pylist(), dtype=object)[order],
            "label": np.asarray(table.column("label").to_pylist(), dtype=np.int64)[order],
            "is_corrupted": np.asarray(truth, dtype=object)[order],
            "score": self.sign * column_scores(table.column(self.column).to_pylist())[order],
        }


def column_scores(values) -> np.ndarray:
    """A score column as float64, a missing value (an unknown `is_corrupted`) as NaN."""
    return np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)

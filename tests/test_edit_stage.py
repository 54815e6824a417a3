"""The edit stage's output rows without Ray: every part typed alike, edits and quarantine
split by the error column."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from diffinf_ray.manifest import QUARANTINE_SCHEMA
from diffinf_ray.stages.edit import (
    EDITS_SCHEMA,
    RESULT_COLUMNS,
    STAGED_SCHEMA,
    _edited_part,
    _quarantine_part,
    typed_rows,
)


def actor_batch(failed: list[bool]) -> dict[str, np.ndarray]:
    """What LatentEditActor returns for rows that were edited (False) or failed (True)."""
    n = len(failed)
    fail = np.asarray(failed)
    out = {"sample_id": np.array([f"s{i}" for i in range(n)], dtype=object),
           "label": np.arange(n, dtype=np.int64) % 4,
           "image_original": np.array([b"orig%d" % i for i in range(n)], dtype=object),
           "image": np.array([None if f else b"edit%d" % i for i, f in enumerate(fail)],
                             dtype=object),
           "error": np.array(["RuntimeError: no" if f else None for f in fail], dtype=object),
           "attempts": np.full(n, 3, np.int32)}
    for name in RESULT_COLUMNS:
        out[name] = np.where(fail, np.nan, 2.0)
    out["lpips"] = out["loss_perc"].copy()
    out["identity_similarity"] = 1.0 - out["loss_id"]
    return out


def test_all_failed_and_all_edited_batches_have_one_schema():
    failed = typed_rows(actor_batch([True, True]))
    edited = typed_rows(actor_batch([False, False, False]))
    assert failed.schema == edited.schema == STAGED_SCHEMA
    assert failed["iterations"].null_count == 2 and edited["iterations"].to_pylist() == [2] * 3
    assert pa.concat_tables([failed, edited]).num_rows == 5


def test_edited_rows_and_quarantine_partition_the_batch():
    table = typed_rows(actor_batch([False, True, False, True]))
    edits, bad = _edited_part(table), _quarantine_part(table)
    assert edits.schema == EDITS_SCHEMA and bad.schema == QUARANTINE_SCHEMA
    assert edits["sample_id"].to_pylist() == ["s0", "s2"]
    assert edits["image"].to_pylist() == [b"edit0", b"edit2"]
    assert bad.to_pylist() == [
        {"sample_id": s, "source": "edit", "stage": "edit", "reason": "RuntimeError: no"}
        for s in ("s1", "s3")]

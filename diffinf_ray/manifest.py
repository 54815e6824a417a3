"""The manifest: the one table every stage speaks (DESIGN.md).

Parquet, one row per sample, keyed by a stable string `sample_id`. Stages add columns by
joining on `sample_id`; no stage reorders or drops rows silently (unreadable rows go to a
quarantine table with their reason).

Columns (all stages):
    sample_id     string   stable key
    split         string   train | val | test | holdout
    label         int32    assigned label (possibly noisy after the noise stage)
    label_clean   int32    true label where known (synthfaces, or before injected noise), else null
    is_corrupted  bool     label != label_clean where both are known, else null
    image         binary   encoded PNG/JPEG bytes (null when image_uri is used)
    image_uri     string   where the image lives when not embedded (null when image is set)
    group         string   subgroup for fairness audits (synthfaces: skin-tone group), nullable
    identity      string   person id (synthfaces), nullable
Optional synthfaces columns: age, expression, expression_intensity, mask (PNG of region ids).
"""

from __future__ import annotations

import pyarrow as pa

SPLITS = ("train", "val", "test", "holdout")

SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("label_clean", pa.int32()),
        pa.field("is_corrupted", pa.bool_()),
        pa.field("image", pa.binary()),
        pa.field("image_uri", pa.string()),
        pa.field("group", pa.string()),
        pa.field("identity", pa.string()),
    ]
)
REQUIRED_COLUMNS = tuple(SCHEMA.names)

# Region ids of synthfaces' `mask` column (a single-channel PNG); 0 is background.
REGIONS = {"background": 0, "skin": 1, "hair": 2, "eyes": 3, "brows": 4, "nose": 5, "mouth": 6}

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("source", pa.string()),  # the row's image path/URI or "synthfaces:<index>"
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
    ]
)


class ManifestError(ValueError):
    """A manifest that breaks the contract above; the message says which column or row."""


def require_columns(names, required, stage: str, where: str) -> None:
    """Fail when a manifest with columns `names` lacks one of `required` (the columns `stage`
    reads); the message names the stage, the manifest and each missing column."""
    missing = [c for c in dict.fromkeys(required) if c not in names]
    if missing:
        raise ManifestError(f"{stage} stage: the manifest at {where} lacks column(s) "
                            f"{', '.join(missing)} (it has {', '.join(names)})")

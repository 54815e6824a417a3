"""Fairness generators on local Ray: a variant from the registry fits one LoRA generator per
(label, group) cell as Ray tasks and writes a balanced synthetic manifest with Ray Data actors."""

from __future__ import annotations

import pyarrow as pa

# kronfluence's wheel installs a top-level `tests` package, so not `from tests.test_fairness_gen`
from test_fairness_gen import pngs, tiny_model

from diffinf_ray.diffae.family import save_family
from diffinf_ray.fairness_gen.settings import BaseModel, FinetuneSettings, SynthesisSettings
from diffinf_ray.fairness_gen.synthesis import SYNTHETIC_SCHEMA
from diffinf_ray.fairness_gen.variants import variant_by_name
from diffinf_ray.manifest import SCHEMA
from diffinf_ray.storage import Location


def _manifest(folder) -> Location:
    """8 train rows in 2 cells of unequal size (5 + 3) and 2 val rows that must be ignored."""
    images = pngs(5, (220, 60, 60)) + pngs(3, (60, 60, 220), seed=1) + pngs(2, (0, 0, 0))
    n = len(images)
    table = pa.table({
        "sample_id": [f"s{i:02d}" for i in range(n)],
        "split": ["train"] * 8 + ["val"] * 2,
        "label": pa.array([0] * 5 + [1] * 3 + [0, 1], pa.int32()),
        "label_clean": pa.nulls(n, pa.int32()), "is_corrupted": pa.nulls(n, pa.bool_()),
        "image": pa.array(images, pa.binary()), "image_uri": pa.nulls(n, pa.string()),
        "group": ["red"] * 5 + ["blue"] * 3 + ["red", "blue"],
        "identity": pa.nulls(n, pa.string()),
    }, schema=SCHEMA)
    loc = Location(str(folder))
    loc.child("part-0.parquet").write_table(table)
    return loc


def test_lora_variant_writes_a_balanced_synthetic_manifest(ray_local, tmp_path):
    save_family(tiny_model(), tmp_path / "base")
    out = Location(str(tmp_path / "synthetic"))
    settings = FinetuneSettings(steps=2, batch_size=4, lr=1e-2, sample_steps=2)
    synthesis = SynthesisSettings(per_cell=3, steps=2, batch_size=4, actors=1)
    summary = variant_by_name("lora")(_manifest(tmp_path / "manifest"), out,
                                      BaseModel(str(tmp_path / "base")), synthesis, settings)
    assert summary["generators"] == 2 and summary["synthesis"]["images"] == 6
    table = Location(summary["manifest"]).read_table()
    assert table.schema.names == SYNTHETIC_SCHEMA.names
    df = table.to_pandas()
    assert df.groupby(["label", "group"]).size().to_dict() == {(0, "red"): 3, (1, "blue"): 3}
    assert df["synthetic"].all() and (df["split"] == "train").all()
    assert set(df["generator"]) == {"lora/y0-red", "lora/y1-blue"}
    assert df["sample_id"].is_unique and df["label_clean"].isna().all()
    assert all(bytes(b).startswith(b"\x89PNG") for b in df["image"])
    index = out.child("lora", "generators.json").read_json()
    assert [(g["group"], g["images"], g["kind"]) for g in index["generators"]] == \
        [("red", 5, "lora"), ("blue", 3, "lora")]
    assert all(g["fit"]["steps"] == 2 for g in index["generators"])
    assert out.child("lora", "y0-red", "lora.safetensors").exists()


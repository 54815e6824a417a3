"""The edit gate: its core (edit/gate.py), its settings, its columns in the edit stage, the
refine stage's fallbacks (rows conserved) and the report's verdict grids."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from diffinf_ray.config import ConfigError, EditSection, GateSection, load_config
from diffinf_ray.edit.gate import GATE_COLUMNS, EditGate, GateSettings
from diffinf_ray.manifest import SCHEMA
from diffinf_ray.run_root import RunRoot

TINY = "jobs/configs/tiny.yaml"
NUM_CLASSES = 3


class FixedClass(nn.Module):
    """Predicts class `c` for every image (logit 4 for c, 0 elsewhere)."""

    def __init__(self, c: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.c, self.num_classes = c, num_classes
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = torch.zeros(x.shape[0], self.num_classes)
        logits[:, self.c] = 4.0
        return logits


def _images(n: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (n, 3, size, size)).astype(np.float32)


# -- the core ---------------------------------------------------------------------------------

def test_a_fixed_class_gate_accepts_exactly_the_rows_of_that_label():
    labels = np.array([0, 1, 2, 1, 1, 0])
    gate = EditGate(GateSettings(), FixedClass(1))
    verdict = gate(_images(6), labels, np.ones(6))
    assert verdict.accepted.tolist() == (labels == 1).tolist()
    assert (verdict.prediction == 1).all() and verdict.prediction.dtype == np.int64
    p_fixed = np.exp(4.0) / (np.exp(4.0) + 2)  # softmax of (4, 0, 0)
    expected = np.where(labels == 1, p_fixed, (1 - p_fixed) / 2)
    np.testing.assert_allclose(verdict.confidence, expected, rtol=1e-6)
    assert list(verdict.columns()) == list(GATE_COLUMNS)


def test_min_identity_rejects_low_identity_rows_even_when_the_class_agrees():
    labels = np.array([2, 2, 2, 0, 2])
    identity = np.array([0.9, 0.49, 0.5, 0.95, np.nan])
    verdict = EditGate(GateSettings(min_identity=0.5), FixedClass(2))(_images(5), labels,
                                                                      identity)
    # 0.49 < 0.5; 0.5 passes (>=); row 3 has the wrong class; NaN never passes a threshold
    assert verdict.accepted.tolist() == [True, False, True, False, False]
    without = EditGate(GateSettings(), FixedClass(2))(_images(5), labels, identity)
    assert without.accepted.tolist() == [True, True, True, False, True]


def test_a_disabled_gate_accepts_every_row_and_needs_no_classifier():
    verdict = EditGate(GateSettings(enabled=False, min_identity=0.9))(_images(3), [0, 1, 2],
                                                                      [0.1, 0.2, np.nan])
    assert verdict.accepted.all() and (verdict.prediction == -1).all()
    assert np.isnan(verdict.confidence).all()
    with pytest.raises(ValueError, match="needs its classifier"):
        EditGate(GateSettings())


def test_the_core_refuses_bad_inputs_and_settings():
    gate = EditGate(GateSettings(), FixedClass(0))
    with pytest.raises(ValueError, match="edited must be"):
        gate(_images(2)[:, :1], [0, 1], [1.0, 1.0])
    with pytest.raises(ValueError, match="identity_similarity must be"):
        gate(_images(2), [0, 1], [1.0])
    with pytest.raises(ValueError, match="outside the gate classifier's 3 classes"):
        gate(_images(2), [0, 3], [1.0, 1.0])
    for bad, match in (({"classifier": "train"}, "classifier"),
                       ({"min_identity": 1.5}, "min_identity")):
        with pytest.raises(ValueError, match=match):
            GateSettings(**bad)


def test_gate_settings_mirror_the_config_section():
    section = GateSection(enabled=False, min_identity=0.3, fallback="keep")
    assert GateSettings.from_section(section) == GateSettings(False, "removal", 0.3)
    # the edit stage's view of the config hides the fallback (refine's): the gate never reads it
    from diffinf_ray.stage_registry import config_for_stage

    view = config_for_stage(load_config(TINY, ["edit.gate.min_identity=0.3"]), "edit")
    assert GateSettings.from_section(view.edit.gate) == GateSettings(True, "removal", 0.3)
    assert GateSettings.from_section(GateSection()) == GateSettings()
    assert set(GateSection.model_fields) == {"enabled", "classifier", "min_identity", "fallback"}
    assert EditSection().gate == GateSection()


# -- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("edit.gate.fallback=drop", r"'edit\.gate\.fallback': Input should be 'remove' or 'keep'"),
    ("edit.gate.min_identity=1.5", r"'edit\.gate\.min_identity': Input should be less than"),
    ("edit.gate.classifier=train", r"'edit\.gate\.classifier': Input should be 'removal'"),
    ("edit.gate.enabeld=false", r"unknown config key 'edit\.gate\.enabeld'"),
    ("edit.gate=remove", r"'edit\.gate': Input should be a valid dictionary"),
])
def test_bad_gate_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


def test_gate_settings_load_from_a_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("edit:\n  gate:\n    fallback: keep\n    min_identity: 0.4\n")
    cfg = load_config(path, ["edit.gate.enabled=false"])
    assert cfg.edit.gate == GateSection(enabled=False, min_identity=0.4, fallback="keep")
    assert load_config(None).edit.gate == GateSection(enabled=True, classifier="removal",
                                                      min_identity=None, fallback="remove")
    with pytest.raises(ConfigError, match=r"unknown key 'edit\.gate\.threshold'"):
        path.write_text("edit:\n  gate:\n    threshold: 0.4\n")
        load_config(path)


# -- the edit stage's helpers -----------------------------------------------------------------

def test_the_edit_stage_adds_the_verdict_of_each_edit_as_saved():
    from diffinf_ray.stages.edit import add_gate_columns

    labels = np.array([1, 0, 1, 2], dtype=np.int32)
    out = {"sample_id": np.array(["a", "b", "c", "d"], dtype=object), "label": labels,
           "identity_similarity": np.array([0.9, 0.9, np.nan, 0.9])}
    edited = _images(3)
    # rows 0, 1 edited together, row 2 failed (quarantined), row 3 edited alone
    parts = [(np.array([0, 1]), {"edited": edited[:2]}, 1, None),
             (np.array([2]), None, 3, "RuntimeError: no"),
             (np.array([3]), {"edited": edited[2:]}, 1, None)]
    add_gate_columns(EditGate(GateSettings(), FixedClass(1)), out, parts)
    assert out["gate_accepted"].tolist() == [True, False, False, False]
    assert out["gate_prediction"].tolist() == [1, 1, -1, 1]
    assert np.isnan(out["gate_confidence"][2]) and (out["gate_confidence"][[0, 1, 3]] > 0).all()

    seen = []

    class Recording(FixedClass):
        def forward(self, x):
            seen.append(x.clone())
            return super().forward(x)

    add_gate_columns(EditGate(GateSettings(), Recording(1)), out, parts[:1])
    saved = np.clip(np.rint((edited[:2] + 1) * 127.5), 0, 255) / 127.5 - 1  # the PNG's pixels
    np.testing.assert_allclose(seen[0].numpy(), saved, atol=1e-6)


def test_the_edit_actor_writes_the_gate_columns_after_the_editor():
    """EditActor.__call__ with a stand-in editor: the verdict lands in its output rows."""
    from diffinf_ray.stage_registry import config_for_stage
    from diffinf_ray.stages.edit import RESULT_COLUMNS, EditActor

    class HalfEditor:
        def edit(self, x, y):
            n = len(y)
            return {"edited": x.numpy() * 0.5, **{k: np.full(n, 0.1) for k in RESULT_COLUMNS}}

    actor = EditActor.__new__(EditActor)  # no frozen models to load
    actor.cfg = config_for_stage(load_config(TINY), "edit")
    actor.editor = HalfEditor()
    actor.by_id = False  # the editor takes (images, labels), as `latent` and `guided` do
    actor.gate = EditGate(GateSettings(min_identity=0.95), FixedClass(1))
    batch = {"sample_id": np.array(["a", "b", "c"], dtype=object),
             "image": np.array([_png(10), _png(20), _png(30)], dtype=object),
             "label": np.array([1, 0, 1], dtype=np.int32)}
    out = actor(batch)
    np.testing.assert_allclose(out["identity_similarity"], 0.9)  # 1 - loss_id
    assert out["gate_prediction"].tolist() == [1, 1, 1]
    assert not out["gate_accepted"].any()  # identity 0.9 < 0.95 for all; label 0 also wrong
    actor.gate = EditGate(GateSettings(), FixedClass(1))
    assert actor(batch)["gate_accepted"].tolist() == [True, False, True]


def _write_removal_checkpoint(root: RunRoot, num_classes: int = NUM_CLASSES) -> None:
    from diffinf_ray.models.checkpoint import (
        CHECKPOINT_FILE,
        checkpoint_dir_name,
        classifier_payload,
        to_bytes,
    )
    from diffinf_ray.models.classifier import build_classifier

    model = build_classifier(num_classes)
    for epoch in (1, 2):
        root.child("removal", "checkpoints", checkpoint_dir_name(epoch), CHECKPOINT_FILE
                   ).write_bytes(to_bytes(classifier_payload([model], epoch, 1e-3)))


def test_the_gate_loads_the_removal_stages_last_classifier(tmp_path):
    from diffinf_ray.stages.edit import build_gate

    root = RunRoot(str(tmp_path / "run"))
    cfg = load_config(TINY, [f"run.root={root.uri}"])
    with pytest.raises(FileNotFoundError, match="run the removal stage first"):
        build_gate(cfg, root, "cpu")
    off = build_gate(load_config(TINY, ["edit.gate.enabled=false"]), root, "cpu")
    assert off.classifier is None  # nothing loaded: the removal stage's output is not read
    _write_removal_checkpoint(root)
    gate = build_gate(cfg, root, "cpu")
    assert not gate.classifier.training
    verdict = gate(_images(2, 32), [0, 1], [1.0, 1.0])
    assert verdict.prediction.shape == (2,) and ((verdict.confidence > 0)
                                                 & (verdict.confidence < 1)).all()


def test_the_edit_summary_counts_the_verdicts():
    from diffinf_ray.stages.edit import gate_summary

    edits = pd.DataFrame({"gate_accepted": [True, False, True, False, False]})
    from diffinf_ray.stage_registry import config_for_stage

    # as the edit stage sees the config: edit.gate.fallback is refine's, not the edit's
    cfg = config_for_stage(load_config(TINY, ["edit.gate.fallback=keep"]), "edit")
    summary = gate_summary(cfg, edits)
    assert summary == {"gate_enabled": True, "gate_accepted": 2, "gate_fallen_back": 3}


# -- refine: both fallbacks conserve the rows --------------------------------------------------

def _png(value: int) -> bytes:
    from diffinf_ray.data.images import encode_png

    return encode_png(np.full((8, 8, 3), value, dtype=np.uint8))


def _noisy_manifest(n: int = 18) -> pa.Table:
    return pa.table({
        "sample_id": [f"s{i:03d}" for i in range(n)],
        "split": [("train", "train", "val", "test")[i % 4] if i < 16 else "train"
                  for i in range(n)],
        "label": np.arange(n, dtype=np.int32) % NUM_CLASSES,
        "label_clean": np.arange(n, dtype=np.int32) % NUM_CLASSES,
        "is_corrupted": [i % 5 == 0 for i in range(n)],
        "image": [_png(i) for i in range(n)],
        "image_uri": [None] * n, "group": ["g"] * n, "identity": [f"p{i % 5}" for i in range(n)],
    }, schema=SCHEMA)


# train rows: s000 s001 s004 s005 s008 s009 s012 s013 s016 s017; the edited ones below
EDITED = {"s000": True, "s001": False, "s005": True, "s009": False, "s016": False}


def _edits_table() -> pa.Table:
    ids = list(EDITED)
    labels = [int(s[1:]) % NUM_CLASSES for s in ids]
    accepted = list(EDITED.values())
    return pa.table({
        "sample_id": ids, "label": pa.array(labels, pa.int32()),
        "image": [_png(200 + i) for i in range(len(ids))],
        "image_original": [_png(int(s[1:])) for s in ids],
        "identity_similarity": [0.9, 0.8, 0.7, 0.2, 0.6],
        "gate_prediction": pa.array([lab if ok else (lab + 1) % NUM_CLASSES
                                     for lab, ok in zip(labels, accepted, strict=True)],
                                    pa.int32()),
        "gate_confidence": [0.8, 0.1, 0.7, 0.2, 0.3],
        "gate_accepted": accepted,
    })


def _refine_run(tmp_path, *overrides, edits: pa.Table | None = None):
    from diffinf_ray.stages.refine import run_refine

    root = RunRoot(str(tmp_path / "run"))
    for i, part in enumerate((_noisy_manifest().slice(0, 9), _noisy_manifest().slice(9))):
        root.child("manifest_noisy", f"part-{i}.parquet").write_table(part)
    root.child("edits", "edits.parquet").write_table(edits or _edits_table())
    cfg = load_config(TINY, [f"run.root={root.uri}", *overrides])
    summary = run_refine(cfg, root)
    refined = pq.read_table(tmp_path / "run" / "refined").to_pandas().set_index("sample_id")
    removed = pq.read_table(tmp_path / "run" / "refined" / "_removed.parquet").to_pandas()
    return summary, refined, removed


def _noisy() -> pd.DataFrame:
    return _noisy_manifest().to_pandas().set_index("sample_id")


def _check_accepted_replaced(refined: pd.DataFrame) -> None:
    edits = _edits_table().to_pandas().set_index("sample_id")
    noisy = _noisy()
    accepted = [s for s, ok in EDITED.items() if ok]
    assert sorted(refined.index[refined.is_edited]) == accepted
    for sid in accepted:
        assert refined.loc[sid, "image"] == edits.loc[sid, "image"]
        assert refined.loc[sid, "image_original"] == noisy.loc[sid, "image"]
    others = refined.index[~refined.is_edited]
    assert (refined.loc[others, "image"] == noisy.loc[others, "image"]).all()
    assert refined.loc[others, "image_original"].isna().all()
    assert (refined.label == noisy.loc[refined.index, "label"]).all()


def test_refine_removes_rejected_rows_and_lists_them(ray_local, tmp_path):
    summary, refined, removed = _refine_run(tmp_path)  # fallback remove: the default
    noisy = _noisy()
    rejected = sorted(s for s, ok in EDITED.items() if not ok)
    assert sorted(removed.sample_id) == rejected
    assert "gate classifier predicts" in removed.reason.iloc[0]
    assert not set(rejected) & set(refined.index)
    assert sorted([*refined.index, *removed.sample_id]) == sorted(noisy.index)
    n_train = int((noisy.split == "train").sum())
    assert (refined.split == "train").sum() + len(removed) == n_train
    assert (refined.split != "train").sum() == (noisy.split != "train").sum()
    assert not refined.gate_rejected.any()
    _check_accepted_replaced(refined)
    assert summary["gate_rejected_removed"] == 3 and summary["gate_rejected_kept_original"] == 0
    assert summary["train_rows"] == n_train - 3 and summary["noisy_train_rows"] == n_train
    assert summary["edited_rows"] == 2 and summary["rows"] == len(noisy) - 3


def test_refine_keeps_the_original_of_rejected_rows(ray_local, tmp_path):
    summary, refined, removed = _refine_run(tmp_path, "edit.gate.fallback=keep")
    noisy = _noisy()
    assert len(removed) == 0 and list(removed.columns) == ["sample_id", "reason"]
    assert sorted(refined.index) == sorted(noisy.index)  # same rows
    rejected = sorted(s for s, ok in EDITED.items() if not ok)
    assert sorted(refined.index[refined.gate_rejected]) == rejected
    assert not refined.loc[rejected, "is_edited"].any()
    assert (refined.loc[rejected, "image"] == noisy.loc[rejected, "image"]).all()
    _check_accepted_replaced(refined)
    assert summary["gate_rejected_kept_original"] == 3 and summary["gate_rejected_removed"] == 0
    assert summary["train_rows"] == summary["noisy_train_rows"]


def test_min_identity_reasons_name_the_threshold(ray_local, tmp_path):
    edits = _edits_table().to_pandas()
    edits["gate_prediction"] = edits["label"]  # the classifier agrees; identity rejects s009
    edits["gate_accepted"] = edits["identity_similarity"] >= 0.5
    table = pa.Table.from_pandas(edits, preserve_index=False)
    _, refined, removed = _refine_run(tmp_path, "edit.gate.min_identity=0.5", edits=table)
    assert removed.to_dict(orient="records") == [
        {"sample_id": "s009",
         "reason": "identity_similarity 0.200 below edit.gate.min_identity 0.5"}]
    assert "s009" not in refined.index and refined.is_edited.sum() == 4


def test_a_disabled_gate_refines_as_before(ray_local, tmp_path):
    """enabled: false -> every edit accepted (the edit stage's columns) -> every edited
    training image replaced, no row removed: the refine of the method without the gate."""
    from diffinf_ray.stages.edit import add_gate_columns

    edits = _edits_table().to_pandas()
    out = {"sample_id": edits.sample_id.to_numpy(), "label": edits.label.to_numpy(),
           "identity_similarity": edits.identity_similarity.to_numpy()}
    add_gate_columns(EditGate(GateSettings(enabled=False)), out,
                     [(np.arange(len(edits)), {"edited": _images(len(edits))}, 1, None)])
    for name in GATE_COLUMNS:
        edits[name] = out[name]
    assert edits.gate_accepted.all()
    table = pa.Table.from_pandas(edits, preserve_index=False)
    summary, refined, removed = _refine_run(tmp_path, "edit.gate.enabled=false", edits=table)
    noisy = _noisy()
    assert len(removed) == 0 and sorted(refined.index) == sorted(noisy.index)
    assert sorted(refined.index[refined.is_edited]) == sorted(EDITED)
    assert not refined.gate_rejected.any()
    for sid in EDITED:
        assert refined.loc[sid, "image"] == edits.set_index("sample_id").loc[sid, "image"]
    assert summary["edited_rows"] == len(EDITED) and summary["rows"] == len(noisy)


def test_refine_refuses_a_row_count_that_does_not_add_up(tmp_path):
    from diffinf_ray.stages.refine import check_rows

    root = RunRoot(str(tmp_path / "run"))
    noisy = _noisy_manifest()
    root.child("manifest_noisy", "part-0.parquet").write_table(noisy)
    refined = noisy.to_pandas()
    refined["is_edited"] = False
    refined["gate_rejected"] = False
    out = root.child("refined")
    keep = refined[refined.sample_id != "s001"]
    out.child("part-0.parquet").write_table(pa.Table.from_pandas(keep, preserve_index=False))
    listed = pd.DataFrame({"sample_id": ["s001"], "reason": ["x"]})
    assert check_rows(root, out, listed)[0] == int((refined.split == "train").sum())
    for wrong in (pd.DataFrame({"sample_id": [], "reason": []}),  # a row lost
                  pd.DataFrame({"sample_id": ["s004"], "reason": ["x"]}),  # kept and removed
                  pd.DataFrame({"sample_id": ["s002"], "reason": ["x"]})):  # not train
        with pytest.raises(RuntimeError, match="refine: 18 rows"):
            check_rows(root, out, wrong)
    dup = pd.concat([keep, keep.iloc[:1]])  # a row twice, and one lost
    out.child("part-0.parquet").write_table(pa.Table.from_pandas(
        dup[dup.sample_id != "s004"], preserve_index=False))
    with pytest.raises(RuntimeError, match="refine"):
        check_rows(root, out, listed)


# -- report -----------------------------------------------------------------------------------

def test_the_report_counts_the_verdicts_and_grids_each(tmp_path):
    from diffinf_ray.stages.report import gate_section

    root = RunRoot(str(tmp_path / "run"))
    out = root.child("report")
    edits = _edits_table().to_pandas()
    md, summary = gate_section(load_config(TINY), edits, out)
    text = "".join(md)
    assert summary == {"enabled": True, "fallback": "remove", "accepted": 2, "fallen_back": 3}
    assert "2 edits accepted" in text and "3 rejected, which left the refined set" in text
    assert "![gate accepted](gate_grid_accepted.png)" in text
    assert "![gate rejected](gate_grid_rejected.png)" in text
    for verdict in ("accepted", "rejected"):
        assert (tmp_path / "run" / "report" / f"gate_grid_{verdict}.png").stat().st_size > 0
    keep_md, _ = gate_section(load_config(TINY, ["edit.gate.fallback=keep"]), edits,
                              root.child("report2"))
    assert "kept their original image" in "".join(keep_md)
    off_md, off = gate_section(load_config(TINY, ["edit.gate.enabled=false"]), edits,
                               root.child("report3"))
    assert "The gate is off" in "".join(off_md) and off["enabled"] is False
    assert gate_section(load_config(TINY), edits.drop(columns=list(GATE_COLUMNS)), out) == ([], {})


def test_refined_batches_without_an_accepted_edit_keep_image_original_typed(tmp_path):
    """refine writes one file per batch: a batch where no edit was accepted has image_original
    all None, which must still be binary, or the folder's files do not read back as one table
    (Arrow takes the first file's schema: 'Unsupported cast from binary to null')."""
    from diffinf_ray.stages.refine import refined_table

    def batch(ids):
        return pd.DataFrame({"sample_id": ids, "split": "train", "label": 0,
                             "image": [f"png-{i}".encode() for i in ids]})

    edits = pd.DataFrame({"image": [b"edited-a", b"edited-c"], "gate_accepted": [True, False]},
                         index=["a", "c"])
    out = tmp_path / "refined"
    out.mkdir()
    pq.write_table(refined_table(batch(["c", "d"]), edits, "keep"), out / "0.parquet")
    pq.write_table(refined_table(batch(["a", "b"]), edits, "keep"), out / "1.parquet")
    refined = pq.read_table(out).to_pandas().set_index("sample_id").sort_index()
    assert refined.image_original.tolist() == [b"png-a", None, None, None]
    assert refined.image.tolist() == [b"edited-a", b"png-b", b"png-c", b"png-d"]
    assert refined.is_edited.tolist() == [True, False, False, False]

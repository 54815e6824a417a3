"""`diffinf fairness`: config validation, a tiny end-to-end run of the Ray-free path (cells,
ledger records, table, plot, resume, the pretraining plug point) and one cell through Ray Train
(the harness)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import yaml

from diffinf_ray.cli import main
from diffinf_ray.config import ConfigError
from diffinf_ray.fairness import methods as fairness_methods
from diffinf_ray.fairness.runner import load_fairness_config, run_fairness
from diffinf_ray.ledger import paired_differences, read_ledger

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(tmp_path, **changes) -> str:
    tree = {
        "name": "fair_test", "root": str(tmp_path / "run"), "ledger": str(tmp_path / "ledger"),
        "severities": [0.9], "seeds": [0], "methods": ["erm", "group_dro"],
        "data": {"task": "age", "age_bins": [[18, 35], [50, 80]], "num_samples": 60,
                 "num_identities": 60, "resolution": 32},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.001, "head_hidden": 16,
                  "augment": False},
        "torch_threads": 1,
    }
    tree.update(changes)
    path = tmp_path / "fairness.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        load_fairness_config(_write(tmp_path), ["train.epoch=2"])
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        load_fairness_config(_write(tmp_path, methods=["nope"]))
    with pytest.raises(ConfigError, match="group_dro.step"):
        load_fairness_config(_write(tmp_path, methods=[{"name": "group_dro",
                                                        "options": {"step": 1}}]))
    with pytest.raises(ConfigError, match="no pretrainer 'synth'"):
        load_fairness_config(_write(tmp_path, methods=[{"name": "s", "pretrain": "synth"}]))
    cfg = load_fairness_config(_write(tmp_path), ["severities=[0.5, 0.99]"])
    assert cfg.severities == [0.5, 0.99] and [m.name for m in cfg.methods] == ["erm", "group_dro"]
    with pytest.raises(ConfigError, match=r"select.dro_val: \['dro_wd9'\] - candidates must be"):
        load_fairness_config(_write(tmp_path), ["select={dro_val: [group_dro, dro_wd9]}"])
    with pytest.raises(ConfigError, match="select.erm: a method is already called 'erm'"):
        load_fairness_config(_write(tmp_path), ["select={erm: [group_dro]}"])
    assert load_fairness_config(_write(tmp_path), ["select={dro_val: [group_dro, erm]}"]
                                ).select == {"dro_val": ["group_dro", "erm"]}
    for name in ("fairness.yaml", "fairness_tiny.yaml"):
        load_fairness_config(f"jobs/configs/{name}")


def _balanced_real_rows(train: pd.DataFrame, context: dict) -> pd.DataFrame:
    """A stand-in pretrainer: the real training rows, group-balanced, marked synthetic."""
    from diffinf_ray.fairness.reweighting import balanced_epoch

    rows = train.iloc[balanced_epoch(train["group"].to_numpy(),
                                     np.random.default_rng(context["seed"]))].copy()
    rows["synthetic"] = True
    _balanced_real_rows.seen = (len(train), set(train["split"]), context["class_names"])
    return rows


def test_local_run_cells_ledger_table_plot_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(fairness_methods.PRETRAINERS, "balanced_real", _balanced_real_rows)
    methods = ["erm", "group_dro", {"name": "pre_erm", "pretrain": "balanced_real",
                                    "pretrain_epochs": 1}]
    path = _write(tmp_path, methods=methods)
    assert main(["fairness", path, "-q"]) == 0
    run = tmp_path / "run"
    for name in ("erm", "group_dro", "pre_erm"):
        cell = json.loads((run / "cells/severity_0.9/seed_0" / f"{name}.json").read_text())
        assert set(cell["test"]) >= {"accuracy", "worst_group_accuracy", "per_group"}
        assert all("|tone_" in g for g in cell["test"]["per_group"])
    pre = json.loads((run / "cells/severity_0.9/seed_0/pre_erm.json").read_text())
    assert [h.get("phase") for h in pre["history"]] == ["pretrain", None]
    n_train, splits, classes = _balanced_real_rows.seen
    assert splits == {"train"} and classes == ("age_18-35", "age_50-80")
    records = read_ledger(tmp_path / "ledger")
    assert len(records) == 1 and records[0]["kind"] == "fairness"
    assert set(records[0]["metrics"]) == {"erm", "group_dro", "pre_erm"}
    rows = paired_differences(records, "group_dro", "erm", "worst_group_accuracy")
    assert len(rows) == 1 and rows[0]["seeds"] == [0]
    table = (run / "table.md").read_text()
    assert "| 0.9 | group_dro | 1 |" in table and "Δ worst-group vs erm" in table
    assert (run / "worst_group_vs_severity.png").read_bytes()[:4] == b"\x89PNG"
    assert "| age_50-80\\|tone_dark |" in (run / "per_group.md").read_text()  # one cell
    # a second run reads the finished cells back: no new training, no new record
    capsys.readouterr()
    assert main(["fairness", path, "--dry-run"]) == 0
    assert capsys.readouterr().out.count("(done)") == 3
    run_fairness(load_fairness_config(path))
    assert len(read_ledger(tmp_path / "ledger")) == 1


def test_one_cell_through_ray_train(tmp_path):
    """`executor: ray` starts its own Ray (none is running) with its logs under the root."""
    import ray

    assert not ray.is_initialized()
    path = _write(tmp_path, executor="ray", methods=["group_dro"], ledger=None)
    results = run_fairness(load_fairness_config(path, ["train.cpus_per_worker=1"]))
    assert [r["method"] for r in results] == ["group_dro"]
    ckpt = tmp_path / "run/cells/severity_0.9/seed_0/group_dro/checkpoints/epoch_0001"
    assert (ckpt / "checkpoint.pt").is_file() and (ckpt / "method_state.pt").is_file()
    state = __import__("torch").load(ckpt / "method_state.pt", weights_only=True)
    q = state["method"]["extra"]["q"]
    assert abs(float(q.sum()) - 1.0) < 1e-5 and len(q) >= 2
    assert 0.0 <= results[0]["test"]["worst_group_accuracy"] <= 100.0
    assert not ray.is_initialized()  # shut down after the run
    assert list((tmp_path / "run" / "logs").glob("ray-*.log"))


# the shipped 32 px synthfaces autoencoder's three age classes (synthfaces' default bins)
SHIPPED_AGE_BINS = [[0, 18], [25, 40], [50, 80]]
LORA_ENTRY = {"name": "lora_pre", "pretrain": "lora", "pretrain_epochs": 1, "pretrain_options": {
    "finetune": {"steps": 2, "batch_size": 4},
    "synthesis": {"per_cell": 3, "steps": 2, "batch_size": 8, "use_gpu": False}}}


def _shipped_classes_data() -> dict:
    return {"task": "age", "age_bins": SHIPPED_AGE_BINS, "num_samples": 60,
            "num_identities": 60, "resolution": 32}


def test_pretrain_options_are_checked_on_load(tmp_path):
    bad = dict(LORA_ENTRY, pretrain_options={"finetune": {"stepz": 2}})
    with pytest.raises(ConfigError, match=r"unknown pretrain_options.finetune \['stepz'\]"):
        load_fairness_config(_write(tmp_path, methods=[bad]))
    with pytest.raises(ConfigError, match="pretrain_options without pretrain"):
        load_fairness_config(_write(tmp_path, methods=[{"name": "erm", "pretrain_options": {
            "clusters": 2}}]))
    # two classes against the shipped model's three: one clear error before anything is fitted
    with pytest.raises(ValueError, match="conditioned on 3 classes; this study's data has 2"):
        run_fairness(load_fairness_config(_write(tmp_path, methods=[LORA_ENTRY], ledger=None)))


def test_lora_row_pretrains_on_balanced_synthetic_faces(tmp_path, ray_local):
    """The `lora` variant as a fairness row: one LoRA generator per (label, group) cell of the
    real training rows, `per_cell` synthetic images of every cell, ERM on them, then the
    fine-tune on the real rows."""
    path = _write(tmp_path, methods=["erm", LORA_ENTRY], ledger=None,
                  data=_shipped_classes_data())
    results = run_fairness(load_fairness_config(path))
    assert sorted(r["method"] for r in results) == ["erm", "lora_pre"]
    cell = tmp_path / "run/cells/severity_0.9/seed_0/lora_pre"
    real = pd.read_parquet(cell / "synthetic/real_train")
    synthetic = pd.read_parquet(cell / "synthetic/lora/manifest")
    real_cells = real.groupby(["label", "group"]).size()
    counts = synthetic.groupby(["label", "group"]).size()
    assert set(counts.index) == set(real_cells.index) and (counts == 3).all()
    assert synthetic.synthetic.all() and (synthetic.split == "train").all()
    assert synthetic.generator.str.startswith("lora/").all()
    assert not set(synthetic.sample_id) & set(real.sample_id)
    summary = json.loads((cell / "synthetic/summary.json").read_text())
    assert summary["variant"] == "lora" and summary["generators"] == len(real_cells)
    record = json.loads((cell.parent / "lora_pre.json").read_text())
    assert [h.get("phase") for h in record["history"]] == ["pretrain", None]
    assert 0.0 <= record["test"]["worst_group_accuracy"] <= 100.0


def test_a_group_with_no_training_image_is_named_before_pretraining(tmp_path, monkeypatch,
                                                                     caplog):
    """At severity 0.99 a 60-face draw can leave a minority group no training image: a
    synthetic row then has no generator for them, and the run says which groups those are."""
    monkeypatch.setitem(fairness_methods.PRETRAINERS, "balanced_real", _balanced_real_rows)
    path = _write(tmp_path, severities=[0.99], seeds=[1], methods=[
        "erm", {"name": "pre_erm", "pretrain": "balanced_real", "pretrain_epochs": 1}])
    with caplog.at_level(logging.WARNING, logger="diffinf_ray.fairness.runner"):
        run_fairness(load_fairness_config(path))
    cell = json.loads((tmp_path / "run/cells/severity_0.99/seed_1/pre_erm.json").read_text())
    [warning] = [r.getMessage() for r in caplog.records if "no training image" in r.getMessage()]
    named = warning.split("group(s) ")[1].split(":")[0].split(", ")
    # this draw's two minority cells (seed 0's happens to keep one image in each)
    assert named == ["age_18-35|tone_dark", "age_50-80|tone_light"]
    assert set(named) <= set(cell["test"]["per_group"]) and warning.startswith("pre_erm, seed 1:")

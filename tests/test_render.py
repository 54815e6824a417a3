"""The markdown/HTML rendering of the run report and the experiment table (diffinf_ray/render.py):
the files both write from a small fixed input are compared with the ones the code wrote before
the rendering moved to render.py (tests/data/render/; regenerate with RENDER_GOLDEN=write)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from diffinf_ray.config import load_config
from diffinf_ray.run_root import RunRoot

GOLDEN = Path(__file__).parent / "data" / "render"
TINY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny.yaml"


def _png(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _metrics(acc: float) -> dict:
    return {"accuracy": acc, "auroc_macro_ovr": acc + 3.5, "kappa_linear": acc / 200,
            "ece": 0.0123, "epoch": 2}


def _report_inputs(root: RunRoot) -> None:
    """Every input the report reads, small: metrics, detection, predictor, edits, oracle."""
    root.child("evaluation", "metrics.json").write_json(_metrics(61.0))
    root.child("removal", "evaluation", "metrics.json").write_json(_metrics(62.5))
    root.child("baselines", "small_loss", "evaluation", "metrics.json").write_json(
        {"accuracy": 63.25, "epoch": 2})  # no AUROC / kappa / ECE: "-" cells
    root.child("retrain", "evaluation", "metrics.json").write_json(_metrics(64.125))
    root.child("influence", "detection.json").write_json(
        {"tracin": {"precision": 0.5, "recall": 0.25, "auroc": 0.7}})
    root.child("predictor", "report.json").write_json({"heldout_auroc": 0.66,
                                                       "heldout_rows": 40})
    root.child("lossnets", "lossnets.json").write_json(
        {"perceptual": {"name": "lpips (alex)"},
         "identity": {"kind": "trained", "note": "a <small> embedder & co"}})
    edits = pd.DataFrame({
        "sample_id": ["c", "a", "b"], "label": [0, 0, 2], "lpips": [0.25, 0.125, 0.5],
        "identity_similarity": [0.9, 0.8, 0.7], "p_high_before": [0.9, 0.8, 0.95],
        "p_high_after": [0.1, 0.2, 0.3],
        "image_original": [_png((10, 10, 10))] * 3, "image": [_png((200, 0, 0))] * 3})
    root.child("edits", "edits.parquet").write_bytes(edits.to_parquet(index=False))
    side = {"edits": 3, "oracle_target_before": 0.25, "oracle_target_after": 0.75}
    root.child("oracle", "report.json").write_json({
        "all": side, "corrupted_label": {**side, "edits": 2}, "clean_label": {"edits": 0},
        "attribute_oracle": {"test_accuracy": 88.5},
        "identity_oracle": {"verification_auroc": 0.7, "val_identities": 12,
                            "mean_same_person_similarity": 0.8,
                            "mean_different_person_similarity": 0.1,
                            "threshold_at_eer": 0.45, "same_person_accept_rate_at_eer": 0.9,
                            "threshold_at_far_1pct": 0.6, "same_person_accept_rate": 0.7},
        "mean_identity_similarity_oracle": 0.77, "identity_retention_at_eer": 0.66,
        "identity_retention": 0.33})
    for stage, seconds in (("ingest", 1.25), ("train", 30.5)):
        root.child("stages", f"{stage}.json").write_json(
            {"stage": stage, "status": "done", "wall_seconds": seconds})


def _check(produced: dict[str, str], tmp_path: Path) -> None:
    if os.environ.get("RENDER_GOLDEN") == "write":
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name, text in produced.items():
            (GOLDEN / name).write_text(text)
        pytest.skip("golden files written")
    for name, text in produced.items():
        assert text == (GOLDEN / name).read_text(), name


def _no_inline_images(page: str) -> str:
    """Plots are matplotlib PNGs (bytes vary with its version): compare the page around them."""
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,...", page)


def test_run_report_files_are_unchanged(tmp_path):
    from diffinf_ray.stages.report import run_report

    cfg = load_config(TINY, {"run.root": str(tmp_path / "run"), "run.name": "golden <run>"})
    root = RunRoot(cfg.run.root)
    _report_inputs(root)
    run_report(cfg, root)
    out = tmp_path / "run" / "report"
    _check({"report.md": (out / "report.md").read_text(),
            "report.html": _no_inline_images((out / "report.html").read_text())}, tmp_path)


def test_experiment_table_files_are_unchanged(tmp_path):
    from diffinf_ray import experiment as ex

    exp = ex.ExperimentConfig(name="golden & co", root=str(tmp_path / "exp"), base=str(TINY),
                              seeds=[0, 1], tasks={"age": {"noise.rate": 0.3},
                                                   "expression": {"data.task": "expression"}},
                              noise_rates=[0.1])
    runs = ex.plan(exp)
    for i, run in enumerate(runs):
        if run.task != "age":  # expression: nothing measured yet
            continue
        root = RunRoot(run.root)
        root.child("evaluation", "metrics.json").write_json(_metrics(60 + i))
        if run.kind == "methods":
            root.child("retrain", "evaluation", "metrics.json").write_json(_metrics(65 + i))
            root.child("report", "lpips_by_class.csv").write_bytes(pd.DataFrame(
                {"class": ["young", "adult", "old"], "edits": [2, 0, 1],
                 "lpips_mean": [0.2 + i / 100, None, 0.3], "lpips_std": [0.01, None, 0.0]}
            ).to_csv(index=False).encode())
            root.child("report", "grid_young.png").write_bytes(_png((0, 100, 0)))
    ex.experiment_location(exp, runs).child("experiment.json").write_json(
        {"runs": {"age/methods/seed_0": {"status": "done", "errors": {}},
                  "age/methods/seed_1": {"status": "failed", "errors": {"train": "a | b"}}}})
    ex.write_table(exp, runs)
    out = tmp_path / "exp" / "table"
    _check({"table.md": (out / "table.md").read_text(),
            "table.html": _no_inline_images((out / "table.html").read_text())}, tmp_path)


def test_tables_cells_and_pages():
    from diffinf_ray.render import html_page, html_table, markdown_table, markdown_to_html

    df = pd.DataFrame({"a": [1.23456, None], "b <x>": ["p|q", float("nan")]})
    # a pipe inside a cell (a fairness group "label|tone") is escaped, so the row keeps 2 cells
    assert markdown_table(df, 2) == "| a | b <x> |\n|---|---|\n| 1.23 | p\\|q |\n| - | - |\n"
    cells = markdown_to_html(markdown_table(df, 2), "T")
    assert "<tr><td>1.23</td><td>p|q</td></tr>" in cells
    assert markdown_table(df.iloc[:0], empty="(nothing)") == "(nothing)\n"
    assert "b &lt;x&gt;" in html_table(df) and html_table(df.iloc[:0]) == "<p>(none)</p>"
    assert html_page("t & u", ["<p>x</p>"]) == ("<!doctype html><html><head><meta charset='utf-8'>"
                                              "<title>t &amp; u</title></head><body><p>x</p>"
                                              "</body></html>")
    page = markdown_to_html("# T\n| h |\n|---|\n| <v> |\n![g](g.png)\n**bold** text\n", "T")
    assert ("<h1>T</h1><table border=1 cellpadding=4><tr><td>h</td></tr><tr><td>&lt;v&gt;</td>"
            "</tr></table><img src=\"g.png\" style=\"image-rendering:pixelated\"><p>bold text</p>"
            ) in page

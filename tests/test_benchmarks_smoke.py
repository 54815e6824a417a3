"""Benchmarks at unit size, so they cannot rot: benchmarks/ray_overhead.py runs its Ray paths
(the fit as a Ray task and through Ray Train) and plain PyTorch path on a few dozen synthfaces for one epoch and one repeat;
benchmarks/expression_probe.py trains one epoch on 150 faces; benchmarks/reproducibility.py
compares two one-epoch fits of the tiny config."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Ray pickles its worker function by value from here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ray_overhead():
    return _load("ray_overhead")


@pytest.fixture
def tiny_cfg(ray_overhead, tmp_path):
    return ray_overhead.load(ray_overhead.DEMO_CONFIG, [
        "data.synthfaces.num_samples=48", "data.synthfaces.num_identities=12",
        "data.synthfaces.with_masks=false", "train.epochs=1", "train.batch_size=8",
        "train.checkpoint_every=1", "ray.num_cpus=2"], tmp_path / "data")


@pytest.fixture
def bench_ray(ray_overhead, tiny_cfg):
    """An isolated local Ray (2 CPUs, own temp dir) started by the benchmark's own start_ray,
    which retries when a loaded box makes the raylet miss Ray's registration window."""
    import ray

    ray_overhead.start_ray(tiny_cfg, attempts=5)
    yield
    ray.shutdown()


def test_ray_overhead_starts_a_ray_of_its_own(bench_ray):
    """Not slow, so that `make test-fast` too catches a broken start_ray (a duplicated ray.init
    keyword once broke it)."""
    import ray

    assert ray.is_initialized()
    assert ray.cluster_resources().get("CPU") == 2


# In CI: one Ray Train fit and one plain fit, 33 s on the idle 2-core box (2026-12-05); the
# same with the fit as a Ray task
@pytest.mark.parametrize("runner", ["task", "ray_train"])
def test_ray_overhead_runs_both_paths_with_equal_steps(bench_ray, ray_overhead, tiny_cfg,
                                                        tmp_path, runner):
    cfg = tiny_cfg.model_copy(
        update={"train": tiny_cfg.train.model_copy(update={"runner": runner})})
    lines = []
    runs, summary = ray_overhead.benchmark(cfg, tmp_path, repeats=1, loss_rtol=0.5,
                                           log=lines.append)
    ray_run, plain_run = runs
    assert (ray_run["kind"], plain_run["kind"]) == ("ray", "plain")
    assert ray_run["worker"]["runner"] == runner
    train_rows = ray_run["rows"]
    assert 20 <= train_rows <= 40  # ~70% of 48 faces
    # every batch of 8 but a last batch of one is a step, in both paths
    expected_steps = train_rows // 8 + (train_rows % 8 >= 2)
    assert ray_run["steps"] == plain_run["steps"] == expected_steps == summary["steps"]
    assert plain_run["rows"] == train_rows
    assert math.isfinite(ray_run["final_train_loss"]) and math.isfinite(
        plain_run["final_train_loss"])
    phases = ray_overhead.ray_phases(ray_run)
    assert phases["ray_start"] == 0.0  # Ray was already up (the fixture's)
    assert ray_run["cpu_s"] > 0 and plain_run["cpu_s"] > 0
    assert all(v >= 0 for k, v in phases.items() if k != "between_epochs"), phases
    assert phases["report_with_checkpoint"] > 0  # the one epoch is checkpointed
    # the phases account for the whole train_classifier call, give or take clock reads
    accounted = sum(v for k, v in phases.items() if k not in ("ray_start", "ray_shutdown"))
    assert accounted == pytest.approx(ray_run["fit_s"], abs=0.05)
    assert summary["ratio_ray_over_plain"] > 0
    ray_overhead.report(summary, log=lines.append)
    assert any("ratio ray/plain" in line for line in lines)


def test_expression_probe_trains_and_scores_the_clean_test_split(capsys):
    probe = _load("expression_probe")
    probe.main(["--faces", "150", "--epochs", "1", "--stem", "no_maxpool"])
    out = capsys.readouterr().out
    assert "stem no_maxpool, 32 px, 150 faces" in out and "clean test accuracy" in out
    assert out.count("\n") == 6  # the summary, the header and the 4 x 4 confusion matrix


def test_reproducibility_two_processes_train_the_same_classifier():
    """benchmarks/reproducibility.py at tiny size: two fresh processes (own Ray, own ingest)
    end with bit-identical weights (the cached split held in memory in order-key order)."""
    import subprocess

    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "reproducibility.py"), "--config",
         str(BENCHMARKS.parent / "jobs" / "configs" / "tiny.yaml"), "train.epochs=1"],
        capture_output=True, text=True, cwd=BENCHMARKS.parent, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("manifest rows out of sample order") == 2
    assert "max |w1 - w2| over the last checkpoint: 0 (reproduced)" in run.stdout, run.stdout


def test_edit_settings_fine_detail_energy_sees_speckle_not_smooth_change():
    """The speckle measure of benchmarks/edit_settings.py: a smooth brightness ramp has none, a
    uniform shift adds none, added pixel noise raises it."""
    import numpy as np

    hf_energy = _load("edit_settings").hf_energy
    ramp = np.broadcast_to(np.linspace(-1, 1, 16, dtype=np.float32), (2, 3, 16, 16)).copy()
    assert np.allclose(hf_energy(ramp), 0.0, atol=1e-10)
    assert np.allclose(hf_energy(ramp + 0.3), 0.0, atol=1e-10)
    noisy = ramp + 0.1 * np.random.default_rng(0).standard_normal(ramp.shape)
    assert (hf_energy(noisy) > 0.1).all()  # 20 * 0.01 per pixel in expectation


def test_label_sensitivity_benchmark_prints_tables_and_writes_json_and_grid(tmp_path, capsys):
    """benchmarks/label_sensitivity.py on a tiny labelled family model and 80 faces: the tables,
    the JSON and the grid (a row per grid face; original, reconstruction, 3 classes per scale)."""
    import json

    import numpy as np
    from PIL import Image

    from diffinf_ray.diffae.family import build_family, save_family
    from diffinf_ray.diffae.train_synthfaces import make_faces

    faces = make_faces(80, 20, seed=0)
    np.savez(tmp_path / "faces.npz", **faces)
    save_family(build_family("tiny", num_classes=3), tmp_path / "model")
    bench = _load("label_sensitivity")
    assert bench.main(["--model", str(tmp_path / "model"), "--faces", str(tmp_path / "faces.npz"),
                       "--images", "4", "--oracle-train", "40", "--steps", "3", "--scales", "1",
                       "3", "--depths", "2", "--json", str(tmp_path / "r.json"), "--grid",
                       str(tmp_path / "g.png"), "--grid-images", "3"]) == 0
    assert "partial inversion, depth 2" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert [s["scale"] for s in result["runs"][0]["scales"]] == [1.0, 3.0]
    assert result["arguments"]["steps"] == 3 and "commit" in result and result["machine"]["cpus"]
    with Image.open(tmp_path / "g.png") as grid:
        assert grid.size == (2 + (2 + 2 * 3) * 66, 2 + 3 * 66)

"""Look at the HTML reports the way a reader does: every picture embedded, every page rendered.

    python benchmarks/html_check.py PAGE.html ...          check these pages
    python benchmarks/html_check.py --samples              build the three pages from small
                                                           hand-made inputs, then check them
    python benchmarks/html_check.py --samples --out DIR    (default out: /tmp/html_check)

For each page it says how many images it embeds and names any that is not a self-contained
PNG (a `data:` URI that decodes as a PNG of nonzero size); then, when chromium (or
chromium-browser, google-chrome) is installed, it renders the page headless to
DIR/<page>.png (1200 px wide) for a person to look at, and says plainly when no browser is
installed (`apt-get install chromium` on Debian). Exit status 1 when a page has a broken image.

The samples (`build_samples`, also what tests/test_html_reports.py checks): the run report of a
hand-made run root (clean-test metrics of four conditions, three detectors' precision@k on
synthetic scores, TracIn's score histogram, 24 edits of synthfaces faces with the gate's
verdicts), the experiment table of three seeds with a clean ceiling and two other noise rates,
and `diffinf ledger --html` of hand-made ledger records. No training, no Ray: a few seconds.
"""

from __future__ import annotations

import argparse
import base64
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


# -- checking --------------------------------------------------------------------------------

def image_problems(page: str) -> tuple[list[tuple[str, tuple[int, int]]], list[str]]:
    """([(alt, (width, height))] of the page's embedded PNGs, [problems]): an image that is
    not a base64 `data:image/png` URI, does not decode as a PNG, or has no pixels."""
    from PIL import Image

    from diffinf_ray.render import page_images

    good, problems = [], []
    for alt, src in page_images(page):
        prefix = "data:image/png;base64,"
        if not src.startswith(prefix):
            problems.append(f"{alt or '(no alt)'}: not embedded ({src[:60]})")
            continue
        try:
            image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True)))
            image.load()
        except Exception as e:  # noqa: BLE001 - any decoding failure is the finding
            problems.append(f"{alt or '(no alt)'}: does not decode as a PNG ({e})")
            continue
        if image.format != "PNG" or min(image.size) == 0:
            problems.append(f"{alt or '(no alt)'}: {image.format} of size {image.size}")
            continue
        good.append((alt, image.size))
    return good, problems


def browser() -> str | None:
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 4000) -> None:
    """Render `page` headless with the installed browser to `png` (RuntimeError on failure)."""
    exe = browser()
    if exe is None:
        raise RuntimeError("no chromium installed")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--screenshot={png}", f"--window-size={width},{height}", page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not png.exists():
        raise RuntimeError(f"{exe} failed ({done.returncode}): {done.stderr[-500:]}")


# -- hand-made inputs ------------------------------------------------------------------------

def _metrics(acc: float, best: float) -> dict:
    return {"accuracy": acc, "auroc_macro_ovr": acc + 12, "kappa_linear": acc / 150,
            "ece": 0.05, "epoch": 10, "best_val": {"accuracy": best, "epoch": 7}}


def _detection(seed: int, n: int = 300, rate: float = 0.3) -> tuple[pd.DataFrame, dict]:
    """A training split with `rate` corrupted rows and three detectors' scores of increasing
    skill (loss, TracIn, the oracle), as the influence stage reports them."""
    from diffinf_ray.influence.detection import detection_report

    rng = np.random.default_rng(seed)
    corrupted = rng.random(n) < rate
    tracin = np.exp(rng.normal(0, 1, n) + 1.2 * corrupted)
    loss = rng.normal(0, 1, n) + 0.6 * corrupted
    reports = {name: detection_report(score, corrupted) for name, score in
               (("tracin", tracin), ("loss", loss), ("oracle", corrupted.astype(float)))}
    return pd.DataFrame({"score": tracin, "is_corrupted": corrupted}), reports


def _faces(n: int, seed: int) -> list[bytes]:
    from diffinf_ray.data.synthfaces import SynthFacesSpec, generate_batch

    return list(generate_batch(SynthFacesSpec(task="age", resolution=32, seed=seed),
                               np.arange(n))["image"])


def _run_inputs(cfg, root) -> None:
    from diffinf_ray.stages.influence import plot_detection

    for folder, acc, best in ((("evaluation",), 54.0, 56.5), (("removal", "evaluation"), 57.0, 58.0),
                              (("relabel", "evaluation"), 63.0, 64.0),
                              (("retrain", "evaluation"), 60.5, 61.0)):
        root.child(*folder, "metrics.json").write_json(_metrics(acc, best))
    scores, reports = _detection(cfg.run.seed)
    root.child("influence", "detection.json").write_json(reports)
    plot_detection(scores, reports, root.child("influence"))
    n = 24
    rng = np.random.default_rng(0)
    accepted = rng.random(n) < 0.6
    edits = pd.DataFrame({
        "sample_id": [f"s{i:03d}" for i in range(n)], "label": np.arange(n) % 3,
        "lpips": rng.uniform(0.05, 0.3, n), "identity_similarity": rng.uniform(0.6, 0.95, n),
        "p_high_before": rng.uniform(0.6, 0.95, n), "p_high_after": rng.uniform(0.1, 0.5, n),
        "gate_prediction": np.where(accepted, np.arange(n) % 3, (np.arange(n) + 1) % 3),
        "gate_confidence": np.where(accepted, rng.uniform(0.6, 0.9, n), rng.uniform(0.1, 0.4, n)),
        "gate_accepted": accepted,
        "image_original": _faces(n, 1), "image": _faces(n, 2)})
    root.child("edits", "edits.parquet").write_bytes(edits.to_parquet(index=False))
    root.child("lossnets", "lossnets.json").write_json(
        {"perceptual": {"name": "lpips (alex)"}, "identity": {"kind": "trained"}})
    for stage, seconds in (("ingest", 3.5), ("train", 95.0), ("influence", 40.0)):
        root.child("stages", f"{stage}.json").write_json(
            {"stage": stage, "status": "done", "wall_seconds": seconds})


def _experiment_inputs(exp, grid: bytes) -> None:
    from diffinf_ray import experiment as ex
    from diffinf_ray.run_root import RunRoot

    gains = {"evaluation": 0.0, "removal": 3.0, "relabel": 8.0, "retrain": 5.0}
    for run in ex.plan(exp):
        root = RunRoot(run.root)
        noise = 55.0 - 0.8 * (run.seed * 2 - 2)  # seed 0 easiest; each seed a shared shift
        if run.kind == "clean":
            root.child("evaluation", "metrics.json").write_json(_metrics(72.0 + run.seed, 73))
            continue
        if run.kind != "methods":
            root.child("evaluation", "metrics.json").write_json(
                _metrics(75 - 60 * run.noise_rate + run.seed, 70))
            continue
        for stage, gain in gains.items():
            folder = (stage,) if stage == "evaluation" else (stage, "evaluation")
            acc = noise + gain + (1.5 * np.sin(run.seed + gain) if gain else 0.0)
            root.child(*folder, "metrics.json").write_json(_metrics(float(acc), float(acc) + 1))
        root.child("influence", "detection.json").write_json(_detection(run.seed)[1])
        root.child("report", "grid_young.png").write_bytes(grid)


def _ledger_rows():
    """paired_differences rows of hand-made records: three settings of three seeds (one an
    oracle control) and one setting run once."""
    from diffinf_ray.ledger import paired_differences

    records = []
    for setting, method, gain, seeds in (("aaaa", "guided", 2.0, 3), ("bbbb", "oracle_repair", 6.0, 3),
                                         ("cccc", "latent", -1.0, 3), ("dddd", "guided", 1.0, 1)):
        for seed in range(seeds):
            records.append({
                "setting": setting, "seed": seed, "run": "sample", "task": "age",
                "noise": {"rate": 0.3}, "config": {"edit": {"method": method},
                                                   "variant": setting},
                "commit": "x", "date": f"2026-01-0{seed + 1}",
                "metrics": {"noisy": {"accuracy": 55.0 + seed},
                            "diffinf": {"accuracy": 55.0 + seed + gain + (seed - 1) * 1.5}}})
    return paired_differences(records, "diffinf", "noisy", "accuracy", head="x")


def build_samples(folder: Path) -> dict[str, Path]:
    """Write the three sample pages under `folder`; {name: page}: run_report, experiment,
    ledger."""
    from diffinf_ray import experiment as ex
    from diffinf_ray.config import load_config
    from diffinf_ray.ledger import paired_html
    from diffinf_ray.run_root import RunRoot
    from diffinf_ray.stages.report import run_report

    folder = Path(folder)
    cfg = load_config(TINY, {"run.root": str(folder / "run"), "run.name": "sample run",
                             "data.task": "age", "noise.rate": 0.3})
    root = RunRoot(cfg.run.root)
    _run_inputs(cfg, root)
    run_report(cfg, root)

    exp = ex.ExperimentConfig(name="sample", root=str(folder / "experiment"), base=str(TINY),
                              seeds=[0, 1, 2], tasks={"age": {"data.task": "age",
                                                              "noise.rate": 0.3}},
                              noise_rates=[0.1, 0.5])
    _experiment_inputs(exp, (folder / "run" / "report" / "grid_young.png").read_bytes())
    ex.write_table(exp)

    ledger = folder / "ledger" / "ledger.html"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.write_text(paired_html(_ledger_rows(), "diffinf", "noisy", "accuracy",
                                  "hand-made records"))
    return {"run_report": folder / "run" / "report" / "report.html",
            "experiment": folder / "experiment" / "table" / "table.html", "ledger": ledger}


# -- command ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", type=Path, help="HTML pages to check")
    parser.add_argument("--samples", action="store_true",
                        help="build the sample run report, experiment table and ledger page")
    parser.add_argument("--out", type=Path, default=Path("/tmp/html_check"),
                        help="screenshots (and the samples) go here (default /tmp/html_check)")
    args = parser.parse_args(argv)
    pages = {p.stem if p.stem not in ("report", "table") else f"{p.parent.parent.name}_{p.stem}": p
             for p in args.pages}
    if args.samples:
        pages.update(build_samples(args.out / "samples"))
    if not pages:
        parser.error("name a page or pass --samples")
    args.out.mkdir(parents=True, exist_ok=True)
    exe = browser()
    if exe is None:
        print("no headless browser: chromium is not installed (Debian: apt-get install -y "
              "chromium); checking the embedded images only")
    broken = 0
    for name, page in pages.items():
        good, problems = image_problems(page.read_text())
        broken += len(problems)
        print(f"{page}: {len(good)} embedded PNGs"
              + "".join(f"\n  {alt} {w}x{h}" for alt, (w, h) in good)
              + "".join(f"\n  BROKEN {p}" for p in problems))
        if exe is not None:
            png = args.out / f"{name}.png"
            screenshot(page, png)
            print(f"  screenshot: {png}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

"""A small measurement of one cell's generators on synthfaces (docs/FAIRNESS_GENERATORS.md):

    python -m diffinf_ray.fairness_gen.measure --out /tmp/fairgen_measure [--steps 200]

Takes the shipped 32 px autoencoder (models/synthfaces32_diffae, 3 age bins), one synthfaces
draw (its train rows' (age bin, skin-tone group) cells), fits a LoRA generator on one cell
(`--label`, `--group`), and samples `--samples` images from four generators:

    vanilla/label   base model, z prior of every train image with the label (no group at all)
    vanilla/cell    base model, z prior of the cell
    lora/label      the cell's LoRA model, z prior of the label (what the adapter alone adds)
    lora/cell       the cell's LoRA model, z prior of the cell (the `lora` variant)

Each set is judged by independent judges: logistic regressions on 8x8-pooled pixels, trained on
a second synthfaces draw (another seed: other people) to predict the skin-tone group and the
age bin; their accuracy on that draw's test split is reported beside the shares. Runs in one
process, without Ray (the same fine-tune and sampling code the Ray tasks and actors run).
Writes <out>/measure.json and a PNG grid per generator.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffinf_ray.fairness_gen.cells import Cell, cells_of, to_tensor
from diffinf_ray.fairness_gen.settings import FinetuneSettings
from diffinf_ray.fairness_gen.zprior import ZPrior


def draw(seed: int, n: int, identities: int) -> dict:
    from diffinf_ray.data.synthfaces import SynthFacesSpec, generate_batch

    spec = SynthFacesSpec(resolution=32, with_masks=False, seed=seed, num_identities=identities)
    return generate_batch(spec, np.arange(n))


def pooled(images: torch.Tensor) -> np.ndarray:
    """(N, 3, 32, 32) in [-1, 1] -> (N, 192) features: 4x4 mean-pooled pixels."""
    return torch.nn.functional.avg_pool2d(images.float(), 4).flatten(1).numpy()


def fit_judges(data: dict) -> tuple[dict, dict]:
    """Logistic regressions predicting group and label from pooled pixels; their test
    accuracy on the same draw's held-out people."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = pooled(to_tensor(list(data["image"])))
    train, test = data["split"] != "test", data["split"] == "test"
    judges, accuracy = {}, {}
    for target in ("group", "label"):
        y = np.asarray(data[target]).astype(str)
        judge = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
        judges[target] = judge.fit(x[train], y[train])
        accuracy[target] = float(judge.score(x[test], y[test]))
    return judges, accuracy


def share(judges: dict, images: torch.Tensor, cell: Cell) -> dict:
    x = pooled(images)
    return {"group_share": float(np.mean(judges["group"].predict(x) == cell.group)),
            "label_share": float(np.mean(judges["label"].predict(x) == str(cell.label)))}


def save_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    from PIL import Image

    pix = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    rows = [np.concatenate(list(pix[i:i + columns]), axis=1)
            for i in range(0, len(pix) - len(pix) % columns, columns)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def priors(base, cells, cell: Cell) -> tuple[ZPrior, ZPrior]:
    """(z prior of every train image with the cell's label, z prior of the cell)."""
    with torch.no_grad():
        codes = {c: base.encode(to_tensor(r.images)).numpy() for c, r in cells.items()
                 if c.label == cell.label}
    return ZPrior.fit(np.concatenate(list(codes.values()))), ZPrior.fit(codes[cell])


def note(message: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {message}", file=sys.stderr, flush=True)


def run(args) -> dict:
    from diffinf_ray.fairness_gen.finetune import finetune_lora
    from diffinf_ray.fairness_gen.generator import load_base, resolve_base
    from diffinf_ray.fairness_gen.lora import count_parameters
    from diffinf_ray.fairness_gen.sampling import sample_images

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data, judge_data = draw(0, args.faces, args.faces // 3), draw(1, args.faces, args.faces // 3)
    judges, judge_accuracy = fit_judges(judge_data)
    note(f"draws and judges ready (judge test accuracy {judge_accuracy})", t0)
    train = data["split"] == "train"
    cells = cells_of(data["sample_id"][train], list(data["image"][train]), data["label"][train],
                     data["group"][train])
    cell = Cell(args.label, args.group)
    base = load_base(resolve_base("synthfaces32_diffae"))
    label_prior, cell_prior = priors(base, cells, cell)
    seeds = list(range(args.samples))
    result = {"cell": cell.name, "cell_images": len(cells[cell].images),
              "judge_test_accuracy": judge_accuracy,
              "real_cell": share(judges, to_tensor(cells[cell].images), cell), "generators": {}}
    settings = FinetuneSettings(method="lora", steps=args.steps, batch_size=args.batch_size,
                                rank=args.rank, alpha=args.rank, lr=args.lr)
    models = {"vanilla": base}
    tuned, fit = finetune_lora(load_base(resolve_base("synthfaces32_diffae")),
                               to_tensor(cells[cell].images), cell.label, settings)
    models["lora"] = tuned
    note(f"LoRA fine-tune: {fit['steps']} steps in {fit['seconds']:.0f} s", t0)
    trainable, total = count_parameters(tuned)
    result["lora_fit"] = {k: v for k, v in fit.items() if k != "lora_targets"}
    result["lora_fit"].update(trainable=trainable, base_parameters=total - trainable,
                              settings=settings.to_dict())
    for kind, model in models.items():
        for prior_name, prior in (("label", label_prior), ("cell", cell_prior)):
            start = time.perf_counter()
            images = sample_images(model, prior, cell.label, seeds, args.sample_steps)
            name = f"{kind}/{prior_name}"
            result["generators"][name] = {**share(judges, images, cell),
                                          "seconds_per_image":
                                          (time.perf_counter() - start) / len(seeds)}
            save_grid(images, out / f"{kind}_{prior_name}.png")
            note(f"{name}: {result['generators'][name]}", t0)
            (out / "measure.json").write_text(json.dumps(result, indent=2) + "\n")
    result["seconds_total"] = time.perf_counter() - t0
    (out / "measure.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--faces", type=int, default=900)
    parser.add_argument("--label", type=int, default=1)
    parser.add_argument("--group", default="tone_dark")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--sample-steps", type=int, default=10)
    print(json.dumps(run(parser.parse_args(argv)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

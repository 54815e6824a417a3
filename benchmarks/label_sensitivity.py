"""The label-sensitivity diagnostic on a family autoencoder, without Ray and without a run root.

The oracle is a linear classifier of the true age bin on raw pixels (scikit-learn, fit on
3,000 train-split faces of the trainer's synthfaces draw): an independent reader that needs no
Ray Train, so this runs anywhere torch runs (a GPU machine included). `diffinf diagnose-labels`
is the same diagnostic with the judges' attribute oracle of a pipeline run.

    python benchmarks/label_sensitivity.py --model synthfaces32_diffae --faces FACES.npz \
        --images 60 --depths full 5 [--grid GRID.png]

`--grid` also writes what the reader was shown for the first `--grid-images` faces (a row per
face: original, null-label reconstruction, one decode per scale and class), at the first depth.

FACES.npz: the faces cache of `python -m diffinf_ray.diffae.train_synthfaces train` (its
default draw: 12,000 faces of 2,400 people, seed 0); images come from its test split (people
the shipped autoencoder never saw).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from diffinf_ray.diffae.family import load_family
from diffinf_ray.diffae.label_sensitivity import (
    format_label_sensitivity,
    label_sensitivity,
    label_sensitivity_grid,
)

CLASS_NAMES = ["young", "middle", "old"]


def pixel_oracle(images: np.ndarray, labels: np.ndarray):
    """A classify(x in [-1, 1]) -> labels fit on uint8 `images` (N, H, W, 3)."""
    from sklearn.linear_model import LogisticRegression

    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(flat, labels)

    def classify(x: torch.Tensor) -> np.ndarray:
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).cpu().numpy()
        return clf.predict(u8.reshape(len(u8), -1) / 255.0)

    return classify


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="synthfaces32_diffae", help="shipped name or folder")
    p.add_argument("--faces", required=True, help="faces .npz of train_synthfaces")
    p.add_argument("--images", type=int, default=60)
    p.add_argument("--oracle-train", type=int, default=3000)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    p.add_argument("--depths", nargs="+", default=["full"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="", help="also write the result here")
    p.add_argument("--grid", default="", help="also write a PNG of the decodes here")
    p.add_argument("--grid-images", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with np.load(args.faces) as d:
        images, age, split = d["images"], d["age_bin"], d["split"]
    train = np.flatnonzero(split == "train")[:args.oracle_train]
    test = np.flatnonzero(split == "test")
    pick = np.sort(np.random.default_rng(0).choice(test, args.images, replace=False))
    classify = pixel_oracle(images[train], age[train])
    model = load_family(args.model, map_location=args.device).eval()
    x = (torch.from_numpy(images[pick]).permute(0, 3, 1, 2).float() / 127.5 - 1).to(args.device)
    depths = [None if d == "full" else int(d) for d in args.depths]
    started = time.time()
    result = label_sensitivity(model, x, age[pick], classify, len(CLASS_NAMES),
                               scales=args.scales, steps=args.steps, depths=depths)
    print(format_label_sensitivity(result, CLASS_NAMES))
    print(f"\n{time.time() - started:.0f} s on {args.device}")
    if args.json:
        from pathlib import Path

        from diffinf_ray.ledger import provenance

        # where the figures came from: the code, the box, the settings
        with open(args.json, "w") as f:
            json.dump({**result, "model": args.model, "oracle": "pixel logistic regression",
                       **provenance(Path(__file__).resolve().parent), "arguments": vars(args)},
                      f, indent=1)
    if args.grid:
        from diffinf_ray.data.images import encode_png

        grid = label_sensitivity_grid(model, x[:args.grid_images], len(CLASS_NAMES),
                                      scales=args.scales, steps=args.steps, depth=depths[0])
        with open(args.grid, "wb") as f:
            f.write(encode_png(grid))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

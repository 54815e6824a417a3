"""Can the classifier learn synthfaces expression from clean labels? (issue 15, item 5)

The project's classifier (ResNet-18 + head, `models/classifier.py`) and the train stage's recipe
(Adam, lr 1e-4, batch 64, horizontal flips) in a plain one-process loop on clean labels, scored
on the clean test split (people never seen in training). No Ray, no noise: it asks whether the
task is learnable at a size, not how a stage performs.

    python benchmarks/expression_probe.py --resolution 32 --faces 1500 --epochs 8
    python benchmarks/expression_probe.py --resolution 48 --faces 4000 --stem no_maxpool

Prints the test accuracy, the accuracy on weak-intensity rows (the genuinely ambiguous ones)
and the rest, and the row-normalised confusion matrix. Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix

from diffinf_ray.data.synthfaces import (
    EXPRESSION_CLASSES,
    WEAK_INTENSITY,
    SynthFacesSpec,
    identity_of,
    label_of,
    render,
    sample_factors,
    split_of,
)
from diffinf_ray.models.classifier import build_classifier
from diffinf_ray.models.harness import random_hflip


def faces(resolution: int, n: int, seed: int, gain: float | None = None):
    spec = SynthFacesSpec(task="expression", resolution=resolution, seed=seed,
                          num_identities=max(1, n // 5), expression_gain=gain)
    images, labels, splits, intensity = [], [], [], []
    for i in range(n):
        f = sample_factors(spec, i)
        images.append(render(f, resolution, False)[0])
        labels.append(label_of(spec, f))
        intensity.append(f.intensity)
        splits.append(split_of(spec, identity_of(spec, i)))
    x = torch.tensor(np.array(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.tensor(labels), np.array(splits), np.array(intensity)


def classifier(stem: str):
    model = build_classifier(len(EXPRESSION_CLASSES))
    if stem in ("no_maxpool", "cifar"):  # keep 2x / 4x more resolution in the feature maps
        model.backbone.maxpool = torch.nn.Identity()
    if stem == "cifar":
        model.backbone.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--faces", type=int, default=1500)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--stem", choices=["imagenet", "no_maxpool", "cifar"], default="imagenet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (train.lr)")
    p.add_argument("--gain", type=float, default=None,
                   help="expression gain (default: the expression task's, EXPRESSION_GAIN)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y, splits, intensity = faces(args.resolution, args.faces, args.seed, args.gain)
    train, test = torch.tensor(splits == "train"), splits == "test"
    torch.manual_seed(args.seed)
    model = classifier(args.stem)
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    x_train, y_train = x[train], y[train]
    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train))
        for b in range(0, len(y_train), 64):
            idx = order[b:b + 64]
            if len(idx) < 2:  # BatchNorm cannot train on one sample
                continue
            loss = F.cross_entropy(model(random_hflip(x_train[idx])), y_train[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        predicted = model(x[torch.tensor(test)]).argmax(1).numpy()
    truth = y[torch.tensor(test)].numpy()
    right = predicted == truth
    weak = (intensity[test] >= WEAK_INTENSITY[0]) & (intensity[test] <= WEAK_INTENSITY[1])
    print(f"gain {SynthFacesSpec(task='expression', expression_gain=args.gain).expression_gain:g}, "
          f"stem {args.stem}, {args.resolution} px, {args.faces} faces "
          f"({int(train.sum())} train, {int(test.sum())} test), {args.epochs} epochs, lr {args.lr:g}: "
          f"clean test accuracy {right.mean():.3f} (weak-intensity rows {right[weak].mean():.3f}, "
          f"others {right[~weak].mean():.3f}); training {time.perf_counter() - start:.0f} s")
    print("confusion (rows: truth, columns: prediction;", ", ".join(EXPRESSION_CLASSES) + ")")
    print(confusion_matrix(truth, predicted, normalize="true",
                           labels=range(len(EXPRESSION_CLASSES))).round(2))


if __name__ == "__main__":
    main()

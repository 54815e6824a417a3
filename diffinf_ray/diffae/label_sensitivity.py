"""Does the autoencoder's label path carry the attribute? (the label-sensitivity diagnostic)

Invert each image under the null label (so x_T and z hold no assigned label), decode it under
every class c with classifier-free guidance scale s, and ask an independent classifier (the
judges' attribute oracle) what it sees. If the label path carries the attribute, the oracle
agrees with c whatever the image showed before; if it does not, the oracle keeps reading the
original attribute (or chance). The edit stage relies on that path, so this says whether an
edit towards a label can work at all with this autoencoder.

    label_sensitivity(model, images, true_labels, classify, num_classes, ...) -> dict
    format_label_sensitivity(result) -> str          the confusion tables, for a console
    label_sensitivity_grid(model, images, ...)       what the oracle was shown, as one image:
                                                     per face, the original, the null-label
                                                     reconstruction, then one decode per
                                                     (scale, class)

Full inversion (depth None) follows the official loops; `depths` also tries partial inversions
(`NoiseSchedule.inversion_steps(S, k)`: the decode starts part-way, so more of the image and
less of the label survive). Decoded images are quantised to 8 bits, as a written PNG would be.
Ray-free: the `diffinf diagnose-labels` command runs it on a run's autoencoder and judges.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from diffinf_ray.diffae.autoencoder import decode, invert
from diffinf_ray.diffae.labels import NULL_LABEL

Classify = Callable[[torch.Tensor], np.ndarray]  # (B, 3, H, W) in [-1, 1] -> (B,) class ids


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as they come back from an 8-bit PNG."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def _confusion(given: np.ndarray, predicted: np.ndarray, num_classes: int) -> list[list[float]]:
    """Row g: the share of images with `given` label g that the classifier calls each class."""
    rows = []
    for g in range(num_classes):
        picked = predicted[given == g]
        counts = np.bincount(picked, minlength=num_classes)[:num_classes]
        rows.append((counts / max(len(picked), 1)).round(4).tolist())
    return rows


@torch.no_grad()
def _decode_all(model, z, x_T, label: int, steps, scale, depth, batch_size) -> torch.Tensor:
    out = []
    for i in range(0, len(z), batch_size):
        part = slice(i, i + batch_size)
        y = torch.full((len(z[part]),), label, dtype=torch.long, device=z.device)
        out.append(quantise(decode(model, z[part], x_T[part], y, steps, checkpoint=False,
                                   guidance_scale=scale, depth=depth)))
    return torch.cat(out)


@torch.no_grad()
def _invert_all(model, images, steps, depth, batch_size):
    zs, xs = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        z = model.encode(x)
        null = torch.full((len(x),), NULL_LABEL, dtype=torch.long, device=x.device)
        zs.append(z)
        xs.append(invert(model, x, z, null, steps, checkpoint=False, depth=depth))
    return torch.cat(zs), torch.cat(xs)


def label_sensitivity(
    model,
    images: torch.Tensor,
    true_labels: np.ndarray,
    classify: Classify,
    num_classes: int,
    *,
    scales: Sequence[float] = (1.0, 3.0, 5.0),
    steps: int = 10,
    depths: Sequence[int | None] = (None,),
    batch_size: int = 64,
) -> dict:
    """The oracle's view of null-label reconstructions and of label-guided decodes.

    images (N, 3, H, W) in [-1, 1] with their true classes. Returns
    {"oracle_on_originals": accuracy, "runs": [one per depth: {"depth", "reconstruction":
    accuracy of the oracle on the null-label decodes, "scales": [{"scale", "confusion" (row c:
    what the oracle calls the images decoded under label c), "agreement" (mean of the
    diagonal: the issue's "oracle agrees with the decode label, averaged over the classes"),
    "agreement_changed" (the same, counting per class only the images whose true class is
    another: the decodes that had to move the attribute),
    "mse_true_label" / "mse_other_labels" (mean squared distance, on [-1, 1], of each image's
    decode under its true class / under the other classes to the image itself)}]}]}.
    """
    if not model.config.num_classes:
        raise ValueError("this autoencoder has no label path (num_classes = 0): nothing to test")
    if model.config.num_classes != num_classes:
        raise ValueError(f"the autoencoder takes {model.config.num_classes} labels, the oracle "
                         f"{num_classes}: they judge different tasks")
    model.eval()
    true_labels = np.asarray(true_labels)
    result = {"images": int(len(images)), "steps": int(steps), "num_classes": int(num_classes),
              "oracle_on_originals": float((classify(images) == true_labels).mean()), "runs": []}
    for depth in depths:
        z, x_T = _invert_all(model, images, steps, depth, batch_size)
        rec = _decode_all(model, z, x_T, NULL_LABEL, steps, 1.0, depth, batch_size)
        run = {"depth": depth, "reconstruction": float((classify(rec) == true_labels).mean()),
               "reconstruction_mse": float(((rec - images) ** 2).mean()), "scales": []}
        for scale in scales:
            given, predicted, moved = [], [], []
            for c in range(num_classes):
                decoded = _decode_all(model, z, x_T, c, steps, scale, depth, batch_size)
                given.append(np.full(len(decoded), c))
                predicted.append(np.asarray(classify(decoded)))
                moved.append(((decoded - images) ** 2).flatten(1).mean(1).cpu().numpy())
            confusion = _confusion(np.concatenate(given), np.concatenate(predicted), num_classes)
            # the same agreement over the decodes that had to change the attribute (true class
            # != decode class): an image decoded under its own class may simply keep it
            changed = [float((p[true_labels != c] == c).mean()) for c, p in enumerate(predicted)
                       if (true_labels != c).any()]
            # how far the decodes went from the face: agreement bought by drawing another face
            # would show here (per image: its decode under its own true class / under the others)
            moved = np.stack(moved, 1)
            own = moved[np.arange(len(moved)), true_labels]
            others = (moved.sum(1) - own) / max(num_classes - 1, 1)
            run["scales"].append({"scale": float(scale), "confusion": confusion,
                                  "agreement": float(np.mean(np.diag(confusion))),
                                  "agreement_changed": float(np.mean(changed)) if changed
                                  else float("nan"),
                                  "mse_true_label": float(own.mean()),
                                  "mse_other_labels": float(others.mean())})
        result["runs"].append(run)
    return result


@torch.no_grad()
def label_sensitivity_grid(model, images: torch.Tensor, num_classes: int, *,
                           scales: Sequence[float] = (1.0, 3.0, 5.0), steps: int = 10,
                           depth: int | None = None, batch_size: int = 64) -> np.ndarray:
    """(H, W, 3) uint8: a row per image: original | null-label reconstruction | decodes under
    class 0..C-1 at scales[0] | ... at scales[1] | ... (the decodes `label_sensitivity` judges)."""
    from diffinf_ray.diffae.quality import image_grid

    model.eval()
    z, x_T = _invert_all(model, images, steps, depth, batch_size)
    columns = [images, _decode_all(model, z, x_T, NULL_LABEL, steps, 1.0, depth, batch_size)]
    for scale in scales:
        columns += [_decode_all(model, z, x_T, c, steps, scale, depth, batch_size)
                    for c in range(num_classes)]
    return image_grid([[col[i] for col in columns] for i in range(len(images))])


def format_label_sensitivity(result: dict, class_names: Sequence[str] | None = None) -> str:
    """Plain-text tables: per depth and scale, rows = decode label, columns = oracle's call."""
    k = result["num_classes"]
    names = list(class_names) if class_names else [str(c) for c in range(k)]
    lines = [f"{result['images']} images, S = {result['steps']}; the oracle reads "
             f"{result['oracle_on_originals']:.2f} of the originals right (chance "
             f"{1 / k:.2f})"]
    for run in result["runs"]:
        depth = "full inversion" if run["depth"] is None else f"partial inversion, depth {run['depth']}"
        lines += ["", f"{depth}: null-label reconstruction MSE {run['reconstruction_mse']:.4f}, "
                      f"the oracle reads {run['reconstruction']:.2f} of them right"]
        header = "decode label \\ oracle says | " + " | ".join(names)
        for s in run["scales"]:
            moved = (f"; MSE to the original {s['mse_true_label']:.4f} under its true label, "
                     f"{s['mse_other_labels']:.4f} under the others" if "mse_true_label" in s
                     else "")
            changed = (f" ({s['agreement_changed']:.2f} where the true class is another)"
                       if "agreement_changed" in s else "")
            lines += [f"  guidance {s['scale']:g}: agreement {s['agreement']:.2f}{changed}{moved}",
                      "    " + header]
            for name, row in zip(names, s["confusion"], strict=True):
                lines.append(f"    {name:>26} | " + " | ".join(f"{v:.2f}" for v in row))
    return "\n".join(lines)

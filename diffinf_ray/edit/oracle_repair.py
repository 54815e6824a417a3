"""The oracle repair (`edit.method: oracle_repair`, synthfaces only): the ceiling for any editor.

synthfaces knows how each of its images was drawn, so a flagged row can be *repaired* exactly:
its face is drawn again with the same person, pose, light, background, clothing and sensor
noise, and only the task's attribute changed to one inside the assigned label (age: a new age
drawn uniformly in the label's bin; expression: the label's expression at a clear intensity).
No editor can do better at showing the label while keeping everything else, so the gap between
this row and a real edit method's is what the editor leaves on the table, and the gap between
this row and removal is what the flagged set allows at best.

It gives the same outputs as the other editors (editor.LatentEditor's keys), with the loss
terms measured on the repair, `iterations` 0 and `reconstruction_mse` NaN (nothing is
reconstructed). Each repair is seeded by `edit.seed` and the sample's index: it does not depend
on the batch.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch

from diffinf_ray.data.synthfaces import (
    CLEAR_INTENSITY,
    EXPRESSION_CLASSES,
    FaceFactors,
    SynthFacesSpec,
    render,
    sample_factors,
)
from diffinf_ray.edit.editor import check_edit_inputs, freeze, freeze_loss_networks
from diffinf_ray.edit.losses import TERMS

NEUTRAL = EXPRESSION_CLASSES.index("neutral")
_SAMPLE_ID = re.compile(r"^sf(\d+)_(\d+)$")


def sample_index(sample_id: str, spec: SynthFacesSpec) -> int:
    """The synthfaces index of `sample_id` ("sf<seed>_<index>"), checked against `spec`'s seed."""
    match = _SAMPLE_ID.match(str(sample_id))
    if match is None:
        raise ValueError(f"oracle_repair: {sample_id!r} is not a synthfaces sample id "
                         "(sf<seed>_<index>): the oracle repair needs data.source synthfaces")
    seed, index = int(match.group(1)), int(match.group(2))
    if seed != spec.seed:
        raise ValueError(f"oracle_repair: {sample_id!r} was drawn with seed {seed}, the run's "
                         f"data with seed {spec.seed}")
    return index


def repaired_factors(spec: SynthFacesSpec, factors: FaceFactors, label: int,
                     rng: np.random.Generator) -> FaceFactors:
    """`factors` with the task's attribute redrawn inside class `label`; all else kept."""
    if spec.task == "age":
        lo, hi = spec.age_bins[int(label)]
        return dataclasses.replace(factors, age=float(rng.uniform(lo, hi)))
    intensity = 0.0 if int(label) == NEUTRAL else float(rng.uniform(*CLEAR_INTENSITY))
    return dataclasses.replace(factors, expression=int(label), intensity=intensity)


def repair_images(spec: SynthFacesSpec, sample_ids, labels, seed: int) -> np.ndarray:
    """(B, H, W, 3) uint8: each sample drawn again showing its label (module docstring)."""
    out = []
    for sample_id, label in zip(sample_ids, np.asarray(labels).tolist(), strict=True):
        index = sample_index(sample_id, spec)
        factors = repaired_factors(spec, sample_factors(spec, index), int(label),
                                   np.random.default_rng([seed, index]))
        out.append(render(factors, spec.resolution, with_mask=False)[0])
    return np.stack(out)


class OracleRepairEditor:
    """Editor interface (edit/methods.py) over `repair_images`; the classifier, h_w and the
    loss networks only measure the repair, as they measure every other method's edit."""

    def __init__(self, spec: SynthFacesSpec | None, classifier, predictor, losses, w_si: float,
                 seed: int, device: str | torch.device = "cpu"):
        if spec is None:
            raise ValueError("edit.method 'oracle_repair' needs data.source synthfaces: only "
                             "there is each image's drawing known")
        self.spec, self.seed, self.w_si = spec, int(seed), float(w_si)
        self.device = torch.device(device)
        self.classifier = freeze(classifier, self.device)
        self.predictor = freeze(predictor, self.device)
        self.losses = losses
        freeze_loss_networks(losses, self.device)

    def _p_high(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.predictor.p_high(self.classifier.features(images), labels)

    @torch.no_grad()
    def edit(self, images: torch.Tensor, labels: torch.Tensor, sample_ids=None,
             return_latents: bool = False) -> dict[str, np.ndarray]:
        if sample_ids is None:
            raise ValueError("oracle_repair edits by sample id: pass sample_ids")
        x, y = check_edit_inputs(images, labels, self.spec.resolution, self.device)
        pixels = repair_images(self.spec, list(sample_ids), y.cpu().numpy(), self.seed)
        edited = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(x)
        terms = self.losses.terms(edited, self.losses.reference(x))
        distance = self.losses.combine(terms)
        p_before, p_after = self._p_high(x, y), self._p_high(edited, y)
        out = {"edited": edited, "p_high_before": p_before, "p_high_after": p_after,
               "loss_si": p_after, "loss_total": distance + self.w_si * p_after,
               "reconstruction_mse": torch.full_like(p_after, float("nan")),
               "iterations": torch.zeros_like(y), "stopped": torch.zeros_like(y, dtype=torch.bool)}
        out.update({f"loss_{name}": terms[name] for name in TERMS})
        return {k: v.detach().cpu().numpy() for k, v in out.items()}

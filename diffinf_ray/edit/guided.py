"""The gradient-free editor: partial inversion under the null label, a label-guided decode, a
DiffAE-style shift of z toward the assigned label, and the closest of a few candidates.

    edit(images (B, 3, H, W) in [-1, 1], labels (B,) int64) -> dict of numpy arrays

The same call and output keys as `editor.LatentEditor` (so the edit stage, refine, report and
oracle read either), but no gradient and no classifier in the loop. Per batch, under no_grad:

1. z = E(x). z' = denorm(norm(z) + alpha * sqrt(d) * w_y / ||w_y||): DiffAE's attribute
   manipulation (Preechakul et al. 2022, `manipulate.ipynb`) with w_y the class-y row of a
   linear classifier on *normalised* z (`fit_class_directions`; alpha 0 leaves z as it is).
2. x_t0 = the first k of S steps of the deterministic DDIM inversion of x under the NULL label
   with z, k = max(1, round(t0 * S)) (t0 = 1: the full inversion). The null label keeps the
   assigned (possibly wrong) label out of x_t0.
3. N candidates, each decoded from level tau_k under the ASSIGNED label with classifier-free
   guidance scale s and z': candidate 0 from x_t0 (DDIB-style, deterministic), candidates
   1..N-1 from an SDEdit noising of x at the same level, sqrt(abar) x + sqrt(1 - abar) eps,
   with fresh eps each.
4. Per image, the candidate with the lowest distance losses.combine(losses.terms(x_hat, x))
   (identity + structure + perceptual + pixel) is kept. The influence predictor never chooses;
   h_w's p_high (classifier g + predictor) is computed before and after for the record only.

Outputs (numpy, first axis B), as LatentEditor's: edited (clamped to [-1, 1]); loss_id,
loss_struct, loss_perc, loss_pixel of the kept candidate; loss_si = p_high_after = h_w on it;
loss_total = combine + w_si * loss_si (the latent editor's objective, so totals compare across
methods; the selection used combine alone); p_high_before (h_w on the original);
loss_total_initial and reconstruction_mse of the null-label reconstruction (x_t0 decoded under
the null label with z, scale 1, unclamped for the MSE; NaN with `reconstruct` False); iterations (int64, always 0: nothing is
optimised); stopped (bool, always False: nothing stops early). With `return_latents`: z, z_edit
(z'), x_t0, candidate_distance (B, N) and chosen (B,) int64.

Deterministic for `settings.seed` (decodes are eta = 0; each image's SDEdit noise comes from a
generator seeded by the seed and the image's pixels, `sdedit_noise`): bitwise on CPU; on GPU up
to cuDNN's non-deterministic kernels. As in LatentEditor, a batch is B independent edits: an
image's edit does not depend on the other images in its batch (up to float rounding). Cost per
batch: about 2 * (k + 1) UNet passes per candidate (guidance doubles the batch), plus k
inversion and (with `reconstruct`) k + 1 reconstruction passes; no backward.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffinf_ray.diffae.autoencoder import DiffusionAutoencoder, decode, invert
from diffinf_ray.diffae.labels import NULL_LABEL
from diffinf_ray.edit.editor import check_edit_inputs, freeze, freeze_loss_networks
from diffinf_ray.edit.losses import TERMS, EditLosses
from diffinf_ray.edit.predictor import InfluencePredictor
from diffinf_ray.models.classifier import AttributeClassifier
from diffinf_ray.storage import Location

log = logging.getLogger(__name__)


# -- the class directions in z ------------------------------------------------------------------
@dataclass(frozen=True)
class ZDirections:
    """z statistics of the training rows and one unit direction per class in normalised z.

    mean, std: (d,); directions: (C, d), each row unit length (all zeros for a class that had
    no training rows: such a class is not shifted)."""

    mean: np.ndarray
    std: np.ndarray
    directions: np.ndarray

    def __post_init__(self):
        d = self.mean.shape
        if self.mean.ndim != 1 or self.std.shape != d or self.directions.ndim != 2 or \
                self.directions.shape[1] != d[0]:
            raise ValueError(f"ZDirections: mean {self.mean.shape}, std {self.std.shape} and "
                             f"directions {self.directions.shape} do not fit (d,), (d,), (C, d)")

    @property
    def num_classes(self) -> int:
        return int(self.directions.shape[0])

    def shift(self, z: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
        """denorm(norm(z) + alpha * sqrt(d) * direction[label]) for z (B, d), labels (B,)."""
        mean, std, dirs = (torch.as_tensor(a, dtype=z.dtype, device=z.device)
                           for a in (self.mean, self.std, self.directions))
        moved = (z - mean) / std + alpha * float(np.sqrt(z.shape[1])) * dirs[labels]
        return moved * std + mean

    def save(self, target: str | Path | Location) -> None:
        """A small .npz (mean, std, directions) at a local path or a Location (s3:// too)."""
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, std=self.std, directions=self.directions)
        _location(target).write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, source: str | Path | Location) -> ZDirections:
        with np.load(io.BytesIO(_location(source).read_bytes())) as data:
            return cls(data["mean"], data["std"], data["directions"])


def _location(where: str | Path | Location) -> Location:
    return where if isinstance(where, Location) else Location(str(where))


def fit_class_directions(z: np.ndarray, labels: np.ndarray, num_classes: int,
                         seed: int = 0) -> ZDirections:
    """Normalise z (N, d) by its mean and unbiased std (the official `conds_mean/std`), fit a
    multinomial logistic regression of `labels` on it, and return each class's weight row as a
    unit direction. Two classes: sklearn fits one row w for class 1; class 0 gets -w."""
    from sklearn.linear_model import LogisticRegression

    z = np.asarray(z, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"z must be (N, d) and labels (N,), got {z.shape} and {labels.shape}")
    if num_classes < 2 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}) with num_classes >= 2")
    present = np.unique(labels)
    if len(present) < 2:
        raise ValueError(f"class directions need rows of at least two classes, got {present}")
    mean = z.mean(axis=0)
    std = np.maximum(z.std(axis=0, ddof=1), 1e-8)
    fit = LogisticRegression(max_iter=2000, random_state=seed).fit((z - mean) / std, labels)
    coef = fit.coef_ if len(present) > 2 else np.concatenate([-fit.coef_, fit.coef_])
    directions = np.zeros((num_classes, z.shape[1]))
    directions[present] = coef / np.maximum(np.linalg.norm(coef, axis=1, keepdims=True), 1e-12)
    missing = sorted(set(range(num_classes)) - set(present.tolist()))
    if missing:
        log.warning("classes %s have no training rows: their z is not shifted", missing)
    return ZDirections(mean.astype(np.float32), std.astype(np.float32),
                       directions.astype(np.float32))


# -- settings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuidedSettings:
    """The knobs of `config.EditSection.guided` (plus edit.steps and edit.seed)."""

    t0: float = 0.7  # inversion depth as a fraction of the S steps
    scale: float = 25.0  # classifier-free guidance scale s of the decode
    candidates: int = 1  # N decodes per image, the closest kept
    alpha: float = 0.3  # z shift along the class direction, in units of sqrt(d) (0: none)
    reconstruct: bool = True  # decode the null-label reconstruction for its two record columns
    steps: int = 10  # DDIM steps S of the inversion and the decode
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.t0 <= 1.0:
            raise ValueError(f"guided t0 must be in (0, 1] (a fraction of the steps), got {self.t0}")
        if self.scale < 0.0:
            raise ValueError(f"guided scale must be >= 0 (1: plain conditional decode), "
                             f"got {self.scale}")
        if self.candidates < 1:
            raise ValueError(f"guided candidates must be >= 1, got {self.candidates}")
        if self.alpha < 0.0:
            raise ValueError(f"guided alpha must be >= 0 (0: z is not shifted), got {self.alpha}")
        if self.steps < 2:
            raise ValueError(f"guided editing needs steps >= 2, got {self.steps}")

    @property
    def depth(self) -> int | None:
        """k = max(1, round(t0 * S)) steps of inversion; None (the full loop) when k >= S."""
        k = max(1, round(self.t0 * self.steps))
        return None if k >= self.steps else k

    @classmethod
    def from_section(cls, section) -> GuidedSettings:
        """From a `config.EditSection`: its `guided` sub-section, `steps` and `seed`."""
        g = section.guided
        return cls(t0=g.t0, scale=g.scale, candidates=g.candidates, alpha=g.alpha,
                   reconstruct=g.reconstruct,
                   steps=section.steps, seed=section.seed)


# -- the editor --------------------------------------------------------------------------------
class GuidedEditor:
    """Gradient-free editing through a frozen label-conditional autoencoder (module docstring).

    The networks are moved to `device` and frozen in place. `directions` is required when
    settings.alpha > 0 and must have the autoencoder's number of classes."""

    def __init__(
        self,
        autoencoder: DiffusionAutoencoder,
        classifier: AttributeClassifier,
        predictor: InfluencePredictor,
        losses: EditLosses,
        w_si: float,
        settings: GuidedSettings,
        directions: ZDirections | None = None,
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.autoencoder = autoencoder
        model = freeze(autoencoder.model, self.device)
        config = getattr(model, "config", None)
        num_classes = int(getattr(config, "num_classes", 0) or 0)
        if num_classes == 0:
            raise ValueError("edit.method 'guided' needs a label-conditional autoencoder "
                             "(num_classes > 0, trained with label dropout); this one has no "
                             "label path: use edit.method 'latent'")
        if num_classes != predictor.num_classes:
            raise ValueError(f"the autoencoder has {num_classes} classes, the predictor "
                             f"{predictor.num_classes}")
        if settings.alpha > 0 and directions is None:
            raise ValueError("guided alpha > 0 needs the class directions (fit_class_directions)")
        if directions is not None and directions.num_classes != num_classes:
            raise ValueError(f"the z directions have {directions.num_classes} classes, the "
                             f"autoencoder {num_classes}")
        self.image_size: int | None = getattr(config, "image_size", None)
        self.classifier = freeze(classifier, self.device)
        self.predictor = freeze(predictor, self.device)
        self.losses = losses
        freeze_loss_networks(losses, self.device)
        self.w_si = float(w_si)
        self.settings = settings
        self.directions = directions

    def _p_high(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.predictor.p_high(self.classifier.features(images), labels)

    def _decode(self, z, x_start, labels, scale: float) -> torch.Tensor:
        s = self.settings
        return decode(self.autoencoder.model, z, x_start, labels, s.steps,
                      self.autoencoder.schedule, checkpoint=False, guidance_scale=scale,
                      depth=s.depth)

    def noise_level(self) -> float:
        """abar at which x_t0 sits (where the partial inversion ends; 0 for the full loop)."""
        s = self.settings
        return list(self.autoencoder.schedule.inversion_steps(s.steps, s.depth))[-1].abar_to

    @torch.no_grad()
    def edit(self, images: torch.Tensor, labels: torch.Tensor,
             return_latents: bool = False) -> dict[str, np.ndarray]:
        """Edit a batch; see the module docstring for the procedure and the outputs."""
        x, y = check_edit_inputs(images, labels, self.image_size, self.device)
        out = self._edit(x, y, return_latents)
        return {k: v.detach().cpu().numpy() for k, v in out.items()}

    def sdedit_noise(self, x: torch.Tensor) -> torch.Tensor:
        """(N - 1, B, C, H, W) standard normal noise for candidates 1..N-1. Each image's noise
        comes from its own CPU generator seeded by `seed` and a hash of its pixels, so an
        image's edit does not depend on the batch it is in (a row retried alone, a different
        batch size) nor on the device, and the caller's RNG is untouched."""
        n = self.settings.candidates - 1
        noise = torch.zeros(n, *x.shape)
        if n == 0:
            return noise.to(x.device, x.dtype)
        for i, image in enumerate(x.detach().cpu()):
            digest = hashlib.sha256(image.numpy().tobytes()).digest()
            seed = int.from_bytes(digest[:7], "little") ^ (self.settings.seed & (2**56 - 1))
            noise[:, i] = torch.randn(n, *image.shape, generator=torch.Generator().manual_seed(seed))
        return noise.to(x.device, x.dtype)

    @staticmethod
    def candidate_start(c: int, x: torch.Tensor, x_t0: torch.Tensor, abar: float,
                        noise: torch.Tensor) -> torch.Tensor:
        """Where candidate c's decode starts: x_t0 for c = 0 (deterministic), else the SDEdit
        noising sqrt(abar) x + sqrt(1 - abar) noise[c - 1] at the same level."""
        return x_t0 if c == 0 else abar ** 0.5 * x + (1.0 - abar) ** 0.5 * noise[c - 1]

    def _reconstruction(self, x, y, z, x_t0, ref) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction_mse, loss_total_initial) of x_t0 decoded under the null label, for
        the record only (nothing is chosen by them); NaN without `settings.reconstruct`, which
        saves a quarter of the UNet passes of a one-candidate edit."""
        if not self.settings.reconstruct:
            nan = torch.full((x.shape[0],), float("nan"), device=x.device, dtype=x.dtype)
            return nan, nan.clone()
        recon = self._decode(z, x_t0, torch.full_like(y, NULL_LABEL), 1.0)
        reconstruction_mse = (recon - x).pow(2).flatten(1).mean(dim=1)
        recon = recon.clamp(-1.0, 1.0)
        return reconstruction_mse, (self.losses.combine(self.losses.terms(recon, ref))
                                    + self.w_si * self._p_high(recon, y))

    def _edit(self, x: torch.Tensor, y: torch.Tensor, return_latents: bool) -> dict:
        s, model = self.settings, self.autoencoder.model
        ref = self.losses.reference(x)
        p_before = self._p_high(x, y)
        z = model.encode(x)
        z_edit = self.directions.shift(z, y, s.alpha) if s.alpha > 0 else z
        null = torch.full_like(y, NULL_LABEL)
        x_t0 = invert(model, x, z, null, s.steps, self.autoencoder.schedule, checkpoint=False,
                      depth=s.depth)
        reconstruction_mse, total_initial = self._reconstruction(x, y, z, x_t0, ref)

        abar, noise = self.noise_level(), self.sdedit_noise(x)
        edited, kept, distances = None, None, []
        chosen = torch.zeros_like(y)
        for c in range(s.candidates):
            start = self.candidate_start(c, x, x_t0, abar, noise)
            x_hat = self._decode(z_edit, start, y, s.scale).clamp(-1.0, 1.0)
            terms = self.losses.terms(x_hat, ref)
            distance = self.losses.combine(terms)
            distances.append(distance)
            if c == 0:
                edited, kept, best = x_hat, terms, distance
                continue
            better = distance < best  # strict: a tie keeps the earlier candidate
            edited = torch.where(better.view(-1, 1, 1, 1), x_hat, edited)
            kept = {k: torch.where(better, terms[k], kept[k]) for k in TERMS}
            chosen = torch.where(better, c, chosen)
            best = torch.minimum(best, distance)

        p_after = self._p_high(edited, y)
        out = {"edited": edited, "p_high_before": p_before, "p_high_after": p_after,
               "loss_si": p_after, "loss_total": best + self.w_si * p_after,
               "loss_total_initial": total_initial, "reconstruction_mse": reconstruction_mse,
               "iterations": torch.zeros_like(y),
               "stopped": torch.zeros_like(y, dtype=torch.bool)}
        out.update({f"loss_{name}": kept[name] for name in TERMS})
        if return_latents:
            out.update(z=z, z_edit=z_edit, x_t0=x_t0, chosen=chosen,
                       candidate_distance=torch.stack(distances, dim=1))
        return out

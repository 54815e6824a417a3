"""The gate before an edit replaces its original, Ray-free.

An edit that the guiding networks like (g(x) and h_w scored it while it was optimised; F_id
pulled it towards the original's identity) is no evidence that the image shows its assigned
label. The gate asks a classifier that never guided the edit: by default the removal stage's,
trained without the high-influence rows, so it never saw the flagged images either.

    gate(edited (B, 3, H, W) in [-1, 1], labels (B,), identity_similarity (B,)) -> GateVerdict

per row: `prediction` (the gate classifier's argmax), `confidence` (its softmax probability of
the assigned label) and `accepted` = prediction == label, and identity_similarity >=
min_identity when that is set. A rejected row falls back (refine stage) to removal
(`fallback="remove"`: the worst case is the removal baseline) or to its original image
(`fallback="keep"`). A disabled gate accepts every row (prediction -1, confidence NaN) and loads
no classifier: the method without the gate.

`min_identity` is None by default: identity_similarity is the cosine of F_id, the identity
network that guided the edit (not an independent check), and its scale depends on which network
F_id is (ArcFace or the small embedder trained here), so no one threshold fits every run. Set it
from a run's own figures (the report's identity similarities; on synthfaces, the oracle's
thresholds).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

GATE_CLASSIFIERS = ("removal",)  # classifiers that never guided an edit
GATE_COLUMNS = ("gate_prediction", "gate_confidence", "gate_accepted")


@dataclass(frozen=True)
class GateSettings:
    """The knobs of `config.GateSection` (edit.gate)."""

    enabled: bool = True
    classifier: str = "removal"  # whose classifier judges: the removal stage's last checkpoint
    min_identity: float | None = None  # also reject rows below this F_id cosine (module doc)
    # what a rejected row becomes (edit.gate.fallback) is the refine stage's, not the gate's

    def __post_init__(self):
        if self.classifier not in GATE_CLASSIFIERS:
            raise ValueError(f"gate classifier must be one of {GATE_CLASSIFIERS}, got "
                             f"{self.classifier!r}")
        if self.min_identity is not None and not -1.0 <= self.min_identity <= 1.0:
            raise ValueError(f"gate min_identity is a cosine similarity in [-1, 1], got "
                             f"{self.min_identity}")

    @classmethod
    def from_section(cls, section) -> GateSettings:
        """From a `config.GateSection` (or anything with the same attribute names)."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class GateVerdict:
    prediction: np.ndarray  # (B,) int64, -1 where the gate is disabled
    confidence: np.ndarray  # (B,) float64, softmax probability of the assigned label
    accepted: np.ndarray  # (B,) bool

    def columns(self) -> dict[str, np.ndarray]:
        """The verdict as the edit table's columns (GATE_COLUMNS)."""
        return dict(zip(GATE_COLUMNS, (self.prediction, self.confidence, self.accepted),
                        strict=True))


class EditGate:
    """`settings` with the gate classifier (None only when the gate is disabled)."""

    def __init__(self, settings: GateSettings, classifier: nn.Module | None = None,
                 device: str | torch.device = "cpu"):
        if settings.enabled and classifier is None:
            raise ValueError("an enabled gate needs its classifier")
        self.settings = settings
        self.device = torch.device(device)
        self.classifier = None
        if classifier is not None:
            self.classifier = classifier.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, edited, labels, identity_similarity) -> GateVerdict:
        labels = np.asarray(labels, dtype=np.int64)
        identity = np.asarray(identity_similarity, dtype=np.float64)
        n = len(labels)
        if identity.shape != (n,):
            raise ValueError(f"identity_similarity must be ({n},), got {identity.shape}")
        if not self.settings.enabled:
            return GateVerdict(np.full(n, -1, np.int64), np.full(n, np.nan),
                               np.ones(n, dtype=bool))
        x = torch.as_tensor(np.asarray(edited), dtype=torch.float32)
        if x.ndim != 4 or x.shape[0] != n or x.shape[1] != 3:
            raise ValueError(f"edited must be ({n}, 3, H, W), got {tuple(x.shape)}")
        probs = torch.softmax(self.classifier(x.to(self.device)).float(), dim=1).cpu().numpy()
        if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
            raise ValueError(f"labels outside the gate classifier's {probs.shape[1]} classes")
        prediction = probs.argmax(axis=1).astype(np.int64)
        confidence = probs[np.arange(n), labels].astype(np.float64)
        accepted = prediction == labels
        if self.settings.min_identity is not None:
            # NaN similarity (no identity figure) never passes a set threshold
            accepted &= np.nan_to_num(identity, nan=-np.inf) >= self.settings.min_identity
        return GateVerdict(prediction, confidence, accepted)

"""The influence predictor h_w (METHOD.md stage 4): a differentiable surrogate for membership
of the high-influence set H.

    p_high = h_w(g(x), y) = sigmoid(MLP([standardise(g(x)), one_hot(y)]))

Inputs: g(x), the classifier's (B, 512) backbone features (`AttributeClassifier.features`, images
in [-1, 1]), and the assigned label y, (B,) int64 in [0, num_classes). Output: one logit per row,
(B,); `p_high` is its sigmoid, in (0, 1). It predicts "is this (image, label) pair
high-influence", not the true label.

- `partition(sample_ids, fit_fraction, seed)`: which training rows fit h_w (a seeded hash of each
  sample_id, so the split is independent of row order and of the run's other hashed splits);
  the rest are held out and give the held-out AUROC.
- `fit_predictor(features, labels, is_high, fit_mask, num_classes)`: BCE on the fit rows
  (positives weighted by #neg/#pos: H is only tau of the rows), Adam, deterministic for a seed;
  returns the frozen model and an AUROC report.
- `save_predictor` / `load_predictor`: safetensors + config.json, to a local folder or a
  `storage.Location` (s3 too).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from diffinf_ray.diffae.weights import (
    load_state_strict,
    read_weights_folder,
    write_weights_folder,
)
from diffinf_ray.models.classifier import FEATURE_DIM
from diffinf_ray.storage import Location

FORMAT = "diffinf-predictor/1"
WEIGHTS_FILE = "predictor.safetensors"
# Salt of the partition hash: without it, hashing sample_id with the run seed would reproduce
# the train/val/test split's uniform draw (data.ingest.hash_split), and "u < fit_fraction" would
# not be a fit_fraction share of the training rows.
_PARTITION_SALT = "predictor-partition"


class InfluencePredictor(nn.Module):
    """h_w: Linear(feature_dim + num_classes, hidden) -> ReLU -> Linear(hidden, 1).

    Features are standardised by `feature_mean` / `feature_std` (buffers, set from the fit rows),
    so the saved model carries its own normalisation.
    """

    def __init__(self, num_classes: int, feature_dim: int = FEATURE_DIM, hidden: int = 128):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.hidden = hidden
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.net = nn.Sequential(
            nn.Linear(feature_dim + num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def config(self) -> dict:
        return {"num_classes": self.num_classes, "feature_dim": self.feature_dim,
                "hidden": self.hidden}

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits (B,) of "high influence" for features (B, feature_dim) and labels (B,)."""
        x = (features - self.feature_mean) / self.feature_std
        onehot = F.one_hot(labels.long().to(features.device), self.num_classes).to(x.dtype)
        return self.net(torch.cat([x, onehot], dim=1)).squeeze(1)

    def p_high(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """P(high influence), (B,) in (0, 1)."""
        return torch.sigmoid(self(features, labels))


def _unit_hash(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{_PARTITION_SALT}\x00{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def partition(sample_ids: Sequence, fit_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask (N,): True for the rows that fit h_w, False for the held-out rows.

    Each row's side depends only on (seed, sample_id), never on row order or the other rows.
    """
    if not 0.0 < fit_fraction < 1.0:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    return np.fromiter((_unit_hash(str(s), seed) < fit_fraction for s in sample_ids),
                       dtype=bool, count=len(sample_ids))


def _auroc(is_high: np.ndarray, scores: np.ndarray) -> float:
    """AUROC, or NaN when the rows hold only one class (undefined)."""
    if is_high.size == 0 or is_high.all() or not is_high.any():
        return math.nan
    return float(roc_auc_score(is_high, scores))


def _as_tensor(values: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if torch.is_tensor(values):
        return values.detach().to("cpu", dtype)
    # a copy: Ray Data hands read-only arrays, which torch warns about sharing
    return torch.tensor(np.array(values), dtype=dtype)


def fit_predictor(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    is_high: np.ndarray | torch.Tensor,
    fit_mask: np.ndarray | torch.Tensor,
    num_classes: int,
    hidden: int = 128,
    epochs: int = 200,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    balance_classes: bool = True,
    seed: int = 0,
) -> tuple[InfluencePredictor, dict]:
    """Fit h_w on the rows of `fit_mask`, score the held-out rest; CPU, float32.

    features (N, D) array or tensor, labels (N,) ints, is_high (N,) bool pseudo-labels (member of
    H), fit_mask (N,) bool. Minibatch Adam (full batch when batch_size >= #fit rows) on BCE with
    pos_weight = #neg/#pos when `balance_classes`. The same inputs and seed give the same model.

    Returns (model in eval mode with frozen parameters, report) where report holds
    heldout_auroc, fit_auroc (NaN where a side has a single class), fit_rows, heldout_rows,
    fit_positives, heldout_positives.
    """
    x = _as_tensor(features, torch.float32)
    y = _as_tensor(labels, torch.long)
    target = _as_tensor(is_high, torch.bool)
    fit = _as_tensor(fit_mask, torch.bool)
    n = x.shape[0]
    if x.ndim != 2 or not (y.shape == target.shape == fit.shape == (n,)):
        raise ValueError("features must be (N, D) and labels, is_high, fit_mask (N,)")
    x_fit, y_fit, t_fit = x[fit], y[fit], target[fit].float()
    positives = int(t_fit.sum())
    if positives == 0 or positives == len(t_fit):
        raise ValueError(f"the fit rows need both classes: {positives} of {len(t_fit)} are high")

    # Seeded init and shuffling without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InfluencePredictor(num_classes, feature_dim=x.shape[1], hidden=hidden)
    model.feature_mean.copy_(x_fit.mean(dim=0))
    # Constant features (std 0) would divide by zero; they carry no signal anyway.
    model.feature_std.copy_(x_fit.std(dim=0, unbiased=False).clamp_min(1e-6))
    pos_weight = torch.tensor((len(t_fit) - positives) / positives) if balance_classes else None
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    m = len(t_fit)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(m, generator=generator) if batch_size < m else torch.arange(m)
        for start in range(0, m, batch_size):
            idx = order[start:start + batch_size]
            loss = F.binary_cross_entropy_with_logits(
                model(x_fit[idx], y_fit[idx]), t_fit[idx], pos_weight=pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval().requires_grad_(False)

    with torch.no_grad():
        scores = model(x, y).numpy()
    t_np, fit_np = target.numpy(), fit.numpy()
    report = {
        "heldout_auroc": _auroc(t_np[~fit_np], scores[~fit_np]),
        "fit_auroc": _auroc(t_np[fit_np], scores[fit_np]),
        "fit_rows": int(fit_np.sum()),
        "heldout_rows": int((~fit_np).sum()),
        "fit_positives": positives,
        "heldout_positives": int(t_np[~fit_np].sum()),
    }
    return model, report


def _folder(uri: str | Location) -> Location:
    return uri if isinstance(uri, Location) else Location(str(uri))


def save_predictor(model: InfluencePredictor, uri: str | Location,
                   report: dict | None = None) -> dict:
    """Write <uri>/config.json ({format, config, files: {name: {sha256}}, report}) and
    <uri>/predictor.safetensors; returns the manifest."""
    # NaN AUROCs are not JSON; write them as null.
    extra = {"report": _nan_to_none(report)} if report is not None else None
    return write_weights_folder(_folder(uri), model.state_dict(), FORMAT, model.config(),
                                WEIGHTS_FILE, extra)


def _nan_to_none(obj):
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def load_predictor(uri: str | Location,
                   map_location: str | torch.device = "cpu") -> InfluencePredictor:
    """The predictor saved at `uri`, frozen, in eval mode (hash checked against config.json)."""
    manifest, state, where = read_weights_folder(_folder(uri), FORMAT, WEIGHTS_FILE)
    model = load_state_strict(InfluencePredictor(**manifest["config"]), state, where)
    return model.to(map_location).eval().requires_grad_(False)

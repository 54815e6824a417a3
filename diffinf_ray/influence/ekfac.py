"""Second-order self-influence with EK-FAC (kronfluence): the detector `ekfac`, Ray-free.

METHOD.md stage 3 takes TracIn as "the practical stand-in for g^T H^-1 g"; this computes the
curvature-aware score itself (issue 15: "the paper's Eq. 4 with curvature"):

    I(z) = g_z^T (G + lambda I)^-1 g_z,      g_z = d CE(f(x_z), y_z) / d theta

for every training row z under the trained classifier, y_z its assigned (possibly wrong) label.
G is the Fisher of the classifier on the training split in kronfluence's layer-wise
approximation (Grosse et al. 2023, arXiv 2308.03296):

- `ekfac` (default): per layer, the Kronecker factors A = E[a a^T] (inputs, with a 1 for the
  bias) and S = E[s s^T] (output gradients) give the eigenbases Q_A, Q_S; the eigenvalues are
  re-fitted per coordinate, Lambda = E[(Q_S^T G_i Q_A)^2] (George et al. 2018), and
  I(z) = sum_layers sum (Q_S^T G_z Q_A)^2 / (Lambda + lambda);
- `kfac`: Lambda = eig(S) x eig(A) instead; `diagonal`: G's diagonal; `identity`: no
  curvature, I(z) = ||g_z||^2 over the tracked layers (TracIn at one checkpoint, a check);
- `fisher: true` (default) draws the label of each row from the model's own prediction when
  fitting G (the true Fisher, the GGN of the cross-entropy), `empirical` uses the assigned
  label; the gradient g_z always uses the assigned label;
- `damping: null` is kronfluence's heuristic lambda = 0.1 x the mean of Lambda, per layer;
- only Linear and Conv2d layers are tracked (kronfluence's); batch-norm parameters are left out,
  and the model is in eval mode (prepare_model), so batch norm uses its running statistics and
  a row's gradient does not depend on its batch.

`checkpoint: last` scores the last checkpoint (Eq. 4 as written); `all` sums
eta_t I_t(z) over the saved checkpoints like TracIn, refitting G at each (cost x checkpoints).

Cost: fitting G is two passes over the split (covariances; then Lambda, which projects every
row's per-layer gradient into the eigenbases) plus one eigendecomposition per Kronecker factor;
the scores are one more projecting pass. For ResNet-18 the projections dominate: a 3x3 conv of
512 channels has a 4608-wide input factor, so each row costs O(p d^2) ~ 10 GFLOP per such layer
and pass. Measured on this 2-core box (one thread, shared with other work), 184 rows at 32 px,
all layers: 597 s and 4.5 GB peak RSS (the eigendecompositions: ~80 s of it); `layers: [head]`:
8.5 s and 1.3 GB. Use a GPU (`use_gpu`) or restrict `layers` for real sizes.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")
FISHERS = ("true", "empirical")
TRACKED_TYPES = (nn.Linear, nn.Conv2d)


class EkfacError(ValueError):
    """Settings or a model that the EK-FAC self-influence cannot use."""


def _task_class():
    from kronfluence.task import Task

    class AssignedLabelLoss(Task):
        """The summed cross-entropy of each row's assigned label (so a row's gradient is its own
        loss's, with no 1/B); with `sample=True` (the true Fisher) labels drawn from the model."""

        def __init__(self, tracked: list[str] | None):
            self.tracked = tracked

        def compute_train_loss(self, batch, model: nn.Module, sample: bool = False):
            images, labels = batch
            logits = model(images)
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach().float(), dim=-1)
                    labels = torch.multinomial(probs, num_samples=1).squeeze(1)
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model: nn.Module):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self) -> list[str] | None:
            return self.tracked

    return AssignedLabelLoss


def tracked_modules(model: nn.Module, layers: Sequence[str] | None) -> list[str] | None:
    """Names of the Linear and Conv2d modules at or under `layers` (None: all of them)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        raise EkfacError("ekfac.layers must be a list of module names, not a string")
    named = dict(model.named_modules())
    unknown = [n for n in layers if n not in named]
    if unknown:
        raise EkfacError(f"ekfac.layers: unknown module names {unknown}; modules are e.g. "
                         f"{list(named)[1:6]}")
    found = [n for n, m in named.items() if isinstance(m, TRACKED_TYPES)
             and any(n == sel or sel == "" or n.startswith(sel + ".") for sel in layers)]
    if not found:
        raise EkfacError(f"ekfac.layers={list(layers)}: no Linear or Conv2d layer under them")
    return found


def self_influence(model: nn.Module, dataset: Dataset, *, strategy: str = "ekfac",
                   damping: float | None = None, batch_size: int = 64, fisher: str = "true",
                   layers: Sequence[str] | None = None, seed: int = 0,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """(N,) float64 I(z) of every row of `dataset` ((image, label) items, in its order) under
    `model` (left unchanged: a copy is prepared), G fitted on the same rows."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    if strategy not in STRATEGIES:
        raise EkfacError(f"ekfac.strategy: {strategy!r} is not one of {list(STRATEGIES)}")
    if fisher not in FISHERS:
        raise EkfacError(f"ekfac.fisher: {fisher!r} is not one of {list(FISHERS)}")
    if len(dataset) == 0:
        raise EkfacError("no training rows to score")
    if isinstance(model, TRACKED_TYPES):  # kronfluence wraps children, not the root
        raise EkfacError("the model is a bare layer; put it in a container (nn.Sequential)")
    device = torch.device(device)
    model = copy.deepcopy(model).to(device).eval()
    task = _task_class()(tracked_modules(model, layers))
    model = prepare_model(model, task)  # eval mode, parameters frozen, layers wrapped
    factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=fisher == "empirical")
    score_args = ScoreArguments(damping_factor=damping)
    with tempfile.TemporaryDirectory(prefix="ekfac-") as workdir, \
            warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", FutureWarning)  # kronfluence's torch.cuda.amp use
        torch.manual_seed(seed)  # the labels the true Fisher draws
        analyzer = Analyzer("ekfac", model, task, cpu=device.type == "cpu", disable_tqdm=True,
                            output_dir=workdir, log_level=logging.WARNING)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
        analyzer.fit_all_factors("factors", dataset, per_device_batch_size=batch_size,
                                 factor_args=factor_args, overwrite_output_dir=True)
        analyzer.compute_self_scores("self", "factors", dataset,
                                     per_device_train_batch_size=batch_size,
                                     score_args=score_args, overwrite_output_dir=True)
        scores = analyzer.load_self_scores("self")["all_modules"]
    return scores.detach().double().cpu().numpy()


class EncodedImages(Dataset):
    """(image, label) items from encoded images, decoded one at a time (the split stays encoded
    in memory: at 128 px a decoded FFHQ split would not fit)."""

    def __init__(self, images: Sequence[bytes], labels: Sequence[int]):
        if len(images) != len(labels):
            raise EkfacError(f"{len(images)} images but {len(labels)} labels")
        self.images = [bytes(b) for b in images]
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from diffinf_ray.data.images import to_tensor_batch

        return torch.from_numpy(to_tensor_batch([self.images[i]])[0]), self.labels[i]


def checkpoint_scores(checkpoints: Sequence, dataset: Dataset, *, checkpoint: str = "last",
                      **settings) -> dict:
    """I(z) under saved classifier checkpoints (`ClassifierCheckpoint`s in epoch order):
    `last`: the last one's; `all`: sum_t eta_t I_t(z), like TracIn. Returns score (N,),
    per_checkpoint (N, T) (the weighted terms), epochs and learning_rates of the ones used."""
    if checkpoint not in ("last", "all"):
        raise EkfacError(f"ekfac.checkpoint: {checkpoint!r} is not one of ['last', 'all']")
    if not checkpoints:
        raise EkfacError("no checkpoints to score (run the train stage first)")
    used = list(checkpoints)[-1:] if checkpoint == "last" else list(checkpoints)
    weights = np.ones(1) if checkpoint == "last" else \
        np.array([c.learning_rate for c in used], dtype=np.float64)
    # the first network of a checkpoint, as TracIn (peer_states belong to ensembles)
    per = np.stack([self_influence(replace(c, peer_states=None).build_model(), dataset,
                                   **settings) for c in used], axis=1) * weights[None, :]
    return {"score": per.sum(axis=1), "per_checkpoint": per, "epochs": [c.epoch for c in used],
            "learning_rates": [float(c.learning_rate) for c in used]}


def score_training_split(manifest, checkpoints, *, checkpoint: str = "last", **settings):
    """The train split of a manifest folder (Location) scored under the classifier checkpoints
    folder (Location): (a pandas DataFrame of sample_id, label, is_corrupted, score and
    per_checkpoint, sorted by sample_id; the checkpoint_scores extras)."""
    from diffinf_ray.datasets import read_split
    from diffinf_ray.models.checkpoint import load_all

    rows = read_split(manifest, "train", ["image", "label", "is_corrupted"])
    if rows.empty:
        raise EkfacError(f"{manifest.display}: the training split is empty; nothing to score")
    dataset = EncodedImages(rows["image"].tolist(), rows["label"].to_numpy(np.int64))
    out = checkpoint_scores(load_all(checkpoints), dataset, checkpoint=checkpoint, **settings)
    df = rows.drop(columns=["image"]).assign(score=out["score"])
    df["per_checkpoint"] = [list(map(float, r)) for r in out["per_checkpoint"]]
    return df, {"epochs": out["epochs"], "learning_rates": out["learning_rates"]}

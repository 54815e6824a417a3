"""Classifier checkpoints: the weights, the epoch and the learning rate in force.

Layout under the run root (written by the train stage through Ray Train):

    <run root>/checkpoints/epoch_0005/checkpoint.pt

Beside it, `metrics.json` holds the figures the harness reported for that epoch (epoch,
learning_rate, train_*, val_loss, val_accuracy: validation on the val split's assigned labels),
which best-validation model selection reads (`best_validation_checkpoint`); checkpoints written
before it was kept have none.

`checkpoint.pt` is a `torch.save` dict with plain tensors and Python scalars only, so it loads
with `torch.load(weights_only=True)` (no pickled code runs):
    model_state       classifier state_dict
    optimizer_state   Adam state (for resume)
    epoch             int, 1-based count of finished epochs
    learning_rate     float, the learning rate in force during that epoch (TracIn's eta_t)
    architecture      {"name", "num_classes", "head_hidden"}
    peer_states       optional list of further classifier state_dicts of the same architecture:
                      the checkpoint is then an ensemble that predicts the mean of its members'
                      logits, `model_state` being its first member (noisy-label baselines such as
                      ELR+ and ProMix, stages/baselines.py). Code that needs one network (TracIn)
                      reads `model_state` alone.
"""

from __future__ import annotations

import io
import posixpath
import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from diffinf_ray.models.classifier import AttributeClassifier, build_classifier
from diffinf_ray.storage import Location

CHECKPOINT_FILE = "checkpoint.pt"
EPOCH_METRICS_FILE = "metrics.json"
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def checkpoint_dir_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


@dataclass
class ClassifierCheckpoint:
    source: str  # where it was read from, for error messages
    model_state: dict[str, torch.Tensor]
    epoch: int
    learning_rate: float
    architecture: dict
    optimizer_state: dict | None = None
    peer_states: list[dict[str, torch.Tensor]] | None = None

    def build_model(self) -> AttributeClassifier | MeanLogitEnsemble:
        """A classifier of the recorded architecture with these weights, in eval mode (the
        ensemble of it and its peers when the checkpoint has `peer_states`)."""
        arch = self.architecture
        model = build_classifier(arch["num_classes"], arch.get("head_hidden", 256))
        load_into(model, self)
        if not self.peer_states:
            return model.eval()
        members = [model]
        for i, state in enumerate(self.peer_states, start=1):
            peer = build_classifier(arch["num_classes"], arch.get("head_hidden", 256))
            load_into(peer, replace(self, model_state=state, source=f"{self.source} (peer {i})",
                                    peer_states=None))
            members.append(peer)
        return MeanLogitEnsemble(members).eval()


class MeanLogitEnsemble(nn.Module):
    """Classifiers that predict together: the mean of their logits."""

    def __init__(self, members: list[AttributeClassifier]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(images) for m in self.members]).mean(dim=0)


def classifier_payload(members: list[AttributeClassifier], epoch: int, learning_rate: float,
                       optimizer_state: dict | None = None, **extra) -> dict:
    """The checkpoint.pt dict (the format above) for classifiers that predict together: one,
    or an ensemble whose first member is `model_state` and the others `peer_states`. Every
    training writes this (models/harness.py), whoever trained the classifier; `extra` keys
    (e.g. the baseline's "method") are kept and ignored by `parse`."""
    def cpu_state(model) -> dict:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    payload = {"model_state": cpu_state(members[0]), "epoch": epoch,
               "learning_rate": learning_rate, "architecture": members[0].architecture(),
               **extra}
    if optimizer_state is not None:
        payload["optimizer_state"] = optimizer_state
    if len(members) > 1:
        payload["peer_states"] = [cpu_state(m) for m in members[1:]]
    return payload


def to_bytes(ckpt: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def parse(data: bytes, source: str) -> ClassifierCheckpoint:
    """Decode and validate a checkpoint's bytes; errors name `source`."""
    try:
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt/unsafe files
        raise CheckpointError(f"{source}: not a readable weights-only checkpoint ({err})") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a dict, got {type(raw).__name__}")
    for key in ("model_state", "epoch", "architecture"):
        if key not in raw:
            raise CheckpointError(f"{source}: missing {key!r}")
    lr = raw.get("learning_rate")
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not lr > 0:
        raise CheckpointError(
            f"{source}: missing or invalid 'learning_rate' ({lr!r}); TracIn weights each "
            "checkpoint by the learning rate in force, so checkpoints must record it"
        )
    peers = raw.get("peer_states")
    if peers is not None and not (isinstance(peers, list)
                                  and all(isinstance(p, dict) for p in peers)):
        raise CheckpointError(f"{source}: 'peer_states' must be a list of state dicts")
    return ClassifierCheckpoint(
        source=source,
        model_state=raw["model_state"],
        epoch=int(raw["epoch"]),
        learning_rate=float(lr),
        architecture=dict(raw["architecture"]),
        optimizer_state=raw.get("optimizer_state"),
        peer_states=peers,
    )


def load_into(model: AttributeClassifier, ckpt: ClassifierCheckpoint) -> None:
    """Strictly load weights; a checkpoint of another architecture is a clear error."""
    expected = model.architecture()
    got = {k: ckpt.architecture.get(k) for k in expected}
    if got != expected:
        raise CheckpointError(f"{ckpt.source}: architecture {got} does not match the model {expected}")
    try:
        model.load_state_dict(ckpt.model_state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt.source}: weights do not fit the model: {err}") from err


def list_checkpoints(checkpoints: Location) -> list[Location]:
    """Checkpoint files under `<run root>/checkpoints/`, ordered by epoch."""
    dirs = [d for d in checkpoints.list_dirs() if _EPOCH_DIR.match(d)]
    dirs.sort(key=lambda d: int(_EPOCH_DIR.match(d).group(1)))
    files = [checkpoints.child(d, CHECKPOINT_FILE) for d in dirs]
    return [f for f in files if f.exists()]


def epoch_metrics(checkpoint: Location) -> dict | None:
    """The figures reported with a checkpoint's epoch (metrics.json beside it), or None."""
    found = checkpoint.parent().child(EPOCH_METRICS_FILE)
    return found.read_json() if found.exists() else None


def best_validation_checkpoint(found: list[Location]) -> tuple[Location, dict] | None:
    """The saved checkpoint whose epoch had the highest val_accuracy (the earliest on a tie),
    with its figures: model selection on the val split's assigned labels, as a user without
    clean labels would select. None when any checkpoint lacks its figures."""
    figures = [epoch_metrics(c) for c in found]
    if not found or any(f is None or "val_accuracy" not in f for f in figures):
        return None
    best = max(range(len(found)), key=lambda i: (figures[i]["val_accuracy"], -i))
    return found[best], figures[best]


def load_checkpoint(location: Location) -> ClassifierCheckpoint:
    return parse(location.read_bytes(), location.display)


def load_all(checkpoints: Location) -> list[ClassifierCheckpoint]:
    found = list_checkpoints(checkpoints)
    if not found:
        raise CheckpointError(f"no checkpoints under {checkpoints.display} (run the train stage first)")
    return [load_checkpoint(f) for f in found]


def epoch_of(path: str) -> int | None:
    match = _EPOCH_DIR.match(posixpath.basename(posixpath.dirname(path)))
    return int(match.group(1)) if match else None

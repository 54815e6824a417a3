"""Baselines stage: every configured noisy-label method (diffinf_ray.baselines) trained with Ray
Train on the noisy training split like the baseline classifier, and evaluated like it.

In:  manifest_noisy/ (train rows: sample_id, image, label (assigned), is_corrupted; val rows for
     the per-epoch validation; test rows for the evaluation); config sections `train` (workers,
     GPU, CPUs per worker, epochs, batch size, lr and its schedule, checkpoint_every, augment),
     `evaluate`, `baselines` (methods, options).
Out, per method m of `baselines.methods`:
  baselines/m/checkpoints/epoch_NNNN/checkpoint.pt   the method's test-time network
      (`eval_model()`) in the classifier checkpoint format of models/checkpoint.py, so
      `evaluate_checkpoints` and the influence code load it; an ensemble (ELR+, ProMix: mean of
      two networks' logits) stores its first network as `model_state`, the other as
      `peer_states`; no `optimizer_state` (the method's optimisers are in method_state.pt)
  baselines/m/checkpoints/epoch_NNNN/method_state.pt  {"epoch", "method": method.state_dict()}
      (networks, optimisers, EMA copies, per-sample state, counters) for resume
  baselines/m/evaluation/metrics.json, predictions.parquet  (models/evaluation.py, clean test split)
  baselines/summary.json  {m: headline test metrics + the last epoch's training metrics}
  Checkpoints are written every `train.checkpoint_every` epochs and at the last one.

Options: `baselines.options[m]` is checked against the method's keys (method_defaults); an
unknown key is a ConfigError naming the method and the key. The run fills in `epochs` (the
total, = train.epochs) for ProSelfLC and ProMix; the rest is each method's `run_options`
(baselines/base.py), e.g. Co-teaching's forget-rate estimate (`noise_rate` = noise.rate, the
injected rate) unless forget_rate or noise_rate is given.

Per-sample index: methods with per-sample state (ELR+ targets, ProMix selection) need a stable
`index` in 0..N-1: the rank of the row's sample_id among the sorted sample_ids of the training
split, joined onto each row by a Ray Data map. With several Ray Train workers each worker sees
only its shard, but the index stays global: every worker holds N-sized per-sample tables and
fills the rows of its shard (ProMix selects within the shard's samples). Batches also carry
`is_corrupted` when it is known for every training row (diagnostics only, never for training).

Several workers: the methods own their networks and optimisers (two networks, EMA copies, a
pseudo head), so they are not wrapped in DDP; instead every worker builds the same initial
weights (same seed) and each optimiser all-reduces (averages) its parameters' gradients before
it steps, which is DDP's update. Batch-norm statistics stay per worker; rank 0's are saved.

Resume: Ray Train V2 restores a run from `(storage_path, name)` = (baselines/m, checkpoints);
the loop loads the latest method_state.pt and continues with the next epoch (the random
generators are re-seeded per epoch, so resuming does not replay the first epochs' draws). A
method whose last checkpoint is already at train.epochs is not started again, and its
evaluation is kept when it is of that checkpoint (a stage interrupted after some methods).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from diffinf_ray.config import Config, ConfigError, TrainSection
from diffinf_ray.datasets import check_manifest, decode_for_training, read_split, split_dataset
from diffinf_ray.models.checkpoint import (
    CHECKPOINT_FILE,
    ClassifierCheckpoint,
    classifier_payload,
    epoch_of,
    list_checkpoints,
)
from diffinf_ray.models.harness import random_hflip
from diffinf_ray.models.training import fit_with_ray_train
from diffinf_ray.storage import Location

log = logging.getLogger(__name__)

METHOD_STATE_FILE = "method_state.pt"
# evaluation metrics copied into summary.json (metrics.json has them all)
_HEADLINE = ("n", "accuracy", "auroc_macro_ovr", "kappa_linear", "ece", "epoch")
MANIFEST_COLUMNS = ("sample_id", "split", "image", "label", "label_clean", "group",
                    "is_corrupted")


# ----------------------------------------------------------------------------- options


def method_options(cfg: Config, name: str) -> dict[str, Any]:
    """What method `name` is built with: baselines.options[name] (checked against its keys) plus
    the values the run decides (total epochs; Co-teaching's forget-rate estimate)."""
    from diffinf_ray.baselines import method, method_defaults

    known = method_defaults(name)
    given: dict[str, Any] = dict(cfg.baselines.options.get(name, {}))
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"baselines.options.{name}: unknown key(s) {unknown}; "
                          f"{name} takes {sorted(known)}")
    if "epochs" in known:  # ProSelfLC's and ProMix's schedules need the total
        if given.get("epochs", cfg.train.epochs) != cfg.train.epochs:
            raise ConfigError(f"baselines.options.{name}.epochs: the methods train for "
                              f"train.epochs ({cfg.train.epochs}); leave it out")
        given["epochs"] = cfg.train.epochs
    # what else the run decides is the method's own (e.g. Co-teaching's forget-rate estimate)
    given, warnings = method(name).load().run_options(given, cfg.train.epochs, cfg.noise.rate)
    for warning in warnings:
        log.warning("%s", warning)
    return given


def check_methods(cfg: Config, num_samples: int) -> dict[str, dict[str, Any]]:
    """Every configured method's options, each checked by building the method once (a bad
    value fails here, before any training starts)."""
    from diffinf_ray.baselines import METHODS, build_method
    from diffinf_ray.models.classifier import build_classifier

    stray = sorted(set(cfg.baselines.options) - set(METHODS))
    if stray:
        raise ConfigError(f"baselines.options: unknown method(s) {stray}; known: {sorted(METHODS)}")
    num_classes = len(cfg.class_names)
    options = {}
    for name in cfg.baselines.methods:
        options[name] = method_options(cfg, name)
        build_method(name, num_classes, num_samples, options[name],
                     lambda: build_classifier(num_classes, cfg.train.head_hidden), cfg.train.lr)
    return options


# ----------------------------------------------------------------------------- data


def training_ids(manifest: Location) -> tuple[np.ndarray, bool]:
    """Sorted sample_ids of the training split (the per-sample index is a row's rank in it),
    and whether is_corrupted is known for all of them."""
    train = read_split(manifest, "train", ["is_corrupted"])
    if train.empty:
        raise ValueError(f"{manifest.display}: the training split is empty")
    ids = np.sort(train["sample_id"].astype(str).to_numpy())
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{manifest.display}: duplicate sample_ids in the training split")
    return ids, bool(train["is_corrupted"].notna().all())


def decode_with_index(batch: dict[str, np.ndarray], train_ids: np.ndarray,
                      with_corruption: bool) -> dict[str, np.ndarray]:
    """Ray Data batch fn: decode_for_training plus `index` (the row's rank in the sorted
    training ids) and, when known for all rows, `is_corrupted`."""
    out = decode_for_training(batch)
    ids = batch["sample_id"].astype(str)
    index = np.searchsorted(train_ids, ids)
    found = index < len(train_ids)
    found[found] = train_ids[index[found]] == ids[found]
    if not found.all():
        raise ValueError(f"sample_ids not in the training split: {ids[~found][:5].tolist()}")
    out["index"] = index.astype(np.int64)
    if with_corruption:
        out["is_corrupted"] = batch["is_corrupted"].astype(bool)
    return out


# ----------------------------------------------------------------------------- worker side


def checkpoint_members(model) -> list:
    """The classifiers a method's `eval_model()` predicts with (one, or the members whose
    logits it averages), for the classifier checkpoint format."""
    from diffinf_ray.models.classifier import AttributeClassifier

    if isinstance(model, AttributeClassifier):
        return [model]
    # a wrapper (a logit average, ProMix's dual-head net) names the networks it predicts with
    members = getattr(model, "checkpoint_members", None)
    if members is None:
        raise TypeError(f"cannot store a {type(model).__name__} as a classifier checkpoint")
    return [c for member in members() for c in checkpoint_members(member)]


def method_payload(method, epoch: int, lr: float) -> dict:
    """checkpoint.pt for the method's test-time network, in the one classifier format."""
    return classifier_payload(checkpoint_members(method.eval_model()), epoch, lr,
                              method=method.name)


def average_gradients_before_step(method) -> None:
    """Data parallelism for a method's own optimisers: each averages its parameters' gradients
    over the workers (one flat all-reduce) before it steps. A parameter without a gradient on
    this worker counts as zero, so every worker reduces the same buffer."""
    import torch
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    world = dist.get_world_size()

    def hook(optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(world)
        for p, g in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
            p.grad = g

    # MethodBase keeps its optimisers here (the NoisyLabelMethod protocol has no accessor)
    for optimizer in method._optimizers:
        optimizer.register_step_pre_hook(hook)


class MethodCore:
    """A noisy-label method's part of a training run (`harness.EpochCore`): the epoch contract
    of baselines/base.py (scan pass without augmentation, on_epoch_start, training steps with
    flip augmentation, on_epoch_end); its full state in method_state.pt for resume."""

    def __init__(self, loop_config: dict, worker):
        import torch

        from diffinf_ray.models.classifier import build_classifier

        self.train = train = TrainSection.model_validate(loop_config["train"])
        self.seed, self.worker = loop_config["seed"], worker
        num_classes = loop_config["num_classes"]
        torch.manual_seed(self.seed)  # the same initial weights on every worker
        self.method = self.build_method(
            loop_config, lambda: build_classifier(num_classes, train.head_hidden))
        self.method.to(worker.device)
        if worker.world > 1:
            average_gradients_before_step(self.method)

    def build_method(self, loop_config: dict, model_factory):
        """The method this core trains (a noisy-label one here; fairness/ray_train.py builds a
        fairness method instead)."""
        from diffinf_ray.baselines import build_method

        return build_method(loop_config["method"], loop_config["num_classes"],
                            loop_config["num_samples"], loop_config["options"], model_factory,
                            self.train.lr)

    def restore(self, ckpt: ClassifierCheckpoint, directory: Path) -> None:
        import torch

        path = directory / METHOD_STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"baselines: {ckpt.source} has no {METHOD_STATE_FILE} "
                                    "beside it; delete the method's checkpoints to start over")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.method.load_state_dict(saved["method"])

    def _batches(self, shard, epoch: int, augment: bool):
        """A fresh pass over the shard: shuffled and flipped for training, plain for a scan."""
        bs, device = self.train.batch_size, self.worker.device
        if not augment:
            return shard.iter_torch_batches(batch_size=bs, device=device)

        def augmented():
            for batch in shard.iter_torch_batches(batch_size=bs, device=device,
                                                  local_shuffle_buffer_size=4 * bs,
                                                  local_shuffle_seed=self.seed + epoch):
                if self.train.augment:
                    batch["image"] = random_hflip(batch["image"])
                yield batch
        return augmented()

    def train_epoch(self, shard, epoch: int, lr: float) -> dict[str, float]:
        import torch

        from diffinf_ray.baselines.base import run_epoch

        torch.manual_seed(self.seed + 1000 * epoch + self.worker.rank)  # per epoch and worker
        self.method.set_lr(lr)
        return run_epoch(self.method, lambda: self._batches(shard, epoch, True), epoch,
                         scan_batches=lambda: self._batches(shard, epoch, False))

    def eval_model(self):
        return self.method.eval_model()

    def checkpoint_files(self, epoch: int, lr: float) -> dict[str, dict]:
        return {CHECKPOINT_FILE: method_payload(self.method, epoch, lr),
                METHOD_STATE_FILE: {"epoch": epoch, "method": self.method.state_dict()}}

    def describe(self, m: dict[str, float]) -> str:
        # every metric the method reports: loss, and e.g. the selected share (kept_fraction,
        # chosen_fraction) and its clean share (label_precision)
        return " ".join(f"train_{k} {v:.4f}" for k, v in sorted(m.items()))


def _method_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the method's core through the harness."""
    from diffinf_ray.models.harness import TrainWorker, run_epochs

    worker = TrainWorker.current(f"baselines:{loop_config['method']}")
    core = MethodCore(loop_config, worker)
    run_epochs(core, worker, core.train)


# ----------------------------------------------------------------------------- driver side


def train_method(cfg: Config, manifest: Location, checkpoints: Location, name: str,
                 options: dict[str, Any], train_ids: np.ndarray, with_corruption: bool) -> dict:
    """Fit method `name` on the train split of `manifest` with Ray Train (validating on its val
    split), checkpointing to `checkpoints` (resumed when it holds a run). Returns the metrics
    of the last epoch."""
    datasets = {
        "train": split_dataset(manifest, "train", ["sample_id", "image", "label", "is_corrupted"])
        .map_batches(decode_with_index, fn_kwargs={"train_ids": train_ids,
                                                   "with_corruption": with_corruption}),
        "val": split_dataset(manifest, "val", ["image", "label"]).map_batches(decode_for_training),
    }
    loop_config = {
        "train": cfg.train.model_dump(mode="json"),
        "method": name,
        "options": options,
        "num_classes": len(cfg.class_names),
        "num_samples": len(train_ids),
        "seed": cfg.run.seed,
    }
    return fit_with_ray_train(_method_loop, loop_config, datasets, cfg, checkpoints)


def trained_epochs(checkpoints: Location) -> int:
    """Epoch of the last checkpoint under `checkpoints` (0 when there is none)."""
    found = list_checkpoints(checkpoints)
    return (epoch_of(found[-1].path) or 0) if found else 0


def last_reported_metrics(checkpoints: Location) -> dict:
    """The metrics reported with the latest checkpoint of a finished Ray Train run."""
    import ray.train

    result = ray.train.Result.from_path(checkpoints.path, storage_filesystem=checkpoints.fs)
    return {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}


def run_baselines(cfg: Config, root) -> dict:
    """Pipeline entry: train and evaluate every method of `baselines.methods`, in order."""
    from diffinf_ray.models.evaluation import evaluate_checkpoints

    manifest = root.noisy_manifest
    check_manifest(manifest, "baselines", MANIFEST_COLUMNS)
    train_ids, with_corruption = training_ids(manifest)
    options = check_methods(cfg, len(train_ids))
    out = root.child("baselines")
    summary = {}
    for name in cfg.baselines.methods:
        folder = out.child(name)
        checkpoints, evaluation = folder.child("checkpoints"), folder.child("evaluation")
        done = trained_epochs(checkpoints)
        if done >= cfg.train.epochs:  # finished before an interruption: no new worker group
            last_epoch = last_reported_metrics(checkpoints)
        else:
            last_epoch = train_method(cfg, manifest, checkpoints, name, options[name], train_ids,
                                      with_corruption)
            done = trained_epochs(checkpoints)
        saved = evaluation.child("metrics.json")
        if saved.exists() and saved.read_json().get("epoch") == done:
            metrics = saved.read_json()
        else:
            metrics = evaluate_checkpoints(cfg, manifest, checkpoints, evaluation,
                                           extra={"method": name, "options": options[name]})
        summary[name] = {**{k: metrics.get(k) for k in _HEADLINE}, "last_epoch": last_epoch}
        log.info("baselines: %s test accuracy %.1f%%", name, metrics["accuracy"])
    out.child("summary.json").write_json(summary)
    return summary

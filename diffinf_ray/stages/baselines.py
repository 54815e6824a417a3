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
from typing import Any

import numpy as np

from diffinf_ray.config import Config, ConfigError
from diffinf_ray.datasets import check_manifest, decode_for_training, read_split, split_dataset
from diffinf_ray.models.checkpoint import epoch_metrics, epoch_of, list_checkpoints
from diffinf_ray.models.method_training import method_loop
from diffinf_ray.models.training import fit_on_ray
from diffinf_ray.storage import Location

log = logging.getLogger(__name__)

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
    return fit_on_ray(method_loop, loop_config, datasets, cfg, checkpoints)


def trained_epochs(checkpoints: Location) -> int:
    """Epoch of the last checkpoint under `checkpoints` (0 when there is none)."""
    found = list_checkpoints(checkpoints)
    return (epoch_of(found[-1].path) or 0) if found else 0


def last_reported_metrics(checkpoints: Location) -> dict:
    """The metrics reported with the latest checkpoint of a finished run (its metrics.json,
    written beside the weights whichever runner trained them)."""
    found = list_checkpoints(checkpoints)
    figures = epoch_metrics(found[-1]) if found else None
    if figures is None:
        raise FileNotFoundError(f"{checkpoints.display}: no checkpoint with its metrics")
    return {k: v for k, v in figures.items() if isinstance(v, int | float)}


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

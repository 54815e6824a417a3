"""The fairness methods through the project's Ray Train harness (models/harness.py): one
TorchTrainer per cell, placed by the config's `train` section (workers, GPU, CPUs per worker),
with the noisy-label baselines' epoch core (stages/baselines.MethodCore: the epoch contract,
flip augmentation, gradient averaging over workers, method_state.pt for resume) building a
fairness method instead.

In:  the cell's draw (a DataFrame with sample_id, split, image, label, group), its train rows
     decoded with a per-row `group` index (the sorted training group names) and `index`.
Out: <cell dir>/checkpoints/epoch_NNNN/{checkpoint.pt, method_state.pt}; the last epoch's
     test-time network is returned for evaluation in the driver.

`upsample` draws its group-balanced rows once per run (`balanced_epoch` with the cell's seed)
rather than per epoch as the Ray-free loop does: the train dataset is fixed for Ray Train.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffinf_ray.models.method_training import MethodCore


def decode_with_groups(batch: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """Ray Data batch fn: decode_for_training plus `group` (index into `names`) and `index`."""
    from diffinf_ray.datasets import decode_for_training
    from diffinf_ray.fairness.training import group_index

    out = decode_for_training(batch)
    out["group"] = group_index(batch["group"], names)
    out["index"] = batch["row"].astype(np.int64)
    return out


class FairnessCore(MethodCore):
    """MethodCore with a fairness method (methods.py) in place of a noisy-label one."""

    def build_method(self, loop_config: dict, model_factory):
        from diffinf_ray.fairness.methods import build_method

        return build_method(loop_config["method"], loop_config["num_classes"],
                            loop_config["group_counts"], loop_config["options"], model_factory,
                            self.train.lr)


def _fairness_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the fairness core through the harness."""
    from diffinf_ray.models.harness import TrainWorker, run_epochs

    worker = TrainWorker.current(f"fairness:{loop_config['method']}")
    core = FairnessCore(loop_config, worker)
    run_epochs(core, worker, core.train)


def train_cell_ray(cfg, df, entry, seed: int, cell_dir: Path):
    """Fit one cell with Ray Train; returns (test-time network, per-epoch metrics [last])."""
    import ray

    from diffinf_ray.datasets import decode_for_training
    from diffinf_ray.fairness.methods import METHODS
    from diffinf_ray.fairness.reweighting import balanced_epoch
    from diffinf_ray.fairness.runner import _num_classes, _split
    from diffinf_ray.fairness.training import group_index, group_names
    from diffinf_ray.models.checkpoint import list_checkpoints, load_checkpoint
    from diffinf_ray.models.harness import Placement, fit, numeric_metrics
    from diffinf_ray.storage import Location

    train = _split(df, "train").reset_index(drop=True)
    names = group_names(train["group"])
    counts = np.bincount(group_index(train["group"], names), minlength=len(names))
    train["row"] = np.arange(len(train))
    if getattr(METHODS[entry.trainer], "upsample", False):
        train = train.iloc[balanced_epoch(train["group"].to_numpy(),
                                          np.random.default_rng([seed, 0]))]
    val = _split(df, "val")
    datasets = {
        "train": ray.data.from_pandas(train[["image", "label", "group", "row"]])
        .map_batches(decode_with_groups, fn_kwargs={"names": names}, batch_format="numpy"),
        "val": ray.data.from_pandas(val[["image", "label"]])
        .map_batches(decode_for_training, batch_format="numpy"),
    }
    loop_config = {"train": cfg.train.model_dump(mode="json"), "method": entry.trainer,
                   "options": dict(entry.options), "num_classes": _num_classes(cfg),
                   "group_counts": counts.tolist(), "seed": seed}
    checkpoints = Location(str((cell_dir / "checkpoints").resolve()))
    result = fit(_fairness_loop, loop_config, datasets, checkpoints, Placement.of(cfg.train),
                 cache=cfg.train.cache_decoded_images)
    model = load_checkpoint(list_checkpoints(checkpoints)[-1]).build_model()
    return model, [numeric_metrics(result)]

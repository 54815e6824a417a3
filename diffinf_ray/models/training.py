"""Training the classifier with Ray Train, shared by every stage that fits one (train, cleanlab's
folds, removal, retrain, the judges' attribute oracle) and by the baselines' TorchTrainer setup.

In:  a manifest folder's train and val splits (sample_id, split, label (assigned), image).
Out: <checkpoints>/epoch_NNNN/checkpoint.pt every `train.checkpoint_every` epochs and at the last
     epoch (weights, optimizer, epoch, learning rate in force; models/checkpoint.py).

Resume: Ray Train V2 restores a run from `(storage_path, name)`; the loop then continues from
the latest checkpoint's epoch.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from diffinf_ray.config import Config, TrainSection
from diffinf_ray.datasets import decode_for_training, split_dataset
from diffinf_ray.models.checkpoint import CHECKPOINT_FILE, checkpoint_dir_name, to_bytes
from diffinf_ray.storage import Location

# the manifest columns `train_classifier` reads (with `sample_id` when it selects by id or fold)
TRAIN_COLUMNS = ("sample_id", "split", "image", "label")


def learning_rate_at(train: TrainSection, epoch: int) -> float:
    """Learning rate in force during 1-based `epoch` (recorded in each checkpoint for TracIn)."""
    if train.lr_schedule == "constant":
        return train.lr
    progress = (epoch - 1) / max(1, train.epochs)
    return train.lr * 0.5 * (1 + math.cos(math.pi * progress))


def validate(model, val_shard, device) -> dict:
    """{val_loss, val_accuracy (%)} of `model` (put in eval mode) on a Ray Train val shard."""
    import torch
    import torch.nn.functional as F

    model.eval()
    n, correct, loss = 0, 0, 0.0
    with torch.no_grad():
        for batch in val_shard.iter_torch_batches(batch_size=256, device=device):
            logits = model(batch["image"])
            loss += F.cross_entropy(logits, batch["label"], reduction="sum").item()
            correct += (logits.argmax(1) == batch["label"]).sum().item()
            n += len(batch["label"])
    return {"val_loss": loss / max(1, n), "val_accuracy": 100 * correct / max(1, n)}


def _train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import torch
    import torch.nn.functional as F
    from ray.train import Checkpoint

    from diffinf_ray.models.checkpoint import parse
    from diffinf_ray.models.classifier import build_classifier

    train_cfg = TrainSection.model_validate(loop_config["train"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(loop_config["seed"] + rank)
    device = ray.train.torch.get_device()

    model = build_classifier(loop_config["num_classes"], train_cfg.head_hidden)
    if loop_config.get("init_state") is not None:
        missing, unexpected = model.backbone.load_state_dict(loop_config["init_state"], strict=False)
        if unexpected:
            raise ValueError(f"{train_cfg.weights_uri}: unexpected backbone keys {unexpected[:5]}")
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr,
                                 weight_decay=train_cfg.weight_decay)
    start_epoch = 1
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            ckpt = parse((Path(d) / CHECKPOINT_FILE).read_bytes(), f"{resume.path}/{CHECKPOINT_FILE}")
        model.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state is not None:
            optimizer.load_state_dict(ckpt.optimizer_state)
        start_epoch = ckpt.epoch + 1
        if rank == 0:
            print(f"[train] resuming after epoch {ckpt.epoch} from {resume.path}", flush=True)
    model = ray.train.torch.prepare_model(model)
    raw_model = model.module if hasattr(model, "module") else model

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, train_cfg.epochs + 1):
        lr = learning_rate_at(train_cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        total_loss, total_n, total_correct = 0.0, 0, 0
        for batch in train_shard.iter_torch_batches(
            batch_size=train_cfg.batch_size, device=device,
            local_shuffle_buffer_size=4 * train_cfg.batch_size,
            local_shuffle_seed=loop_config["seed"] + epoch,
        ):
            images, labels = batch["image"], batch["label"]
            if len(labels) < 2:  # BatchNorm cannot train on one sample (a last batch of 1)
                continue
            if train_cfg.augment:
                flip = torch.rand(images.shape[0], device=images.device) < 0.5
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
            total_n += len(labels)
            total_correct += (logits.argmax(1) == labels).sum().item()

        metrics = {
            "epoch": epoch,
            "learning_rate": lr,
            "train_loss": total_loss / max(1, total_n),
            "train_accuracy": 100 * total_correct / max(1, total_n),
            **validate(model, val_shard, device),
        }
        if rank == 0:
            print(f"[train] epoch {epoch}/{train_cfg.epochs} lr {lr:.2e} "
                  f"train loss {metrics['train_loss']:.4f} acc {metrics['train_accuracy']:.1f}% | "
                  f"val loss {metrics['val_loss']:.4f} acc {metrics['val_accuracy']:.1f}%",
                  flush=True)
        save = epoch % train_cfg.checkpoint_every == 0 or epoch == train_cfg.epochs
        if save and rank == 0:
            payload = {
                "model_state": {k: v.detach().cpu() for k, v in raw_model.state_dict().items()},
                "optimizer_state": optimizer.state_dict(),
                "epoch": epoch,
                "learning_rate": lr,
                "architecture": raw_model.architecture(),
            }
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / CHECKPOINT_FILE).write_bytes(to_bytes(payload))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=checkpoint_dir_name(epoch))
        else:
            # report() is a barrier: every worker calls it the same number of times.
            ray.train.report(metrics)


def load_init_backbone(train: TrainSection, storage_options) -> dict | None:
    """The optional backbone weight file named by URI + sha256 (never fetched implicitly)."""
    if not train.weights_uri:
        return None
    from diffinf_ray.models.weights import load_verified_state_dict

    return load_verified_state_dict(train.weights_uri, train.weights_sha256, storage_options)


def fit_with_ray_train(train_loop, loop_config: dict, datasets: dict, cfg: Config,
                       checkpoints: Location) -> dict:
    """Run `train_loop(loop_config)` on Ray Train workers (cfg.train's scaling) with Ray Data
    `datasets` ("train" sharded across workers; every worker sees all of "val"), checkpoints
    under `checkpoints` (a run there is resumed by the loop). Returns the last epoch's metrics.
    The one TorchTrainer setup of the classifier and of every baseline method."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from diffinf_ray.ray_session import without_progress_bars, worker_env

    parent, name = checkpoints.path.rsplit("/", 1)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=parent,
            storage_filesystem=checkpoints.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            failure_config=FailureConfig(max_failures=0),
            worker_runtime_env={"env_vars": worker_env()},
        ),
        datasets=without_progress_bars(datasets),
        # every worker validates on the whole (small) val split; only train is sharded
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}


def train_classifier(cfg: Config, manifest: Location, checkpoints: Location, num_classes: int,
                     exclude_ids: frozenset | None = None,
                     fold: tuple[int, int, bool] | None = None) -> dict:
    """Fit on the train split of `manifest` (minus `exclude_ids`, or one side of a K-fold
    partition), validate on its val split, checkpoint to `checkpoints`.

    Returns the metrics of the last epoch.
    """
    columns = ["image", "label"]
    datasets = {
        "train": split_dataset(manifest, "train", columns, exclude_ids, fold)
        .map_batches(decode_for_training),
        "val": split_dataset(manifest, "val", columns).map_batches(decode_for_training),
    }
    loop_config = {
        "train": cfg.train.model_dump(mode="json"),
        "num_classes": num_classes,
        "seed": cfg.run.seed,
        "init_state": load_init_backbone(cfg.train, checkpoints.options),
    }
    return fit_with_ray_train(_train_loop, loop_config, datasets, cfg, checkpoints)

"""Training the classifier on Ray, shared by every stage that fits one (train, cleanlab's
folds, removal, retrain, the judges' attribute oracle): the classifier's core (model, Adam,
one epoch of cross-entropy with flip augmentation) run by the harness (models/harness.py: a
Ray task, or Ray Train's workers).

In:  a manifest folder's train and val splits (sample_id, split, label (assigned), image).
Out: <checkpoints>/epoch_NNNN/checkpoint.pt every `train.checkpoint_every` epochs and at the last
     epoch (weights, optimizer, epoch, learning rate in force; models/checkpoint.py).

Resume: from the run's latest checkpoint (Ray Train V2 restores a run from `(storage_path,
name)`; a fit task from its own index, harness.TaskRun); the harness then continues from that
checkpoint's epoch (weights and Adam state from its checkpoint.pt).
"""

from __future__ import annotations

from pathlib import Path

from diffinf_ray.config import Config, TrainSection
from diffinf_ray.datasets import decode_for_training, split_dataset
from diffinf_ray.models.checkpoint import CHECKPOINT_FILE, ClassifierCheckpoint, classifier_payload
from diffinf_ray.models.harness import (
    Placement,
    ShardInMemory,
    TrainWorker,
    epoch_seed,
    fit,
    numeric_metrics,
    random_hflip,
    run_epochs,
)
from diffinf_ray.storage import Location

# the manifest columns `train_classifier` reads (with `sample_id` when it selects by id or fold)
TRAIN_COLUMNS = ("sample_id", "split", "image", "label")


class ClassifierCore:
    """The classifier's part of a training run (`harness.EpochCore`): ResNet-18 + head, Adam,
    cross-entropy on the assigned labels with optional flip augmentation."""

    def __init__(self, loop_config: dict, worker: TrainWorker):
        import torch

        from diffinf_ray.models.classifier import build_classifier

        self.train = train = TrainSection.model_validate(loop_config["train"])
        self.seed, self.device, self.rank = loop_config["seed"], worker.device, worker.rank
        self.in_memory = ShardInMemory() if train.cache_decoded_images else None
        torch.manual_seed(self.seed + worker.rank)
        model = build_classifier(loop_config["num_classes"], train.head_hidden)
        if loop_config.get("init_state") is not None:
            _, unexpected = model.backbone.load_state_dict(loop_config["init_state"], strict=False)
            if unexpected:
                raise ValueError(f"{train.weights_uri}: unexpected backbone keys {unexpected[:5]}")
        self.optimizer = torch.optim.Adam(model.parameters(), lr=train.lr,
                                          weight_decay=train.weight_decay)
        self.raw = model
        self.model = worker.prepare_model(model)  # to the device; DDP when several

    def restore(self, ckpt: ClassifierCheckpoint, directory: Path) -> None:
        self.raw.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_state)

    def train_epoch(self, shard, epoch: int, lr: float) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        bs = self.train.batch_size
        total_loss, total_n, total_correct = 0.0, 0, 0
        if self.in_memory is not None:  # a cached split: the same batches in every run
            batches = self.in_memory.batches(shard, bs, self.device, self.seed + epoch)
        else:
            batches = shard.iter_torch_batches(batch_size=bs, device=self.device,
                                               local_shuffle_buffer_size=4 * bs,
                                               local_shuffle_seed=self.seed + epoch)
        # the flips drawn from (seed, rank, epoch), not from the process's RNG: an epoch
        # trained again after a lost worker resumed from its checkpoint is the same epoch
        flips = torch.Generator().manual_seed(epoch_seed(self.seed, self.rank, epoch))
        for batch in batches:
            images, labels = batch["image"], batch["label"]
            if len(labels) < 2:  # BatchNorm cannot train on one sample (a last batch of 1)
                continue
            if self.train.augment:
                images = random_hflip(images, flips)
            logits = self.model(images)
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total_loss += loss.item() * len(labels)
            total_n += len(labels)
            total_correct += (logits.argmax(1) == labels).sum().item()
        return {"loss": total_loss / max(1, total_n),
                "accuracy": 100 * total_correct / max(1, total_n)}

    def eval_model(self):
        return self.model

    def checkpoint_files(self, epoch: int, lr: float) -> dict[str, dict]:
        return {CHECKPOINT_FILE: classifier_payload(
            [self.raw], epoch, lr, optimizer_state=self.optimizer.state_dict())}

    def describe(self, m: dict[str, float]) -> str:
        return f"train loss {m['loss']:.4f} acc {m['accuracy']:.1f}%"


def _train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the classifier's core through the harness."""
    worker = TrainWorker.current(loop_config.get("tag", "train"))
    core = ClassifierCore(loop_config, worker)
    run_epochs(core, worker, core.train)


def load_init_backbone(train: TrainSection, storage_options) -> dict | None:
    """The optional backbone weight file named by URI + sha256 (never fetched implicitly)."""
    if not train.weights_uri:
        return None
    from diffinf_ray.models.weights import load_verified_state_dict

    return load_verified_state_dict(train.weights_uri, train.weights_sha256, storage_options)


def fit_on_ray(train_loop, loop_config: dict, datasets: dict, cfg: Config,
                       checkpoints: Location) -> dict:
    """`harness.fit` placed by cfg.train: the one Ray entry of every classifier fit (a Ray task
    or a Ray Train worker group, `train.runner`). Returns the last epoch's metrics."""
    return numeric_metrics(fit(train_loop, loop_config, datasets, checkpoints,
                               Placement.of(cfg.train), cache=cfg.train.cache_decoded_images))


def train_classifier(cfg: Config, manifest: Location, checkpoints: Location, num_classes: int,
                     exclude_ids: frozenset | None = None,
                     fold: tuple[int, int, bool] | None = None,
                     relabel: dict[str, int] | None = None, tag: str = "train") -> dict:
    """Fit on the train split of `manifest` (minus `exclude_ids`, or one side of a K-fold
    partition; `relabel`: {sample_id: label} replacing those train rows' labels), validate on
    its val split, checkpoint to `checkpoints`. `tag` prefixes the fit's console lines
    (`[removal] epoch 2/8 ...`): which of a run's several fits a line is about.

    Returns the metrics of the last epoch.
    """
    columns = ["image", "label"]
    # A cached (small) split carries each row's order key, so the worker can hold it in memory
    # in one order (harness.ShardInMemory) and a seed reproduces its model: Ray Data delivers
    # parallel tasks' blocks in the order they finish, and writes manifests in that order.
    keyed = ["sample_id", *columns] if cfg.train.cache_decoded_images else columns
    datasets = {
        "train": split_dataset(manifest, "train", keyed, exclude_ids, fold, relabel=relabel)
        .map_batches(decode_for_training),
        "val": split_dataset(manifest, "val", columns).map_batches(decode_for_training),
    }
    loop_config = {
        "train": cfg.train.model_dump(mode="json"),
        "num_classes": num_classes,
        "seed": cfg.run.seed,
        "init_state": load_init_backbone(cfg.train, checkpoints.options),
        "tag": tag,
    }
    return fit_on_ray(_train_loop, loop_config, datasets, cfg, checkpoints)

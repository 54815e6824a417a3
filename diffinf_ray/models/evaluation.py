"""Predicting with a classifier checkpoint over Ray Data, and evaluating one on a clean test
split: shared by the evaluate stage and every stage that evaluates its own training (removal,
baselines, retrain, the judges' attribute oracle), and by cleanlab's out-of-fold predictions.

In:  a manifest folder's test rows (sample_id, image, label_clean/label, group), a checkpoints
     folder.
Out: <out>/predictions.parquet (sample_id, label, pred, probs, group) and <out>/metrics.json
     (metrics.py: accuracy, macro OvR AUROC, linear kappa, ECE, per-class and per-group
     accuracy) of the last checkpoint (the paper's last-epoch protocol), and under `best_val`
     {epoch, val_accuracy, accuracy, auroc_macro_ovr, kappa_linear, ece} those of the saved
     checkpoint with the best validation accuracy on the assigned labels (best-validation
     selection; absent for checkpoints saved without their epoch figures). Test labels are
     never noised; `label_clean` is used where known.
Predictions run as a Ray Data actor pool (the model is loaded once per actor; a GPU per actor
when `train.use_gpu`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from diffinf_ray.config import Config
from diffinf_ray.datasets import split_dataset
from diffinf_ray.metrics import classification_metrics
from diffinf_ray.models.checkpoint import (
    best_validation_checkpoint,
    epoch_of,
    list_checkpoints,
    load_checkpoint,
)
from diffinf_ray.storage import Location

# the manifest columns `predict_split` and `evaluate_checkpoints` read
PREDICT_COLUMNS = ("sample_id", "split", "image", "label", "label_clean", "group", "is_corrupted")


class ClassifierActor:
    """Base of the Ray Data actors that run one classifier checkpoint (loaded once per actor,
    in eval mode, on the GPU when asked and present) over batches of PNG bytes."""

    def __init__(self, checkpoint_uri: str, storage_options, use_gpu: bool):
        import torch

        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        ckpt = load_checkpoint(Location(checkpoint_uri, storage_options))
        self.model = ckpt.build_model().to(self.device)


def map_with_classifier(cfg: Config, ds, actor_cls: type[ClassifierActor], checkpoint: Location,
                        **actor_kwargs):
    """`ds.map_batches` with a pool of one `actor_cls` over `checkpoint` (and `actor_kwargs`;
    a GPU when `train.use_gpu`), batches of `evaluate.batch_size`."""
    import ray

    return ds.map_batches(
        actor_cls,
        fn_constructor_kwargs={"checkpoint_uri": checkpoint.uri,
                               "storage_options": checkpoint.options,
                               "use_gpu": cfg.train.use_gpu, **actor_kwargs},
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=cfg.ray.data_actor_cpus,
        num_gpus=1 if cfg.train.use_gpu else 0,
        batch_size=cfg.evaluate.batch_size,
        batch_format="numpy",
    )


class Predictor(ClassifierActor):
    """Ray Data actor: PNG bytes -> class probabilities and predicted class; with `second_uri`,
    also a second checkpoint's probabilities (`probs_second`) from the same decoded images (the
    best-validation checkpoint beside the last one)."""

    def __init__(self, checkpoint_uri: str, storage_options, use_gpu: bool,
                 second_uri: str | None = None):
        super().__init__(checkpoint_uri, storage_options, use_gpu)
        self.second = None
        if second_uri is not None:
            second = load_checkpoint(Location(second_uri, storage_options)).build_model()
            self.second = second.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from diffinf_ray.data.images import to_tensor_batch

        images = torch.from_numpy(to_tensor_batch(list(batch["image"]))).to(self.device)
        out = {k: v for k, v in batch.items() if k != "image"}
        with torch.no_grad():
            probs = torch.softmax(self.model(images).float(), dim=1).cpu().numpy()
            if self.second is not None:
                out["probs_second"] = torch.softmax(self.second(images).float(),
                                                    dim=1).cpu().numpy()
        out["probs"] = probs
        out["pred"] = probs.argmax(1).astype(np.int32)
        return out


def predict_split(cfg: Config, manifest: Location, checkpoint: Location, split: str,
                  fold: tuple[int, int, bool] | None = None, second: Location | None = None):
    """Predictions for one split (or one fold of it) as a pandas DataFrame, one row per sample
    (the manifest's PREDICT_COLUMNS but image, plus probs and pred; and probs_second, those of
    the checkpoint `second`, when given)."""
    ds = split_dataset(manifest, split, [c for c in PREDICT_COLUMNS if c != "split"], fold=fold)
    kwargs = {} if second is None else {"second_uri": second.uri}
    return map_with_classifier(cfg, ds, Predictor, checkpoint, **kwargs).to_pandas()


BEST_VAL_KEYS = ("accuracy", "auroc_macro_ovr", "kappa_linear", "ece")


def evaluate_checkpoints(cfg: Config, manifest: Location, checkpoints: Location,
                         out: Location, extra: dict | None = None) -> dict:
    found = list_checkpoints(checkpoints)
    if not found:
        raise FileNotFoundError(f"no checkpoints under {checkpoints.display}; run the train stage")
    last = found[-1]
    best = best_validation_checkpoint(found)
    second = best[0] if best is not None and best[0].path != last.path else None
    df = predict_split(cfg, manifest, last, "test", second=second)
    if df.empty:
        raise ValueError(f"{manifest.display}: the test split is empty")
    truth = df["label_clean"].fillna(df["label"]).to_numpy(np.int64)
    probs = np.stack(df["probs"].to_numpy())
    groups = df["group"].fillna("unknown").to_numpy() if "group" in df else None
    metrics = classification_metrics(probs, truth, cfg.class_names, groups, cfg.evaluate.ece_bins)
    metrics["checkpoint"] = last.display
    metrics["epoch"] = epoch_of(last.path)
    if best is not None:
        chosen = metrics
        if "probs_second" in df:
            chosen = classification_metrics(np.stack(df["probs_second"].to_numpy()), truth,
                                            cfg.class_names, None, cfg.evaluate.ece_bins)
        metrics["best_val"] = {"epoch": epoch_of(best[0].path),
                               "val_accuracy": best[1]["val_accuracy"],
                               **{k: chosen[k] for k in BEST_VAL_KEYS}}
    metrics.update(extra or {})
    out.child("metrics.json").write_json(metrics)
    out.child("predictions.parquet").write_table(pa.table({
        "sample_id": df["sample_id"].astype(str), "label": truth, "pred": df["pred"],
        "probs": [list(map(float, p)) for p in probs],
        "group": df["group"].astype(str) if "group" in df else None,
    }))
    return metrics

"""Predictor stage: the influence predictor h_w (METHOD.md stage 4), fitted and frozen.

In:  manifest_noisy/ train rows (sample_id, image, label), checkpoints/ (the last one's
     backbone gives g(x)), influence/influence.parquet (is_high: the pseudo-labels).
Out: predictor/predictor.safetensors + config.json   the frozen h_w (edit/predictor.py)
     predictor/partition.parquet   sample_id, is_high, fit (True: fitted on; False: held out),
                                   p_high (the frozen predictor's output on every row)
     predictor/report.json         held-out and fit AUROC, row and positive counts, the
                                   partition settings and the checkpoint g(x) came from
Features g(x) are computed by a Ray Data actor pool (one classifier per actor, a GPU each when
`train.use_gpu`); only the 512-d vectors come back to the driver, which fits the small MLP.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from diffinf_ray.artifacts import PREDICTOR_FOLDER, classifier_checkpoint, read_influence
from diffinf_ray.config import Config
from diffinf_ray.datasets import check_manifest, split_dataset
from diffinf_ray.models.evaluation import ClassifierActor, map_with_classifier
from diffinf_ray.run_root import RunRoot
from diffinf_ray.storage import Location

STAGE_FOLDER = PREDICTOR_FOLDER
MANIFEST_COLUMNS = ("sample_id", "split", "image", "label")


class FeatureExtractor(ClassifierActor):
    """Ray Data actor: PNG bytes -> g(x), the classifier backbone's pooled features."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from diffinf_ray.data.images import to_tensor_batch

        images = torch.from_numpy(to_tensor_batch(list(batch["image"]))).to(self.device)
        with torch.no_grad():
            features = self.model.features(images).float().cpu().numpy()
        return {"sample_id": batch["sample_id"], "label": batch["label"], "features": features}


def training_features(cfg: Config, root: RunRoot, checkpoint: Location):
    """(sample_ids, labels, features) of the train split, sorted by sample_id."""
    ds = split_dataset(root.noisy_manifest, "train", ["sample_id", "image", "label"])
    out = map_with_classifier(cfg, ds, FeatureExtractor, checkpoint).to_pandas()
    out["sample_id"] = out["sample_id"].astype(str)
    out = out.sort_values("sample_id", kind="stable").reset_index(drop=True)
    return (out["sample_id"].to_numpy(), out["label"].to_numpy(np.int64),
            np.stack(out["features"].to_numpy()).astype(np.float32))


def run_predictor(cfg: Config, root: RunRoot) -> dict:
    import torch

    from diffinf_ray.edit.predictor import fit_predictor, partition, save_predictor

    section = cfg.predictor
    check_manifest(root.noisy_manifest, "predictor", MANIFEST_COLUMNS)
    checkpoint = classifier_checkpoint(root)
    ids, labels, features = training_features(cfg, root, checkpoint)
    high = read_influence(root, ["sample_id", "is_high"]).to_pandas()
    high = high.set_index(high["sample_id"].astype(str))["is_high"]
    missing = set(ids) - set(high.index)
    if missing:
        raise ValueError(f"{len(missing)} training rows have no influence score (e.g. "
                         f"{sorted(missing)[0]}); rerun the influence stage")
    is_high = high.loc[ids].to_numpy(bool)
    fit = partition(ids, section.fit_fraction, cfg.run.seed)
    model, report = fit_predictor(
        features, labels, is_high, fit, num_classes=len(cfg.class_names), hidden=section.hidden,
        epochs=section.epochs, lr=section.lr, weight_decay=section.weight_decay,
        batch_size=section.batch_size, balance_classes=section.balance_classes, seed=cfg.run.seed)
    with torch.no_grad():
        p_high = model.p_high(torch.from_numpy(features), torch.from_numpy(labels)).numpy()
    out = root.child(STAGE_FOLDER)
    save_predictor(model, out, report=report)
    out.child("partition.parquet").write_table(pa.table({
        "sample_id": pa.array(ids.tolist(), pa.string()), "label": labels.astype(np.int32),
        "is_high": is_high, "fit": fit, "p_high": p_high.astype(np.float64)}))
    report = {**report, "fit_fraction": section.fit_fraction, "partition_seed": cfg.run.seed,
              "features_from": checkpoint.display}
    out.child("report.json").write_json(report)
    return report

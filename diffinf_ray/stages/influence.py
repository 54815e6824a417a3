"""Influence stage: TracIn self-influence of every training sample, with Ray Data actors.

In:  manifest_noisy/ train rows (sample_id, image, label, label_clean, is_corrupted) and
     checkpoints/ (weights + learning rate per saved epoch); influence.flag_by; with
     flag_by=cleanlab, cleanlab/label_issues.parquet (self_confidence per sample_id).
Out: influence/influence.parquet  sample_id, label, score, is_high, per_checkpoint (list of
                                  lr_t * ||grad||^2), score_last (TracIn over the output layer),
                                  score_early (TracIn over the checkpoints up to the validation
                                  peak; NaN without per-epoch figures), aum (the assigned
                                  label's margin averaged over the checkpoints), loss_last (the
                                  loss detector), is_corrupted;
                                  is_high = the top tau of the `influence.flag_by` detector's
                                  score (TracIn's `score` by default; `oracle`: is_corrupted;
                                  `cleanlab`: 1 - out-of-sample self-confidence)
     influence/detection.json     detection quality of each detector against is_corrupted
                                  (precision/recall of the flagged set, AUROC, precision@k)
     influence/score_hist.png, influence/precision_at_k.png
Scoring streams through an actor pool (each actor loads the checkpoints once, a GPU per actor
when `influence.use_gpu`); only the per-sample scalars come back to the driver, which picks the
top-tau high-influence set (a global ranking).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from diffinf_ray.artifacts import INFLUENCE_FOLDER, INFLUENCE_TABLE
from diffinf_ray.config import Config
from diffinf_ray.datasets import check_manifest, split_dataset
from diffinf_ray.detectors import detection_reports, flagging_detector
from diffinf_ray.detectors.base import column_scores
from diffinf_ray.run_root import RunRoot
from diffinf_ray.storage import Location

MANIFEST_COLUMNS = ("sample_id", "split", "image", "label", "is_corrupted")


class InfluenceScorer:
    """Ray Data actor around the compute core `influence.grad_norms.SelfInfluenceScorer`."""

    def __init__(self, checkpoints_uri: str, storage_options, use_gpu: bool, layers):
        import torch

        from diffinf_ray.influence.grad_norms import SelfInfluenceScorer

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.scorer = SelfInfluenceScorer(Location(checkpoints_uri, storage_options),
                                          device=device, layers=layers)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from diffinf_ray.data.images import to_tensor_batch

        out = self.scorer(to_tensor_batch(list(batch["image"])), batch["label"].astype(np.int64))
        weighted = out["per_checkpoint"] * self.scorer.learning_rates[None, :]
        return {
            "sample_id": batch["sample_id"],
            "label": batch["label"],
            "is_corrupted": batch["is_corrupted"],
            "score": out["score"],
            "per_checkpoint": weighted,
            "score_last": out["per_checkpoint_last"] @ self.scorer.learning_rates,
            "aum": out["margin"].mean(axis=1),
            "loss_last": out["loss"][:, -1].astype(np.float64),
        }


def score_training_set(cfg: Config, manifest: Location, checkpoints: Location):
    """Per-sample scores of the train split as a pandas DataFrame (no images)."""
    import ray

    ds = split_dataset(manifest, "train", ["sample_id", "image", "label", "is_corrupted"])
    scored = ds.map_batches(
        InfluenceScorer,
        fn_constructor_kwargs={"checkpoints_uri": checkpoints.uri,
                               "storage_options": checkpoints.options,
                               "use_gpu": cfg.influence.use_gpu,
                               "layers": cfg.influence.layers},
        compute=ray.data.ActorPoolStrategy(size=cfg.influence.actors),
        num_cpus=cfg.ray.data_actor_cpus,
        num_gpus=1 if cfg.influence.use_gpu else 0,
        batch_size=cfg.influence.batch_size,
        batch_format="numpy",
    )
    df = scored.to_pandas()
    if df.empty:
        raise ValueError(f"{manifest.display}: the training split is empty; nothing to score")
    return df.sort_values("sample_id", kind="stable").reset_index(drop=True)


def plot_detection(df, detection: dict, out: Location) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "tracin" not in detection:
        return
    truth = df["is_corrupted"].to_numpy(bool)
    score = np.log10(df["score"].to_numpy() + 1e-12)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(score.min(), score.max(), 50)
    ax.hist(score[~truth], bins=bins, alpha=0.6, label=f"clean ({(~truth).sum()})", density=True)
    ax.hist(score[truth], bins=bins, alpha=0.6, label=f"corrupted ({truth.sum()})", density=True)
    ax.set_xlabel("log10 TracIn self-influence")
    ax.set_ylabel("density")
    ax.legend()
    ax.set_title(f"AUROC {detection['tracin']['auroc']:.3f}")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    out.child("score_hist.png").write_bytes(buf.getvalue())

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rep in detection.items():
        if isinstance(rep, dict) and "precision_at_k" in rep:
            ax.plot(rep["precision_at_k"]["k"], rep["precision_at_k"]["precision"], label=name)
    ax.axhline(truth.mean(), color="grey", linestyle=":", label="base rate")
    ax.set_xlabel("k (top-k flagged)")
    ax.set_ylabel("precision@k")
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    out.child("precision_at_k.png").write_bytes(buf.getvalue())


def validation_peak(checkpoints: Location) -> int | None:
    """Index (in epoch order) of the saved checkpoint with the best validation accuracy on the
    assigned labels, or None when a checkpoint lacks its epoch's figures (older runs)."""
    from diffinf_ray.models.checkpoint import best_validation_checkpoint, list_checkpoints

    found = list_checkpoints(checkpoints)
    best = best_validation_checkpoint(found)
    return None if best is None else next(i for i, c in enumerate(found) if c is best[0])


def scores_before_peak(per_checkpoint, peak: int | None) -> np.ndarray:
    """TracIn over the checkpoints up to and including the validation peak (`per_checkpoint`:
    rows of lr-weighted squared norms in epoch order): later checkpoints have begun to memorise
    the wrong labels, which shrinks those rows' gradients. NaN everywhere without a peak."""
    weighted = np.asarray([list(r) for r in per_checkpoint], dtype=np.float64)
    if peak is None:
        return np.full(len(weighted), np.nan)
    return weighted[:, :peak + 1].sum(axis=1)


def flagging_scores(df, flag_by: str, root: RunRoot | None = None) -> np.ndarray:
    """The score the flagged set ranks by, per row of the influence table `df`, suspicious =
    high: the `flag_by` detector's column of `df`, or, for a detector of an earlier stage
    (cleanlab), its table under `root` matched by sample_id. The oracle needs the injected
    corruption of every row; the other stage's table must score every training row."""
    detector = flagging_detector(flag_by)
    if detector.stage == INFLUENCE_FOLDER:
        scores = detector.sign * column_scores(df[detector.column])
        what = detector.column
    else:
        import pandas as pd

        rows = detector.scores(root)
        by_id = pd.Series(rows["score"], index=rows["sample_id"])
        scores = by_id.reindex(df["sample_id"].astype(str).to_numpy()).to_numpy(np.float64)
        what = f"score in {detector.stage}/{detector.table}"
    if np.isnan(scores).any():
        raise ValueError(
            f"influence.flag_by={flag_by}: {int(np.isnan(scores).sum())} training rows have no "
            f"{what} (the oracle needs labels corrupted by the noise stage, whose truth is "
            "known; another stage's detector must have scored this run's training split)")
    return scores


def run_influence(cfg: Config, root: RunRoot) -> dict:
    from diffinf_ray.influence.detection import flag_top_fraction

    out = root.child(INFLUENCE_FOLDER)
    check_manifest(root.noisy_manifest, "influence", MANIFEST_COLUMNS)
    df = score_training_set(cfg, root.noisy_manifest, root.checkpoints)
    labels = df["label"].to_numpy(np.int64)
    peak = validation_peak(root.checkpoints)
    df["score_early"] = scores_before_peak(df["per_checkpoint"], peak)
    is_high = flag_top_fraction(flagging_scores(df, cfg.influence.flag_by, root),
                                cfg.influence.tau,
                                labels=labels, per_class=cfg.influence.per_class)
    out.child(INFLUENCE_TABLE).write_table(pa.table({
        "sample_id": df["sample_id"].astype(str),
        "label": labels.astype(np.int32),
        "score": df["score"].to_numpy(np.float64),
        "is_high": is_high,
        "per_checkpoint": [list(map(float, r)) for r in df["per_checkpoint"]],
        "score_last": df["score_last"].to_numpy(np.float64),
        "score_early": df["score_early"].to_numpy(np.float64),
        "aum": df["aum"].to_numpy(np.float64),
        "loss_last": df["loss_last"].to_numpy(np.float64),
        "is_corrupted": pa.array(df["is_corrupted"].tolist(), pa.bool_()),
    }))
    # every registered detector whose score this table holds (TracIn, loss: detectors/)
    detection = detection_reports(root, "influence", cfg.influence.tau, cfg.influence.per_class)
    out.child("detection.json").write_json(detection)
    plot_detection(df, detection, out)
    summary = {"train_rows": len(df), "high_influence_rows": int(is_high.sum()),
               "tau": cfg.influence.tau, "flag_by": cfg.influence.flag_by,
               "validation_peak_checkpoint": peak}
    for name, rep in detection.items():
        if isinstance(rep, dict):
            summary[name] = {k: rep[k] for k in ("precision", "recall", "auroc")}
    return summary

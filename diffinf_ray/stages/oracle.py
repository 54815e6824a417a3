"""Independent judges (synthfaces only) of the edits, in two stages. They never guide an edit.

Stage `judges` (reads only the config: it draws its own data, so it does not re-run when the
edits change, and a sweep's trials share it):
In:  the data, train, lossnets and oracle sections.
Out: judges/manifest/     a separate synthfaces draw (seed run.seed + oracle.seed_offset: other
                          people, other renderings), with clean labels
     judges/checkpoints/  the attribute oracle: the project's classifier trained with Ray Train
                          on the draw's clean labels (train recipe, oracle.epochs)
     judges/evaluation/   its metrics on the draw's test split
     judges/identity/     the identity oracle: an embedder trained on the draw's identities
     judges/report.json   attribute oracle test accuracy; the identity oracle's training report
                          and its thresholds on the draw's test split: the similarity at which 1%
                          of different-person pairs pass and the equal-error-rate threshold (with
                          the share of same-person pairs that pass each, and mean same- and
                          different-person similarity, for scale)

Stage `oracle`:
In:  judges/, edits/edits.parquet (sample_id, label, image, image_original), manifest_noisy/
     (label_clean, is_corrupted of the edited rows).
Out: oracle/judgements.parquet  per edit: oracle_pred_before/after, identity_similarity_oracle
     oracle/report.json   the judges' report, plus: the share of edits the attribute oracle
                          assigns to the target (assigned) label before vs after, overall and split
                          by whether the assigned label was corrupted (and, when the edits carry
                          the gate's verdict, by verdict: gate_accepted / gate_rejected);
                          identity retention: the share of edits whose oracle similarity to the
                          original passes each threshold
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from diffinf_ray.artifacts import EDITS_FOLDER, EDITS_TABLE, judges_root, load_judges, read_edits
from diffinf_ray.config import Config, ConfigError
from diffinf_ray.datasets import check_manifest, read_split, synthfaces_dataset, write_dataset
from diffinf_ray.manifest import QUARANTINE_SCHEMA
from diffinf_ray.models.evaluation import evaluate_checkpoints
from diffinf_ray.models.training import train_classifier
from diffinf_ray.run_root import RunRoot

STAGE_FOLDER = "oracle"
FALSE_ACCEPT_RATE = 0.01


def oracle_config(cfg: Config) -> Config:
    """The run's config for the oracle's own draw and training. Built from the settings the
    judges stage reads (stage_registry): the rest, e.g. the evaluation section, are defaults."""
    tree = cfg.model_dump(mode="json")
    tree["run"]["seed"] = cfg.run.seed + cfg.oracle.seed_offset
    tree["data"]["synthfaces"]["num_samples"] = cfg.oracle.num_samples
    tree["data"]["synthfaces"]["num_identities"] = cfg.oracle.num_identities
    tree["train"]["epochs"] = cfg.oracle.epochs
    tree["train"]["batch_size"] = cfg.oracle.batch_size
    return Config.model_validate(tree)


def _embed(model, pngs, batch: int = 256) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    from diffinf_ray.data.images import to_tensor_batch

    out = []
    with torch.no_grad():
        for i in range(0, len(pngs), batch):
            x = torch.from_numpy(to_tensor_batch(list(pngs[i:i + batch])))
            out.append(F.normalize(model(x).flatten(1), dim=1).numpy())
    return np.concatenate(out)


def _predict(model, pngs, batch: int = 256) -> np.ndarray:
    import torch

    from diffinf_ray.data.images import to_tensor_batch

    out = []
    with torch.no_grad():
        for i in range(0, len(pngs), batch):
            x = torch.from_numpy(to_tensor_batch(list(pngs[i:i + batch])))
            out.append(model(x).argmax(1).numpy())
    return np.concatenate(out)


def identity_thresholds(embeddings: np.ndarray, identities: np.ndarray) -> dict:
    """Similarity thresholds of the identity oracle on its own test split: at 1% false accepts
    among different-person pairs, and at the equal error rate; with the mean similarity of
    same- and different-person pairs and the share of same-person pairs each threshold passes."""
    sims = embeddings @ embeddings.T
    upper = np.triu_indices(len(identities), k=1)
    same = identities[upper[0]] == identities[upper[1]]
    pair_sims = sims[upper]
    if not same.any() or same.all():
        raise ValueError("the identity oracle's test split needs same- and different-person pairs")
    far1 = float(np.quantile(pair_sims[~same], 1.0 - FALSE_ACCEPT_RATE))
    grid = np.unique(pair_sims)
    far = np.array([(pair_sims[~same] > t).mean() for t in grid])
    frr = np.array([(pair_sims[same] <= t).mean() for t in grid])
    eer_t = float(grid[np.argmin(np.abs(far - frr))])
    return {"threshold_at_far_1pct": far1,
            "same_person_accept_rate": float((pair_sims[same] > far1).mean()),
            "threshold_at_eer": eer_t,
            "same_person_accept_rate_at_eer": float((pair_sims[same] > eer_t).mean()),
            "mean_same_person_similarity": float(pair_sims[same].mean()),
            "mean_different_person_similarity": float(pair_sims[~same].mean())}


def _require_synthfaces(cfg: Config, stage: str) -> None:
    if cfg.data.source != "synthfaces":
        raise ConfigError(f"the {stage} stage judges synthfaces edits only (the judges train on "
                          "their own synthfaces draw); remove `judges` and `oracle` from `stages` "
                          "for other data")


def run_judges(cfg: Config, root: RunRoot) -> dict:
    import torch

    from diffinf_ray.data.images import to_tensor_batch
    from diffinf_ray.edit.identity import save_identity_embedder, train_identity_embedder

    _require_synthfaces(cfg, "judges")
    ocfg = oracle_config(cfg)
    jroot = judges_root(root)
    # a resumed stage draws again rather than appending (write_dataset empties the folder)
    write_dataset(synthfaces_dataset(ocfg), jroot.manifest)
    jroot.quarantine.child("quarantine.parquet").write_table(QUARANTINE_SCHEMA.empty_table())

    # attribute oracle: the project's classifier on the draw's clean labels
    train_classifier(ocfg, jroot.manifest, jroot.checkpoints, len(cfg.class_names),
                     tag="judges:attribute")
    attribute_metrics = evaluate_checkpoints(ocfg, jroot.manifest, jroot.checkpoints,
                                             jroot.child("evaluation"))

    # identity oracle: an embedder trained on the draw's people
    train = read_split(jroot.manifest, "train", ["image", "identity"])
    embedder, embedder_report = train_identity_embedder(
        torch.from_numpy(to_tensor_batch(list(train["image"]))), train["identity"].tolist(),
        embed_dim=cfg.lossnets.identity_embed_dim, epochs=cfg.lossnets.identity_epochs,
        lr=cfg.lossnets.lr, batch_size=cfg.lossnets.batch_size,
        seed=cfg.run.seed + cfg.oracle.seed_offset,
        log=lambda line: logging.getLogger(__name__).info("judges: %s", line))
    embedder.eval()
    save_identity_embedder(embedder, jroot.child("identity"))
    test = read_split(jroot.manifest, "test", ["image", "identity"])
    thresholds = identity_thresholds(_embed(embedder, test["image"].to_numpy()),
                                     test["identity"].to_numpy())
    report = {
        "attribute_oracle": {"test_accuracy": attribute_metrics.get("accuracy"),
                             "draw_seed": ocfg.run.seed, "samples": cfg.oracle.num_samples},
        "identity_oracle": {**embedder_report, **thresholds},
    }
    jroot.child("report.json").write_json(report)
    return report


def run_oracle(cfg: Config, root: RunRoot) -> dict:
    _require_synthfaces(cfg, "oracle")
    check_manifest(root.noisy_manifest, "oracle", ("sample_id", "label_clean", "is_corrupted"))
    attribute, embedder, judges = load_judges(root)
    thresholds = judges["identity_oracle"]

    columns = ["sample_id", "label", "image", "image_original"]
    table = root.child(EDITS_FOLDER, EDITS_TABLE)
    gated = "gate_accepted" in pads.dataset(table.path, filesystem=table.fs).schema.names
    edits = read_edits(root, columns + (["gate_accepted"] if gated else [])).to_pandas()
    truth = root.noisy_manifest.read_table(
        columns=["sample_id", "label_clean", "is_corrupted"]).to_pandas()
    edits = edits.merge(truth, on="sample_id", how="left")
    before = _predict(attribute, edits["image_original"].to_numpy())
    after = _predict(attribute, edits["image"].to_numpy())
    sim = (_embed(embedder, edits["image"].to_numpy())
           * _embed(embedder, edits["image_original"].to_numpy())).sum(1)
    target = edits["label"].to_numpy(np.int64)
    root.child(STAGE_FOLDER, "judgements.parquet").write_table(pa.table({
        "sample_id": edits["sample_id"].astype(str), "label": target.astype(np.int32),
        "is_corrupted": pa.array(edits["is_corrupted"].tolist(), pa.bool_()),
        "oracle_pred_before": before.astype(np.int32), "oracle_pred_after": after.astype(np.int32),
        "identity_similarity_oracle": sim.astype(np.float64)}))

    def shares(mask: np.ndarray) -> dict:
        if not mask.any():
            return {"edits": 0}
        return {"edits": int(mask.sum()),
                "oracle_target_before": float((before[mask] == target[mask]).mean()),
                "oracle_target_after": float((after[mask] == target[mask]).mean())}

    corrupted = edits["is_corrupted"].fillna(False).to_numpy(bool)
    report = {
        **judges,
        "all": shares(np.ones(len(edits), bool)),
        "corrupted_label": shares(corrupted),
        "clean_label": shares(~corrupted),
        "identity_retention": (float((sim > thresholds["threshold_at_far_1pct"]).mean())
                               if len(sim) else None),
        "identity_retention_at_eer": (float((sim > thresholds["threshold_at_eer"]).mean())
                                      if len(sim) else None),
        "mean_identity_similarity_oracle": float(sim.mean()) if len(sim) else None,
    }
    if gated:  # what the gate let through, and what it sent back
        accepted = edits["gate_accepted"].fillna(False).to_numpy(bool)
        for name, verdict in (("gate_accepted", accepted), ("gate_rejected", ~accepted)):
            report[name] = {"corrupted_label": shares(corrupted & verdict),
                            "clean_label": shares(~corrupted & verdict)}
    root.child(STAGE_FOLDER, "report.json").write_json(report)
    return report

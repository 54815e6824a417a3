"""Compare edit settings on a finished synthfaces run, judged by its independent judges.

Runs the editor core (no Ray) on the first N high-influence training rows of a run root whose
influence, autoencoder, predictor, lossnets and judges stages are done, once per setting, and
prints per setting: seconds per image, Adam steps taken, share stopped early, p_high after,
pixel MSE to the original (images in [0, 1]; mean and 99th percentile over edits), the median
ratio of fine-detail energy edit / original (`hf_energy`: speckle a decode adds), the share the attribute oracle assigns to the
target label before -> after (all rows, and split into rows whose assigned label is corrupted
and rows whose label is clean), the identity oracle's similarity to the original and the share
above its equal-error-rate threshold. A quick look before a Tune sweep (`diffinf sweep`), which
scores settings by the retrained classifier instead. Each row also names the commit, the
machine, the date, the config and the run root (`--jsonl FILE` appends the rows to FILE).

    python benchmarks/edit_settings.py --config jobs/configs/diffinf_age32.yaml \\
        --root runs/diffinf_age32 --rows 48 \\
        --setting base: \\
        --setting small_lr:lr=0.01 \\
        --setting z_only:optimize=z
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def parse_setting(text: str) -> tuple[str, dict]:
    """'name:key=value,key=value' -> (name, {key: yaml value}) of edit-section overrides."""
    import yaml

    name, _, rest = text.partition(":")
    values = {}
    for item in filter(None, rest.split(",")):
        key, _, raw = item.partition("=")
        values[key.strip()] = yaml.safe_load(raw)
    return name, values


def hf_energy(images: np.ndarray) -> np.ndarray:
    """Per-image mean squared 4-neighbour Laplacian of (B, C, H, W) images: the energy of
    their finest detail. Its ratio edit / original measures the speckle a decode adds."""
    lap = (4 * images[:, :, 1:-1, 1:-1] - images[:, :, :-2, 1:-1] - images[:, :, 2:, 1:-1]
           - images[:, :, 1:-1, :-2] - images[:, :, 1:-1, 2:])
    return (lap ** 2).mean(axis=(1, 2, 3))


def flagged_training_rows(root, limit: int | None = None):
    """The run's high-influence training rows (sample_id, split, image, label, is_corrupted),
    by sample_id, the first `limit` of them: rows whose assigned label is wrong should change,
    the others should keep their label."""
    from diffinf_ray.artifacts import high_influence_ids

    flagged = set(high_influence_ids(root))
    table = root.noisy_manifest.read_table(
        columns=["sample_id", "split", "image", "label", "is_corrupted"]).to_pandas()
    rows = table[table.sample_id.isin(flagged) & (table.split == "train")].sort_values("sample_id")
    return (rows if limit is None else rows.head(limit)).reset_index(drop=True)


def main(argv=None) -> list[dict]:
    import torch

    from diffinf_ray.artifacts import load_judges
    from diffinf_ray.config import load_config
    from diffinf_ray.data.images import to_tensor_batch
    from diffinf_ray.ledger import provenance
    from diffinf_ray.pipeline import open_run_root
    from diffinf_ray.stages.edit import build_editor, to_png_batch
    from diffinf_ray.stages.oracle import _embed, _predict

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--root", required=True, help="the finished run root (run.root)")
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--setting", action="append", required=True,
                    help="name:key=value,... edit-section overrides (name: alone = the config's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the rows here too")
    ap.add_argument("--jsonl", help="append the rows here, one JSON object per line")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # where the figures came from, in every row: the code, the box, the run they judge
    origin = {**provenance(Path(__file__).resolve().parent),
              "threads": args.threads, "config": args.config, "run_root": args.root}

    base = load_config(args.config, [f"run.root={args.root}"])
    root = open_run_root(base)
    rows = flagged_training_rows(root, args.rows)
    images = torch.from_numpy(to_tensor_batch(list(rows.image)))
    labels = torch.as_tensor(rows.label.to_numpy(np.int64))
    attribute, embedder, judges = load_judges(root)
    eer = judges["identity_oracle"]["threshold_at_eer"]
    originals = rows.image.to_numpy()
    corrupted = rows.is_corrupted.fillna(False).to_numpy(bool)
    hits_before = _predict(attribute, originals) == labels.numpy()
    target_before = float(hits_before.mean())
    reference = _embed(embedder, originals)
    detail_before = hf_energy(images.numpy())

    results = []
    for text in args.setting:
        name, values = parse_setting(text)
        cfg = load_config(args.config, [f"run.root={args.root}",
                                        *(f"edit.{k}={json.dumps(v)}" for k, v in values.items())])
        editor = build_editor(cfg, root, "cpu")
        started = time.perf_counter()
        out = {k: [] for k in ("edited", "iterations", "stopped", "p_high_after")}
        for i in range(0, len(rows), cfg.edit.batch_size):
            got = editor.edit(images[i:i + cfg.edit.batch_size],
                              labels[i:i + cfg.edit.batch_size])
            for k in out:
                out[k].append(got[k])
        seconds = time.perf_counter() - started
        out = {k: np.concatenate(v) for k, v in out.items()}
        pngs = np.array(to_png_batch(out["edited"]), dtype=object)
        saved = to_tensor_batch(list(pngs))
        sim = (_embed(embedder, pngs) * reference).sum(1)
        result = {
            "setting": name, **values, "rows": len(rows),
            "seconds_per_image": seconds / len(rows),
            "iterations": float(out["iterations"].mean()),
            "stopped": float(out["stopped"].mean()),
            "p_high_after": float(out["p_high_after"].mean()),
            "pixel_mse": float((mse := (((saved - images.numpy()) / 2) ** 2)
                                .mean(axis=(1, 2, 3))).mean()),
            # the worst edits: a destroyed face shows here before it shows in a mean
            "pixel_mse_p99": float(np.quantile(mse, 0.99)),
            # >1: the edit carries more fine detail / speckle than its original
            "hf_energy_ratio_median": float(np.median(hf_energy(saved) / detail_before)),
            "oracle_target_before": target_before,
            "oracle_target_after": float((hits := _predict(attribute, pngs) == labels.numpy())
                                         .mean()),
            "corrupted_rows": int(corrupted.sum()),
            "oracle_target_corrupted": f"{hits_before[corrupted].mean():.3f} -> "
                                       f"{hits[corrupted].mean():.3f}",
            "oracle_target_clean": f"{hits_before[~corrupted].mean():.3f} -> "
                                   f"{hits[~corrupted].mean():.3f}",
            "identity_similarity": float(sim.mean()),
            "identity_retention_at_eer": float((sim > eer).mean()),
            **origin,
        }
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(result) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()

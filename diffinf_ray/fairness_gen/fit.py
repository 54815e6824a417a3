"""Fitting the generators: one per (label, group) cell, or one per k-means cluster of each
cell, each fine-tune a Ray task (one GPU each when the cluster has GPUs, else one CPU).

In:  a manifest folder (cells.py: sample_id, image, label, group of `split`), a base model.
Out: <out>/<variant>/<cell name>[/c<k>]/   one generator folder each (generator.py)
     <out>/<variant>/generators.json       {variant, method, clusters, base, generators:
                                            [{name, folder, kind, label, group, cluster,
                                              images, fit}]}, in cell then cluster order
The semantic codes z = E(x) of every image are computed once (one Ray task) with the base
model's encoder, which no fine-tune changes; they give each generator its z prior, the
clusters, and DreamBooth's per-label prior (the z of every image with the label).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from diffinf_ray.fairness_gen.cells import Cell, CellRows, read_cells
from diffinf_ray.fairness_gen.settings import BaseModel, FinetuneSettings
from diffinf_ray.fairness_gen.zprior import ZPrior
from diffinf_ray.storage import Location

log = logging.getLogger(__name__)
INDEX_FILE = "generators.json"


@dataclass
class FitJob:
    name: str
    cell: Cell
    cluster: int | None
    images: list[bytes]
    prior: ZPrior  # z prior of the job's own images
    label_prior: ZPrior  # z prior of every image with the cell's label (DreamBooth's prior)
    folder: str


def encode_images(base: BaseModel, images: list[bytes], batch_size: int = 256) -> np.ndarray:
    """z = E(x) (N, d) float32 of PNG images, with the base model's semantic encoder."""
    import torch

    from diffinf_ray.fairness_gen.cells import to_tensor
    from diffinf_ray.fairness_gen.generator import load_base

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_base(base, device)
    with torch.no_grad():
        zs = [model.encode(to_tensor(images[i:i + batch_size]).to(device)).float().cpu()
              for i in range(0, len(images), batch_size)]
    return torch.cat(zs).numpy()


def plan_jobs(cells: dict[Cell, CellRows], codes: dict[Cell, np.ndarray], variant: str,
              out: Location, clusters: int = 0, seed: int = 0) -> list[FitJob]:
    """One job per cell, or (clusters > 0) one per k-means cluster of each cell's z."""
    from diffinf_ray.fairness_gen.clusters import cluster_codes

    by_label: dict[int, list[np.ndarray]] = {}
    for cell, z in codes.items():
        by_label.setdefault(cell.label, []).append(z)
    label_priors = {y: ZPrior.fit(np.concatenate(zs)) for y, zs in by_label.items()}
    jobs = []
    for cell, rows in cells.items():
        z = codes[cell]
        assign = cluster_codes(z, clusters, seed) if clusters else np.zeros(len(z), np.int64)
        for k in range(int(assign.max()) + 1):
            members = np.flatnonzero(assign == k)
            name = f"{variant}/{cell.name}" + (f"/c{k}" if clusters else "")
            folder = out.child(variant, cell.name, *([f"c{k}"] if clusters else []))
            jobs.append(FitJob(name, cell, k if clusters else None,
                               [rows.images[i] for i in members],
                               ZPrior.fit(z[members], spread_from=label_priors[cell.label]),
                               label_priors[cell.label], folder.uri))
    return jobs


def fit_one(job: FitJob, base: BaseModel, settings: FinetuneSettings) -> dict:
    """Fine-tune (or not, for vanilla) one generator and save it; its index record."""
    import torch

    from diffinf_ray.fairness_gen import finetune
    from diffinf_ray.fairness_gen.cells import to_tensor
    from diffinf_ray.fairness_gen.generator import load_base, save_generator

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_base(base, device)
    images, lora, fit = to_tensor(job.images), None, {}
    if settings.method == "lora":
        model, fit = finetune.finetune_lora(model, images, job.cell.label, settings, device)
        lora = {"rank": settings.rank, "alpha": settings.alpha, "targets": fit["lora_targets"]}
    elif settings.method == "dreambooth":
        prior = (finetune.prior_images(model, job.label_prior, job.cell.label, settings, device)
                 if settings.prior_weight > 0 and settings.prior_images > 0 else None)
        model, fit = finetune.finetune_dreambooth(model, images, job.cell.label, settings,
                                                  prior, device)
    save_generator(Location(job.folder), name=job.name, kind=settings.method,
                   label=job.cell.label, group=job.cell.group, cluster=job.cluster, base=base,
                   prior=job.prior, model=model, lora=lora, settings=settings.to_dict(),
                   fit={**fit, "device": device})
    return {"name": job.name, "folder": job.folder, "kind": settings.method,
            "label": job.cell.label, "group": job.cell.group, "cluster": job.cluster,
            "images": len(job.images), "fit": {k: v for k, v in fit.items()
                                               if k != "lora_targets"}}


def task_options(use_gpu: bool = True) -> dict:
    """A GPU per task when asked for and the cluster has one, else a CPU."""
    import ray

    if use_gpu and ray.cluster_resources().get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": 1}


def fit_generators(manifest: Location, out: Location, base: BaseModel,
                   settings: FinetuneSettings, *, variant: str | None = None,
                   clusters: int = 0, split: str = "train", use_gpu: bool = True) -> dict:
    """Fit every generator of `variant` (default: the method's name) as Ray tasks; writes and
    returns the index (module docstring)."""
    import ray

    from diffinf_ray.fairness_gen.generator import resolve_base

    variant = variant or settings.method
    base = base if base.sha256 else resolve_base(base.uri)
    cells = read_cells(manifest, split)
    options = task_options(use_gpu)
    order = [(cell, i) for cell, rows in cells.items() for i in range(len(rows.images))]
    all_z = ray.get(ray.remote(encode_images).options(**options).remote(
        base, [cells[c].images[i] for c, i in order]))
    codes, start = {}, 0
    for cell, rows in cells.items():
        codes[cell] = all_z[start:start + len(rows.images)]
        start += len(rows.images)
    jobs = plan_jobs(cells, codes, variant, out, clusters, settings.seed)
    log.info("fairness generators: %d %s fine-tunes (%s) on %d cells", len(jobs),
             settings.method, options, len(cells))
    remote = ray.remote(fit_one).options(**options)
    records = ray.get([remote.remote(job, base, settings) for job in jobs])
    index = {"variant": variant, "method": settings.method, "clusters": clusters,
             "base": {"uri": base.uri, "sha256": base.sha256}, "generators": records}
    out.child(variant, INDEX_FILE).write_json(index)
    return index

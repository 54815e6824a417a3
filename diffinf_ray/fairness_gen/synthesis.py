"""Group-balanced synthesis: images per (label, group) cell from the fitted generators, by a
pool of Ray Data actors, written as a manifest.

In:  a generator index (fit.py's generators.json as a dict) and `SynthesisSettings` (counts:
     `per_cell`, `total` split equally, or `fill` up to the largest real cell).
Out: <out> (parquet, `SYNTHETIC_SCHEMA`): manifest.SCHEMA's columns, one row per image:
         sample_id   syn-<variant>-<cell name>-<index within the cell, 6 digits>
         split       "train"
         label       the label the image was generated with (int32)
         label_clean, is_corrupted, image_uri, identity   null (nothing is known beyond the
                     conditioning label)
         image       PNG bytes
         group       the cell's group
     plus
         synthetic   true
         generator   the generator's name: <variant>/<cell name>[/c<cluster>]
A cell fitted per cluster gets its count split over its clusters in proportion to their sizes
(largest remainder), so the synthetic cell keeps the real cell's mix. Each row's seed is
crc32("<seed>:<sample_id>"): an image depends on its id alone, not on batching or actors.
"""

from __future__ import annotations

import time
import zlib

import numpy as np
import pyarrow as pa

from diffinf_ray.fairness_gen.cells import Cell
from diffinf_ray.fairness_gen.settings import SynthesisSettings
from diffinf_ray.manifest import SCHEMA
from diffinf_ray.storage import Location

SYNTHETIC_SCHEMA = pa.schema([*SCHEMA, pa.field("synthetic", pa.bool_()),
                              pa.field("generator", pa.string())])


def split_count(n: int, weights: list[int]) -> list[int]:
    """n split in proportion to `weights` by largest remainder (ties to the earlier entry)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = n * w / w.sum()
    counts = np.floor(exact).astype(int)
    rest = n - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts.tolist()


def cell_counts(real: dict[Cell, int], settings: SynthesisSettings) -> dict[Cell, int]:
    """Synthetic images per cell (settings' docstring); cells in sorted order."""
    cells = sorted(real)
    if settings.per_cell is not None:
        return {c: int(settings.per_cell) for c in cells}
    if settings.total is not None:
        return dict(zip(cells, split_count(int(settings.total), [1] * len(cells)), strict=True))
    top = max(real.values())
    return {c: top - real[c] for c in cells}


def plan_rows(index: dict, settings: SynthesisSettings) -> list[dict]:
    """One row per image to make: sample_id, folder, generator, label, group, seed."""
    by_cell: dict[Cell, list[dict]] = {}
    for record in index["generators"]:
        by_cell.setdefault(Cell(int(record["label"]), record["group"]), []).append(record)
    real = {c: sum(r["images"] for r in recs) for c, recs in by_cell.items()}
    rows = []
    for cell, n in cell_counts(real, settings).items():
        records = by_cell[cell]
        shares = split_count(n, [r["images"] for r in records]) if n else [0] * len(records)
        i = 0
        for record, share in zip(records, shares, strict=True):
            for _ in range(share):
                sid = f"syn-{index['variant']}-{cell.name}-{i:06d}"
                rows.append({"sample_id": sid, "folder": record["folder"],
                             "generator": record["name"], "label": cell.label,
                             "group": cell.group,
                             "seed": zlib.crc32(f"{settings.seed}:{sid}".encode())})
                i += 1
    return rows


def manifest_table(sample_ids, labels, groups, pngs, generators) -> pa.Table:
    n = len(sample_ids)
    nulls = pa.nulls(n)
    columns = {"sample_id": pa.array(sample_ids, pa.string()), "split": pa.array(["train"] * n),
               "label": pa.array(labels, pa.int32()), "label_clean": nulls.cast(pa.int32()),
               "is_corrupted": nulls.cast(pa.bool_()), "image": pa.array(pngs, pa.binary()),
               "image_uri": nulls.cast(pa.string()), "group": pa.array(groups, pa.string()),
               "identity": nulls.cast(pa.string()), "synthetic": pa.array([True] * n),
               "generator": pa.array(generators, pa.string())}
    return pa.table([columns[f.name] for f in SYNTHETIC_SCHEMA], schema=SYNTHETIC_SCHEMA)


def to_png_batch(images: np.ndarray) -> list[bytes]:
    """(B, 3, H, W) float in [-1, 1] -> PNG bytes each, rounded to uint8 as the edit stage's."""
    from diffinf_ray.data.images import encode_png

    pixels = np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return [encode_png(p.transpose(1, 2, 0)) for p in pixels]


class SynthesisActor:
    """Ray Data actor: planned rows -> manifest rows (module docstring). Holds every generator
    it has met (loaded once, on the actor's GPU when it has one)."""

    def __init__(self, steps: int, guidance_scale: float):
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.steps, self.guidance_scale = steps, guidance_scale
        self.generators = {}

    def _generator(self, folder: str):
        from diffinf_ray.fairness_gen.generator import load_generator

        if folder not in self.generators:
            self.generators[folder] = load_generator(Location(folder), self.device)
        return self.generators[folder]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        folders = batch["folder"].astype(str)
        pngs: list[bytes | None] = [None] * len(folders)
        for folder in dict.fromkeys(folders):
            rows = np.flatnonzero(folders == folder)
            images = self._generator(folder).sample(
                [int(s) for s in batch["seed"][rows]], self.steps, self.guidance_scale,
                self.device)
            for row, png in zip(rows, to_png_batch(images.numpy()), strict=True):
                pngs[row] = png
        return manifest_table(batch["sample_id"].astype(str).tolist(),
                              batch["label"].astype(np.int32).tolist(),
                              batch["group"].astype(str).tolist(), pngs,
                              batch["generator"].astype(str).tolist())


def synthesize(index: dict, settings: SynthesisSettings, out: Location) -> dict:
    """Make and write the synthetic manifest at `out` (its old contents deleted); summary
    with the counts per cell and per generator and the wall time."""
    import ray

    from diffinf_ray.datasets import write_dataset

    rows = plan_rows(index, settings)
    if not rows:
        raise ValueError("nothing to synthesise: every cell's count is 0")
    gpu = settings.use_gpu and ray.cluster_resources().get("GPU", 0) >= 1
    start = time.perf_counter()
    ds = ray.data.from_items(rows).map_batches(
        SynthesisActor, fn_constructor_kwargs={"steps": settings.steps,
                                               "guidance_scale": settings.guidance_scale},
        compute=ray.data.ActorPoolStrategy(size=settings.actors), num_cpus=1,
        num_gpus=1 if gpu else 0, batch_size=settings.batch_size, batch_format="numpy")
    write_dataset(ds, out)
    per_cell: dict[str, int] = {}
    per_generator: dict[str, int] = {}
    for row in rows:
        key = Cell(row["label"], row["group"]).name
        per_cell[key] = per_cell.get(key, 0) + 1
        per_generator[row["generator"]] = per_generator.get(row["generator"], 0) + 1
    return {"variant": index["variant"], "images": len(rows), "per_cell": per_cell,
            "per_generator": per_generator, "seconds": time.perf_counter() - start,
            "gpu": gpu, "manifest": out.display}

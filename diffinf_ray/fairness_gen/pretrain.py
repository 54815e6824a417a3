"""The synthetic-data variants as pretrainers of `diffinf fairness` (fairness/methods.py's plug
point): a method entry

    - {name: lora_pretrain, pretrain: lora, pretrain_epochs: 2,
       pretrain_options: {finetune: {steps: 300}, synthesis: {per_cell: 200}, clusters: 3,
                          base: synthfaces32_diffae}}

fits the variant's generators on the cell's real training rows (fit.py, Ray tasks), writes a
group-balanced synthetic manifest (synthesis.py, Ray Data actors), pretrains the classifier on
it with ERM and fine-tunes it on the real rows (runner.py). Every name of variants.VARIANTS is
a pretrainer: vanilla, lora, dreambooth, lora_cluster, dreambooth_cluster.

`pretrain_options` (all optional):
    base          the base diffusion autoencoder: a shipped name (diffae/family.py SHIPPED), a
                  family folder or a model.safetensors path (default: synthfaces32_diffae)
    base_sha256   its pin (a shipped name's is known)
    finetune      FinetuneSettings fields but `method` and `seed` (the variant and the cell's seed)
    synthesis     SynthesisSettings fields but `seed`; default `total` = the number of real
                  training rows, split equally over the (label, group) cells
    clusters      k of a *_cluster variant

In:  the real training rows of one (severity, seed) draw (manifest.SCHEMA columns; `group`).
Out: under the cell's folder, synthetic/real_train/ (those rows as a manifest), synthetic/<variant>/
     (the generators, generators.json, manifest/), synthetic/summary.json (the variant's
     summary); returned: the synthetic manifest's rows (`synthetic` true, `generator`).
Runs on the Ray the caller started, or on a local one it starts and stops.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from diffinf_ray.fairness_gen.settings import FinetuneSettings, SynthesisSettings
from diffinf_ray.fairness_gen.variants import VARIANTS

DEFAULT_BASE = "synthfaces32_diffae"
OPTION_KEYS = ("base", "base_sha256", "finetune", "synthesis", "clusters")
FINETUNE_KEYS = tuple(f.name for f in fields(FinetuneSettings) if f.name not in ("method", "seed"))
SYNTHESIS_KEYS = tuple(f.name for f in fields(SynthesisSettings) if f.name != "seed")


def check_options(options: dict) -> str | None:
    """What is wrong with a `pretrain_options` mapping, or None (checked when a config loads)."""
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        return f"unknown pretrain_options {unknown}; known: {list(OPTION_KEYS)}"
    for key, known in (("finetune", FINETUNE_KEYS), ("synthesis", SYNTHESIS_KEYS)):
        given = options.get(key) or {}
        if not isinstance(given, dict):
            return f"pretrain_options.{key} must be a mapping"
        unknown = sorted(set(given) - set(known))
        if unknown:
            return f"unknown pretrain_options.{key} {unknown}; known: {list(known)}"
    return None


def settings_of(options: dict, seed: int, real_rows: int):
    """(FinetuneSettings, SynthesisSettings) of `options` for a cell of `seed`."""
    synthesis = dict(options.get("synthesis") or {})
    if not {"per_cell", "total", "fill"} & {k for k, v in synthesis.items() if v}:
        synthesis["total"] = real_rows  # as many synthetic images as real ones, balanced
    return (FinetuneSettings(**(options.get("finetune") or {}), seed=seed),
            SynthesisSettings(**synthesis, seed=seed))


def check_classes(base, class_names) -> None:
    """The base model must be conditioned on exactly this study's classes."""
    from diffinf_ray.fairness_gen.generator import load_base

    num_classes = load_base(base).config.num_classes
    if num_classes != len(class_names):
        raise ValueError(
            f"base model {base.uri} is conditioned on {num_classes} classes; this study's data "
            f"has {len(class_names)} ({', '.join(class_names)}): give data.age_bins the "
            "model's bins, or another base model")


def real_manifest_table(rows):
    """The real training rows as a manifest table (manifest.SCHEMA; absent columns null)."""
    import pyarrow as pa

    from diffinf_ray.manifest import SCHEMA

    columns = {}
    for field in SCHEMA:
        if field.name in rows:
            columns[field.name] = pa.array(rows[field.name].tolist(), field.type)
        else:
            columns[field.name] = pa.nulls(len(rows), field.type)
    columns["split"] = pa.array(["train"] * len(rows), pa.string())
    return pa.table(columns, schema=SCHEMA)


@contextmanager
def ray_running():
    """The caller's Ray, or a local one for the duration."""
    import os

    import ray

    if ray.is_initialized():
        yield
        return
    from diffinf_ray.ray_session import start_local_ray

    start_local_ray(os.cpu_count() or 2, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def synthetic_pretrainer(variant: str):
    """The pretrainer (fairness/methods.py) of synthetic-data variant `variant`."""
    from diffinf_ray.storage import Location

    def pretrain(train_rows, context: dict):
        from diffinf_ray.fairness_gen.generator import resolve_base

        options = dict(context.get("options") or {})
        problem = check_options(options)
        if problem:
            raise ValueError(problem)
        base = resolve_base(options.get("base", DEFAULT_BASE), options.get("base_sha256"))
        check_classes(base, context["class_names"])
        finetune, synthesis = settings_of(options, int(context["seed"]), len(train_rows))
        work = Path(context["run_dir"]) / "synthetic"
        real = Location(str(work / "real_train"))
        real.child("part-0.parquet").write_table(real_manifest_table(train_rows))
        with ray_running():
            summary = VARIANTS[variant](real, Location(str(work)), base, synthesis, finetune,
                                        options.get("clusters"))
        (work / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        return Location(summary["manifest"]).read_table().to_pandas()

    pretrain.check_options = check_options
    pretrain.needs_ray = True  # the runner joins or starts Ray (its logs off the console)
    return pretrain


def synthetic_pretrainers() -> dict:
    """Every variant as a pretrainer, by the variant's name."""
    return {name: synthetic_pretrainer(name) for name in VARIANTS}

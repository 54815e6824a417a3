"""The synthetic-data variants by name: what a fairness experiment plugs in as "pretrain on
synthetic data made by X".

    variant = VARIANTS["lora"]                      # or variant_by_name("lora")
    summary = variant(manifest, out, base, synthesis, finetune=None, clusters=None)

Each variant fits its generators on the manifest's train cells (fit.py, Ray tasks) and writes a
balanced synthetic manifest (synthesis.py, Ray Data actors):

    <out>/<name>/<cell name>[/c<k>]/   the generators        <out>/<name>/generators.json
    <out>/<name>/manifest/             the synthetic rows (synthesis.SYNTHETIC_SCHEMA)

The summary: {variant, method, clusters, generators, fit_seconds, synthesis: synthesize()'s
summary (per-cell counts, wall time), manifest: the manifest folder's URI}.

| name               | fine-tune                                   | generators          |
|--------------------|---------------------------------------------|---------------------|
| vanilla            | none (the base model, the cell's z prior)   | one per cell        |
| lora               | LoRA on the UNet's conv/attention layers    | one per cell        |
| dreambooth         | full UNet, prior preservation               | one per cell        |
| lora_cluster       | LoRA                                        | one per k-means cluster of each cell |
| dreambooth_cluster | full UNet, prior preservation               | one per k-means cluster of each cell |
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from diffinf_ray.fairness_gen.settings import BaseModel, FinetuneSettings, SynthesisSettings
from diffinf_ray.storage import Location

DEFAULT_CLUSTERS = 3


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    clusters: int = 0

    def __call__(self, manifest: Location, out: Location, base: BaseModel,
                 synthesis: SynthesisSettings, finetune: FinetuneSettings | None = None,
                 clusters: int | None = None) -> dict:
        """Fit this variant's generators and synthesise; `finetune`'s method is this
        variant's whatever it says; `clusters` overrides k for a *_cluster variant."""
        from diffinf_ray.fairness_gen.fit import fit_generators
        from diffinf_ray.fairness_gen.synthesis import synthesize

        settings = replace(finetune or FinetuneSettings(), method=self.method)
        k = self.clusters if clusters is None or not self.clusters else clusters
        start = time.perf_counter()
        index = fit_generators(manifest, out, base, settings, variant=self.name, clusters=k,
                               use_gpu=synthesis.use_gpu)
        fit_seconds = time.perf_counter() - start
        folder = out.child(self.name, "manifest")
        summary = synthesize(index, synthesis, folder)
        return {"variant": self.name, "method": self.method, "clusters": k,
                "generators": len(index["generators"]), "fit_seconds": fit_seconds,
                "synthesis": summary, "manifest": folder.uri}


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("vanilla", "vanilla"),
    Variant("lora", "lora"),
    Variant("dreambooth", "dreambooth"),
    Variant("lora_cluster", "lora", DEFAULT_CLUSTERS),
    Variant("dreambooth_cluster", "dreambooth", DEFAULT_CLUSTERS),
)}


def variant_by_name(name: str) -> Variant:
    if name not in VARIANTS:
        raise KeyError(f"unknown synthetic-data variant {name!r}; choose from {sorted(VARIANTS)}")
    return VARIANTS[name]

"""A saved generator: one (label, group[, cluster]) cell's way to make images, and loading it.

Folder (a local path or s3:// prefix; written by `save_generator`):

    config.json   {format: GENERATOR_FORMAT,
                   config: {name, kind (vanilla | lora | dreambooth), label, group, cluster,
                            base: {uri, sha256}, z_prior: {mean, std, count},
                            lora: {rank, alpha, targets} (lora only), settings},
                   files: {<weights file>: {sha256}} (none for vanilla), fit: the fine-tune's
                   summary (steps, seconds, losses, parameter counts)}
    lora.safetensors    the adapter's tensors only (lora)
    model.safetensors   every tensor of the fine-tuned model (dreambooth)

A generator never copies the base model: it names it by URI and sha256, and loading checks both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffinf_ray.diffae.weights import (
    WeightsError,
    load_state_strict,
    read_weights_folder,
    sha256_hex,
    write_weights_folder,
)
from diffinf_ray.fairness_gen.settings import BaseModel
from diffinf_ray.fairness_gen.zprior import ZPrior
from diffinf_ray.storage import Location, absolute_uri

GENERATOR_FORMAT = "diffinf-fairness-generator/1"
WEIGHTS = {"lora": "lora.safetensors", "dreambooth": "model.safetensors"}


def resolve_base(uri: str, sha256: str | None = None) -> BaseModel:
    """The base model with its sha256 recorded (a shipped name's, a family folder's recorded
    one, or a file's own), local paths made absolute (Ray workers may run elsewhere)."""
    import json
    from pathlib import Path

    from diffinf_ray.diffae.family import CONFIG_FILE, SHIPPED, WEIGHTS_FILE

    if uri in SHIPPED:
        digest = SHIPPED[uri][1]
    elif Path(uri).is_dir():
        digest = json.loads((Path(uri) / CONFIG_FILE).read_text())["files"][WEIGHTS_FILE]["sha256"]
    else:
        digest = sha256_hex(Location(uri).read_bytes())
    if sha256 is not None and sha256.lower() != digest:
        raise WeightsError(f"{uri}: sha256 {digest}, expected {sha256}")
    return BaseModel(uri if uri in SHIPPED else absolute_uri(uri), digest)


def load_base(base: BaseModel, device: str | torch.device = "cpu"):
    """The base diffusion autoencoder (diffae.family), sha256 checked, in eval mode."""
    from diffinf_ray.diffae.family import load_family

    return load_family(base.uri, sha256=base.sha256, map_location=device).to(device).eval()


@dataclass
class Generator:
    name: str
    kind: str
    label: int
    group: str
    cluster: int | None
    prior: ZPrior
    model: torch.nn.Module

    def sample(self, seeds: list[int], steps: int = 20, guidance_scale: float = 1.0,
               device: str | torch.device = "cpu") -> torch.Tensor:
        """(len(seeds), 3, H, W) images in [-1, 1] (sampling.sample_images)."""
        from diffinf_ray.fairness_gen.sampling import sample_images

        return sample_images(self.model, self.prior, self.label, seeds, steps, guidance_scale,
                             device)


def save_generator(folder: Location, *, name: str, kind: str, label: int, group: str,
                   cluster: int | None, base: BaseModel, prior: ZPrior, model=None,
                   lora: dict | None = None, settings: dict | None = None,
                   fit: dict | None = None) -> dict:
    """Write a generator folder (module docstring); `model` is the fine-tuned network (not
    used for vanilla). Returns the manifest."""
    from diffinf_ray.fairness_gen.lora import lora_state

    config = {"name": name, "kind": kind, "label": int(label), "group": group,
              "cluster": cluster, "base": {"uri": base.uri, "sha256": base.sha256},
              "z_prior": prior.to_dict(), "lora": lora, "settings": settings or {}}
    if kind == "vanilla":
        manifest = {"format": GENERATOR_FORMAT, "config": config, "files": {}, "fit": fit or {}}
        folder.child("config.json").write_json(manifest)
        return manifest
    state = lora_state(model) if kind == "lora" else model.state_dict()
    return write_weights_folder(folder, state, GENERATOR_FORMAT, config, WEIGHTS[kind],
                                extra={"fit": fit or {}})


def load_generator(folder: Location, device: str | torch.device = "cpu") -> Generator:
    """A saved generator with its model on `device`, in eval mode; every sha256 checked."""
    from diffinf_ray.fairness_gen.lora import add_lora, load_lora_state

    manifest = folder.child("config.json").read_json()
    if manifest.get("format") != GENERATOR_FORMAT:
        raise WeightsError(f"{folder.display}: format {manifest.get('format')!r}, "
                           f"expected {GENERATOR_FORMAT!r}")
    config = manifest["config"]
    kind = config["kind"]
    model = load_base(BaseModel(**config["base"]), "cpu")
    if kind in WEIGHTS:
        _, state, where = read_weights_folder(folder, GENERATOR_FORMAT, WEIGHTS[kind])
        if kind == "lora":
            spec = config["lora"]
            model = load_lora_state(add_lora(model, spec["rank"], spec["alpha"],
                                             spec["targets"]), state)
        else:
            model = load_state_strict(model, state, where)
    return Generator(config["name"], kind, int(config["label"]), config["group"],
                     config["cluster"], ZPrior.from_dict(config["z_prior"]),
                     model.to(device).eval().requires_grad_(False))

"""Saving and loading diffusion-autoencoder weights: safetensors + a JSON config, no pickle.

Layout of a saved model (a local folder or an s3:// prefix):

    <uri>/config.json        {"format", "config": DiffAEConfig fields, "files": {name: {"sha256"}}}
    <uri>/model.safetensors  the trained weights
    <uri>/ema.safetensors    the EMA weights (optional; preferred for inference when present)

Every file's sha256 is recorded in config.json and checked on load, and a caller may pin the
expected sha256 of the weights it loads. safetensors holds only tensors, so loading executes no
code.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from diffinf_ray.models.weights import WeightsError  # one error type for every weight file
from diffinf_ray.storage import Location

if TYPE_CHECKING:
    from diffinf_ray.diffae.model import DiffAEModel

FORMAT = "diffinf-diffae/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMA_WEIGHTS_FILE = "ema.safetensors"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_sha256(data: bytes, expected: str | None, source: str) -> str:
    """The sha256 of `data`; raises WeightsError if `expected` is given and differs."""
    digest = sha256_hex(data)
    if expected is not None and digest != expected.lower():
        raise WeightsError(f"{source}: sha256 {digest} does not match the expected {expected}")
    return digest


def state_dict_to_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes of a state dict (contiguous CPU copies; shared storage is fine)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return save_safetensors_bytes(tensors, metadata=metadata)


def state_dict_from_bytes(data: bytes, source: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_bytes(data)
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise WeightsError(f"{source}: not a readable safetensors file ({err})") from err


def save_autoencoder(model: DiffAEModel, uri: str | Location, ema_state: dict | None = None) -> dict:
    """Write config.json, model.safetensors and (if given) ema.safetensors; returns the manifest."""
    folder = uri if isinstance(uri, Location) else Location(str(uri))
    files = {WEIGHTS_FILE: model.state_dict()}
    if ema_state is not None:
        files[EMA_WEIGHTS_FILE] = ema_state
    manifest = {"format": FORMAT, "config": model.config.to_dict(), "files": {}}
    for name, state in files.items():
        data = state_dict_to_bytes(state, metadata={"format": FORMAT})
        folder.child(name).write_bytes(data)
        manifest["files"][name] = {"sha256": sha256_hex(data)}
    folder.child(CONFIG_FILE).write_bytes(json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def write_weights_folder(folder: Location, state: dict[str, torch.Tensor], fmt: str,
                         config: dict, weights_file: str, extra: dict | None = None) -> dict:
    """A small model's folder: <folder>/<weights_file> (safetensors) and <folder>/config.json
    ({format, config, files: {weights_file: {sha256}}, **extra}); returns the manifest."""
    data = state_dict_to_bytes(state, metadata={"format": fmt})
    folder.child(weights_file).write_bytes(data)
    manifest = {"format": fmt, "config": config,
                "files": {weights_file: {"sha256": sha256_hex(data)}}, **(extra or {})}
    folder.child(CONFIG_FILE).write_bytes(json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def read_weights_folder(folder: Location, fmt: str,
                        weights_file: str) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(manifest, state dict, weights display name) of a folder written by
    `write_weights_folder`: format and the recorded sha256 checked; WeightsError naming the
    file otherwise."""
    manifest_loc = folder.child(CONFIG_FILE)
    try:
        manifest = json.loads(manifest_loc.read_bytes().decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{manifest_loc.display}: not valid JSON ({err})") from err
    if manifest.get("format") != fmt:
        raise WeightsError(
            f"{manifest_loc.display}: format {manifest.get('format')!r}, expected {fmt!r}")
    recorded = manifest.get("files", {}).get(weights_file, {}).get("sha256")
    if recorded is None:
        raise WeightsError(f"{manifest_loc.display}: records no sha256 for {weights_file}")
    loc = folder.child(weights_file)
    data = loc.read_bytes()
    check_sha256(data, recorded, f"{loc.display} (hash recorded in {CONFIG_FILE})")
    return manifest, state_dict_from_bytes(data, loc.display), loc.display


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str):
    """`model` with `state` loaded strictly; WeightsError naming `where` on a mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{where}: weights do not fit the config: {err}") from err
    return model


def load_autoencoder(
    uri: str | Location,
    *,
    use_ema: bool = True,
    sha256: str | None = None,
    map_location: str | torch.device = "cpu",
) -> DiffAEModel:
    """The model saved at `uri`, in eval mode, with the EMA weights when present and `use_ema`.

    `sha256` pins the expected hash of the weights file that is loaded.
    """
    folder = uri if isinstance(uri, Location) else Location(str(uri))
    manifest_loc = folder.child(CONFIG_FILE)
    try:
        manifest = json.loads(manifest_loc.read_bytes().decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{manifest_loc.display}: not valid JSON ({err})") from err
    if manifest.get("format") != FORMAT:
        raise WeightsError(f"{manifest_loc.display}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    files = manifest.get("files", {})
    name = EMA_WEIGHTS_FILE if use_ema and EMA_WEIGHTS_FILE in files else WEIGHTS_FILE
    if name not in files:
        raise WeightsError(f"{manifest_loc.display}: lists no {name}")
    loc = folder.child(name)
    data = loc.read_bytes()
    check_sha256(data, files[name]["sha256"], f"{loc.display} (hash recorded in {CONFIG_FILE})")
    check_sha256(data, sha256, loc.display)
    from diffinf_ray.diffae.model import DiffAEConfig, DiffAEModel  # diffusers: only when used

    model = DiffAEModel(DiffAEConfig.from_dict(_tuples(manifest["config"])))
    state = state_dict_from_bytes(data, loc.display)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{loc.display}: weights do not fit the config: {err}") from err
    return model.to(map_location).eval()


def _tuples(config: dict) -> dict:
    """JSON turns tuples into lists; the frozen config wants tuples back."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}

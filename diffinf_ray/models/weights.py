"""Pretrained weights by URI + sha256: read from a local path or s3://, checked, never fetched
implicitly from the internet, never unpickled as code.

Formats: `.safetensors`, or a torch file readable with `torch.load(weights_only=True)` holding a
state dict (optionally under a "state_dict" / "model_state" key).
"""

from __future__ import annotations

import hashlib
import io

import torch

from diffinf_ray.storage import Location, StorageError, StorageOptions


class WeightsError(ValueError):
    """A weight file that is missing, altered or not a plain state dict; names the file."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_verified_bytes(uri: str, sha256: str | None, options: StorageOptions | None = None) -> bytes:
    location = Location(uri, options)
    try:
        data = location.read_bytes()
    except StorageError as err:
        raise WeightsError(
            f"weight file {location.display} not found or unreadable ({err}). Nothing is downloaded "
            "implicitly: copy the file there (local path or s3://) and give its sha256 in the config."
        ) from err
    if sha256 is not None and sha256_of(data).lower() != sha256.lower():
        raise WeightsError(
            f"{location.display}: sha256 {sha256_of(data)} does not match the expected {sha256}"
        )
    return data


def load_verified_state_dict(uri: str, sha256: str | None,
                             options: StorageOptions | None = None) -> dict[str, torch.Tensor]:
    data = read_verified_bytes(uri, sha256, options)
    where = Location(uri, options).display
    if uri.split("?", 1)[0].endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for unsafe or corrupt files
        raise WeightsError(f"{where}: not a weights-only torch file ({err})") from err
    for key in ("state_dict", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{where}: expected a state dict of tensors")
    return obj

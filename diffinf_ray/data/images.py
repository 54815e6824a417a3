"""Image bytes <-> arrays: the one decoder every stage uses.

- `decode_image` fully decodes (so a truncated file is caught here, not three stages later),
  applies the EXIF orientation and returns an (H, W, 3) uint8 RGB array;
- `square_resize` centre-crops to a square and resizes with LANCZOS;
- `encode_png` writes deterministic PNG bytes (same array -> same bytes, no metadata);
- `to_tensor_batch` turns encoded images into the float32 (B, 3, H, W) batch in [-1, 1]
  that the classifier and the diffusion autoencoder take.

Truncation is detected with Pillow's default `ImageFile.LOAD_TRUNCATED_IMAGES = False`; on top
of that a PNG without its IEND chunk and a WebP shorter than its RIFF header says are reported
as truncated, because Pillow decodes both without complaint or with an unhelpful message.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"IEND\xaeB`\x82"  # the IEND chunk type and its (constant) CRC
PNG_COMPRESS_LEVEL = 6


class ImageDecodeError(ValueError):
    """Bytes that are not a readable image; the message says why."""


class TruncatedImageError(ImageDecodeError):
    """An image whose file ends before its data does."""


def _check_container(data: bytes) -> None:
    """Truncation checks Pillow does not make (or reports only as a generic decoder error)."""
    if data.startswith(PNG_SIGNATURE) and data.rfind(PNG_IEND) == -1:
        raise TruncatedImageError("truncated image (PNG without its IEND chunk)")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 8:
        (riff_size,) = struct.unpack("<I", data[4:8])
        if len(data) < riff_size + 8:
            raise TruncatedImageError(
                f"truncated image (WebP of {len(data)} bytes, header says {riff_size + 8})"
            )


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # High bit-depth greyscale: scale to 8 bits instead of Pillow's clipping convert().
        arr = np.asarray(img, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if img.mode.startswith("I;16") or (img.mode == "I" and peak > 255):
            arr = arr / 257.0
        elif img.mode == "F" and peak <= 1.0:
            arr = arr * 255.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def decode_image(data: bytes, *, min_side: int | None = None) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB array, fully decoded.

    `min_side`: when given, JPEGs may be decoded at a reduced DCT scale whose shorter side is
    still at least `min_side` (much faster for large photos that are resized down anyway).
    Raises `TruncatedImageError` for a cut-off file and `ImageDecodeError` for anything else
    that cannot be decoded.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageDecodeError(f"expected encoded image bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    _check_container(data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if min_side is not None and img.format == "JPEG":
                w, h = img.size
                scale = min_side / max(1, min(w, h))
                if scale < 1:
                    img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb_array(img)
    except Image.UnidentifiedImageError as err:
        raise ImageDecodeError("not a recognised image format") from err
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"too many pixels: {err}") from err
    except (OSError, EOFError) as err:
        message = str(err)
        if isinstance(err, EOFError) or "truncated" in message.lower():
            raise TruncatedImageError("truncated image") from err
        raise ImageDecodeError(message or type(err).__name__) from err
    except (SyntaxError, ValueError, struct.error) as err:
        # Pillow reports broken chunk structure as SyntaxError, bad fields as ValueError.
        raise ImageDecodeError(f"corrupt image data: {err}") from err


def _check_array(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got dtype {array.dtype}")
    if array.ndim == 2:
        return array
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"expected an (H, W), (H, W, 1) or (H, W, 3) array, got shape {array.shape}")
    return array[:, :, 0] if array.shape[2] == 1 else array


def encode_png(array: np.ndarray) -> bytes:
    """(H, W, 3) or (H, W) uint8 array -> PNG bytes; identical arrays give identical bytes."""
    array = _check_array(array)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(
        buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False
    )
    return buf.getvalue()


def square_resize(array: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square (the shorter side), then LANCZOS-resize to (size, size)."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    array = _check_array(array)
    h, w = array.shape[:2]
    side = min(h, w)
    if side == 0:
        raise ValueError(f"cannot resize an empty image of shape {array.shape}")
    top, left = (h - side) // 2, (w - side) // 2
    crop = array[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(crop)
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize(
        (size, size), resample=Image.Resampling.LANCZOS
    )
    return np.asarray(resized, dtype=np.uint8).copy()


def to_tensor_batch(images: Sequence[bytes], size: int | None = None) -> np.ndarray:
    """Encoded images -> float32 (B, 3, H, W) in [-1, 1] (x / 127.5 - 1).

    All images must decode to the same shape unless `size` is given, in which case each is
    `square_resize`d to (size, size) first.
    """
    if len(images) == 0:
        raise ValueError("to_tensor_batch needs at least one image")
    arrays = []
    for i, data in enumerate(images):
        try:
            arr = decode_image(data, min_side=size)
        except ImageDecodeError as err:
            raise type(err)(f"image {i} of the batch: {err}") from err
        arrays.append(square_resize(arr, size) if size is not None else arr)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images in a batch differ in shape {sorted(shapes)}; pass size=")
    batch = np.stack(arrays).astype(np.float32)
    batch = batch.transpose(0, 3, 1, 2) / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(batch, dtype=np.float32)

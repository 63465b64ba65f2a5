"""Limits on encoded images from Redis, checked before any pixel is decoded.

A JPEG is checked for size in bytes and, from its header alone, for pixel count, so an oversized
frame or a decompression bomb is refused without spending memory on it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


class PoisonInput(ValueError):
    """An input that can never be processed. ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(detail)


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header, without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, size = img.format, img.size
    except Image.DecompressionBombError as exc:
        raise PoisonInput("oversized", f"image pixels exceed limits: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for garbage
        raise PoisonInput("bad_image", f"unreadable image header: {exc}") from None
    if fmt != "JPEG":
        raise PoisonInput("bad_image", f"not a JPEG but {fmt}")
    return size


def check_limits(data: bytes, max_bytes: int, max_pixels: int) -> None:
    """PoisonInput when the encoded image is too big in bytes or (by its header) in pixels."""
    if len(data) > max_bytes:
        raise PoisonInput("oversized", f"image of {len(data)} bytes exceeds {max_bytes}")
    width, height = jpeg_size(data)
    if width * height > max_pixels:
        raise PoisonInput("oversized", f"image of {width}x{height} pixels exceeds {max_pixels}")


def decode_rgb_array(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """A JPEG as an HxWx3 uint8 RGB array, within limits; PoisonInput otherwise."""
    check_limits(data, max_bytes, max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.array(img.convert("RGB"))  # writable: torch refuses read-only arrays
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for garbage
        raise PoisonInput("bad_image", f"corrupt JPEG: {exc}") from None

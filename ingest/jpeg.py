"""JPEG encoding of RGB frames, downscaled to a maximum width (OpenCV: libjpeg-turbo, fast)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    width: int
    height: int


def fit_width(width: int, height: int, max_width: int) -> tuple[int, int]:
    """(width, height) scaled down to at most ``max_width`` wide, aspect kept, both even and >= 2.

    Even sizes let YUV 4:2:0 paths (swscale, cv2 I420) convert without padding.
    """
    if width <= max_width:
        return width, height
    new_h = max(2, round(height * max_width / width))
    return max(2, max_width - max_width % 2), max(2, new_h - new_h % 2)


def check_rgb(rgb: np.ndarray, what: str = "frame") -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{what} must be an HxWx3 uint8 RGB array, got shape {rgb.shape} dtype {rgb.dtype}")
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"{what} is empty: shape {rgb.shape}")


def encode_jpeg(rgb: np.ndarray, quality: int, max_width: int) -> EncodedImage:
    """Encode an HxWx3 uint8 RGB array as JPEG, downscaling (INTER_AREA) above ``max_width``."""
    check_rgb(rgb)
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be within 1..100, got {quality}")
    height, width = rgb.shape[:2]
    new_w, new_h = fit_width(width, height, max_width)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if (new_w, new_h) != (width, height):
        bgr = cv2.resize(bgr, (new_w, new_h), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"JPEG encoding of a {width}x{height} frame failed")
    return EncodedImage(buf.tobytes(), new_w, new_h)

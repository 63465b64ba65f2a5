"""Turn frame entries from the stream into RGB uint8 tensors, with limits against poison input
(see :mod:`fallwatch.images`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from fallwatch.images import PoisonInput, check_limits
from fallwatch.schemas import FrameMessage, SchemaError, decode


@dataclass(frozen=True)
class DecodedFrame:
    entry_id: str
    msg: FrameMessage
    jpegs: tuple[bytes, ...]     # kept for offloading without re-encoding
    image: torch.Tensor          # 3xHxW uint8 RGB: the frame the edge model scores


def decode_rgb(data: bytes, max_bytes: int, max_pixels: int) -> torch.Tensor:
    """A JPEG as a 3xHxW uint8 RGB tensor; PoisonInput when too big or corrupt."""
    check_limits(data, max_bytes, max_pixels)
    return _decode_jpeg(data)


def _decode_jpeg(data: bytes) -> torch.Tensor:
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        raise PoisonInput("bad_image", f"corrupt JPEG: {exc}") from None


def representative(n_images: int) -> int:
    """Index of the frame of a clip that the (image) edge model scores: the middle one."""
    return n_images // 2


def decode_entry(entry_id: str, fields: dict, max_bytes: int, max_pixels: int) -> DecodedFrame:
    try:
        msg, images = decode(fields, expect=FrameMessage)
    except SchemaError as exc:
        raise PoisonInput("bad_message", str(exc)) from None
    for data in images:  # every image of a clip must be within limits: the cloud model gets them all
        check_limits(data, max_bytes, max_pixels)
    image = _decode_jpeg(images[representative(len(images))])
    return DecodedFrame(entry_id, msg, tuple(images), image)

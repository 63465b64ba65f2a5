"""Frames made in code for tests: small JPEGs and frame-stream entries."""

from __future__ import annotations

import io
import time

import numpy as np
import redis
from PIL import Image

from fallwatch.keys import Keys
from fallwatch.schemas import FrameMessage, ItemKind, encode


def jpeg(width: int = 96, height: int = 80, seed: int = 0, quality: int = 85) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def frame_entry(camera: str, seq: int, *, n_images: int = 1, gt_fall: bool | None = None,
                captured_at: float | None = None, size: tuple[int, int] = (96, 80)) -> dict[bytes, bytes]:
    kind = ItemKind.CLIP if n_images > 1 else ItemKind.IMAGE
    msg = FrameMessage.make(camera, seq, captured_at=captured_at or time.time(), width=size[0], height=size[1],
                            kind=kind, n_images=n_images, gt_fall=gt_fall)
    return encode(msg, [jpeg(*size, seed=seq * 31 + i) for i in range(n_images)])


def push_frames(client: redis.Redis, keys: Keys, n: int, camera: str = "cam1", start: int = 0, **kw) -> list[str]:
    """XADD n frames; returns their frame ids."""
    pipe = client.pipeline()
    for seq in range(start, start + n):
        pipe.xadd(keys.frames_stream(), frame_entry(camera, seq, **kw))
    pipe.execute()
    return [f"{camera}:{seq}" for seq in range(start, start + n)]

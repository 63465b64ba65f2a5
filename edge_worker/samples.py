"""Inputs for ``fallwatch models check``: a drawn test image and clip, or frames read from files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 640, 480
FLOOR_Y = 400


def figure_frame(angle_deg: float, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """A room with a stick figure whose feet stay on the floor, tilted by ``angle_deg`` (90 = lying)."""
    img = Image.new("RGB", (width, height), (200, 190, 170))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, FLOOR_Y, width, height), fill=(120, 90, 60))
    feet = (width * 0.35, FLOOR_Y + 35 * math.sin(math.radians(angle_deg)))  # lying: on the floor
    a = math.radians(angle_deg)

    def at(dist: float, side: float = 0.0) -> tuple[float, float]:
        """A point ``dist`` px along the body axis from the feet, ``side`` px across it."""
        return (feet[0] + dist * math.sin(a) + side * math.cos(a), feet[1] - dist * math.cos(a) + side * math.sin(a))

    colour, limb = (40, 60, 160), 12
    draw.line([at(0, -25), at(110), at(0, 25)], fill=colour, width=limb)  # legs
    draw.line([at(110), at(230)], fill=colour, width=limb + 8)  # torso
    draw.line([at(140, -55), at(215), at(140, 55)], fill=colour, width=limb)  # arms
    hx, hy = at(262)
    draw.ellipse((hx - 28, hy - 28, hx + 28, hy + 28), fill=(230, 180, 150))
    return np.array(img)


def drawn_image() -> np.ndarray:
    """640x480 RGB: a person lying on the floor."""
    return figure_frame(90.0)


def drawn_clip(frames: int = 16) -> np.ndarray:
    """``frames`` x 480 x 640 x 3: a person falling over, from upright to lying."""
    return np.stack([figure_frame(90.0 * i / (frames - 1)) for i in range(frames)])


def read_image(path: Path) -> np.ndarray:
    """An image file as an RGB uint8 HxWx3 array."""
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


def read_clip(path: Path, num_frames: int) -> np.ndarray:
    """Up to ``num_frames`` frames spread uniformly over a video file (PyAV), as TxHxWx3 RGB uint8.

    Frames are counted by demuxing packets (no decoding), then only the chosen ones are kept, so a
    long video never sits in memory. A video shorter than ``num_frames`` gives all its frames.
    """
    import av

    with av.open(str(path)) as container:
        total = sum(1 for p in container.demux(video=0) if p.size)
    wanted = set(np.linspace(0, max(total - 1, 0), num_frames).round().astype(int).tolist())
    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
    if not frames:
        raise ValueError(f"{path}: no video frame could be decoded")
    return np.stack(frames)

"""Small videos and images made in code for the ingest tests (no data files needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

BITS = 8  # frame index encoded as 8 black/white blocks across the picture


def index_frame(i: int, width: int = 160, height: int = 120) -> np.ndarray:
    """An RGB frame whose left-to-right blocks spell ``i`` in binary (white = 1), robust to H.264."""
    img = np.zeros((height, width, 3), np.uint8)
    block = width // BITS
    for b in range(BITS):
        if (i >> (BITS - 1 - b)) & 1:
            img[:, b * block:(b + 1) * block] = 255
    return img


def read_index(rgb: np.ndarray) -> int:
    """The index spelled by :func:`index_frame` (after any uniform resize)."""
    width = rgb.shape[1]
    block = width / BITS
    mid = rgb.shape[0] // 2
    value = 0
    for b in range(BITS):
        x = int((b + 0.5) * block)
        value = (value << 1) | int(rgb[mid, x].mean() > 127)
    return value


def write_mp4(path: Path, frames: int, fps: int = 18, width: int = 160, height: int = 120,
              bframes: bool = True, gop: int | None = None) -> Path:
    """An H.264 MP4 whose frame i shows :func:`index_frame` (i)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        opts = {"preset": "ultrafast" if not bframes else "veryfast", "tune": "zerolatency" if not bframes else "film"}
        if gop:
            opts["g"] = str(gop)
        stream.options = opts
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(index_frame(i % 256, width, height), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_yolo(root: Path, split: str, labels: list[int | None], size: int = 64) -> Path:
    """A YOLO split with one image per label: class id of its single box, or None for no label file."""
    from PIL import Image

    images, lbls = root / split / "images", root / split / "labels"
    images.mkdir(parents=True, exist_ok=True)
    lbls.mkdir(parents=True, exist_ok=True)
    for i, cls in enumerate(labels):
        Image.fromarray(index_frame(i, size, size)).save(images / f"img{i:03d}.jpg", quality=95)
        if cls is not None:
            (lbls / f"img{i:03d}.txt").write_text(f"{cls} 0.5 0.5 0.2 0.2\n")
    return root

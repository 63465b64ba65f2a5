"""Planted models for the budget benchmark and its tests: real frames through the real workers,
with the edge's agreement score and verdict written into the frame itself.

A planted frame's width carries its agreement (``(width - 16) / 1000``) and its height's parity
the edge verdict (odd: fall), so the edge worker decodes, scores, routes and enqueues it exactly
as a camera frame; only the numbers are chosen. :class:`SleepyCloud` answers like the cloud
model after ``item_s`` seconds per item, so the cloud's measured service time is real.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
import redis
from PIL import Image

from fallwatch.keys import Keys
from fallwatch.schemas import FrameMessage, encode

MIN_SIDE = 16


def planted_jpeg(agreement: float, is_fall: bool) -> tuple[bytes, int, int]:
    width = MIN_SIDE + round(agreement * 1000)
    height = MIN_SIDE + int(is_fall)
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 90, 90)).save(buf, format="JPEG", quality=50)
    return buf.getvalue(), width, height


def planted_entry(camera: str, seq: int, agreement: float, is_fall: bool,
                  captured_at: float | None = None) -> dict[bytes, bytes]:
    data, width, height = planted_jpeg(agreement, is_fall)
    msg = FrameMessage.make(camera, seq, captured_at=captured_at or time.time(), width=width, height=height)
    return encode(msg, [data])


def push_planted(client: redis.Redis, keys: Keys, camera: str, items: list[tuple[float, bool]],
                 start: int = 0) -> list[str]:
    """XADD one planted frame per (agreement, is_fall); returns their frame ids."""
    pipe = client.pipeline(transaction=False)
    for i, (agreement, fall) in enumerate(items):
        pipe.xadd(keys.frames_stream(), planted_entry(camera, start + i, agreement, fall))
    pipe.execute()
    return [f"{camera}:{start + i}" for i in range(len(items))]


@dataclass(frozen=True)
class PlantedEdgeScores:
    p_fall: np.ndarray
    features: np.ndarray
    wall_s: float


class PlantedScorer:
    """Edge model stand-in: p_fall 0.9 / 0.1 from the height's parity, features (agreement, p_fall)."""

    model_id = "planted"

    def score(self, images) -> PlantedEdgeScores:
        started = time.perf_counter()
        shapes = np.array([tuple(img.shape[-2:]) for img in images], dtype=np.float32)  # (H, W) of 3xHxW
        fall = (shapes[:, 0] - MIN_SIDE) % 2 == 1
        p_fall = np.where(fall, 0.9, 0.1).astype(np.float32)
        agreement = np.clip((shapes[:, 1] - MIN_SIDE) / 1000.0, 0.0, 1.0)
        return PlantedEdgeScores(p_fall, np.stack([agreement, p_fall], axis=1), time.perf_counter() - started)


class PlantedSwitcher:
    """Switcher stand-in: the agreement planted in the frame; ``threshold`` as a checkpoint's."""

    def __init__(self, threshold: float, offload_fraction: float | None = None):
        self.threshold = threshold
        self.card = {"calibration": {"offload_fraction": offload_fraction}}

    def agreement(self, features: np.ndarray) -> np.ndarray:
        return features[:, 0]


@dataclass(frozen=True)
class SleepyScores:
    p_fall: np.ndarray
    wall_s: float
    energy_j: float | None = None


class SleepyCloud:
    """Cloud model stand-in that takes ``item_s`` seconds per item (sleeping, so the CPU is free)."""

    model_id = "sleepy"

    def __init__(self, item_s: float):
        self.item_s = item_s

    def score(self, items) -> SleepyScores:
        started = time.perf_counter()
        time.sleep(self.item_s * len(items))
        return SleepyScores(np.full(len(items), 0.8, dtype=np.float32), time.perf_counter() - started)

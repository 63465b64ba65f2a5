"""Which frames to keep: fps sampling by timestamp, clip assembly, motion gating, pacing."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import cv2
import numpy as np

from ingest.records import FrameRecord


class FpsSampler:
    """Keep the first frame of every 1/fps slot of media time.

    Slots are counted from the first timestamp seen: at 18 fps sampled to 2 fps, frames 0, 9,
    18, ... are kept. :meth:`wants` peeks without committing, so a decoder can skip decoding
    frames that will not be kept; :meth:`take` decides, in presentation order. A timestamp
    that goes backwards (a new file, a restarted stream) starts a new timeline.
    """

    def __init__(self, fps: float, tolerance: float = 1e-3):
        if fps <= 0:
            raise ValueError(f"sampling fps must be > 0, got {fps}")
        self.fps = fps
        self.tolerance = tolerance  # in slots: absorbs float error in timestamps
        self._t0: float | None = None
        self._last_slot = -1

    def _slot(self, t: float) -> int:
        assert self._t0 is not None
        return math.floor((t - self._t0) * self.fps + self.tolerance)

    def wants(self, t: float | None) -> bool:
        if t is None or self._t0 is None or t < self._t0:
            return True
        return self._slot(t) > self._last_slot

    def take(self, t: float) -> bool:
        if self._t0 is None or t < self._t0 or self._slot(t) < self._last_slot - 1:
            self._t0, self._last_slot = t, 0
            return True
        slot = self._slot(t)
        if slot > self._last_slot:
            self._last_slot = slot
            return True
        return False

    def reset(self) -> None:
        self._t0, self._last_slot = None, -1


class ClipAssembler:
    """Turns sampled frames into clips: ``frames`` frames taken at ``stride``, windows back to back.

    A window spans ``(frames - 1) * stride + 1`` sampled frames. A new segment (reconnect, next
    file) or a change of frame size drops the partial clip.
    """

    def __init__(self, frames: int, stride: int = 1):
        if frames < 1 or stride < 1:
            raise ValueError(f"clip frames and stride must be >= 1, got {frames}, {stride}")
        self.frames = frames
        self.stride = stride
        self._parts: list[FrameRecord] = []
        self._index = 0  # position of the next frame inside the current window

    def push(self, rec: FrameRecord) -> list[FrameRecord] | None:
        """Add a sampled frame; returns the finished clip (a list of ``frames`` records) or None."""
        if self._parts and not self._fits(rec):
            self.reset()
        if self._index % self.stride == 0:
            self._parts.append(rec)
        self._index += 1
        if len(self._parts) < self.frames:
            return None
        clip = self._parts
        self.reset()
        return clip

    def _fits(self, rec: FrameRecord) -> bool:
        first = self._parts[0]
        return rec.segment == first.segment and rec.rgb.shape == first.rgb.shape

    def reset(self) -> None:
        self._parts, self._index = [], 0


class MotionGate:
    """Cheap motion detection: compare the green channel, shrunk to ``width`` columns by averaging
    blocks of pixels, with the previous frame's.

    ``moved`` is True when more than ``threshold`` of the blocks changed by more than
    ``pixel_delta`` levels. Averaging (not every n-th pixel) keeps sensor and compression noise and
    a standing person's sway within a block out: on UP-Fall's standing clip at 1 fps it passes 14
    of 44 frames where every 4th pixel passed 21, and every frame of the fall and walking clips
    either passed (docs/benchmarks.md). :meth:`admit` lets an item through when it moved, or when
    nothing was sent for ``keepalive_s`` seconds.
    """

    def __init__(self, threshold: float, keepalive_s: float, pixel_delta: int = 25, width: int = 80):
        self.threshold = threshold
        self.keepalive_s = keepalive_s
        self.pixel_delta = pixel_delta
        self.width = width
        self._prev: np.ndarray | None = None
        self._last_sent: float | None = None

    def _small(self, rgb: np.ndarray) -> np.ndarray:
        if rgb.shape[1] <= self.width:
            return rgb[:, :, 1].astype(np.int16)
        size = (self.width, max(1, round(rgb.shape[0] * self.width / rgb.shape[1])))
        return cv2.resize(rgb[:, :, 1], size, interpolation=cv2.INTER_AREA).astype(np.int16)

    def moved(self, rgb: np.ndarray) -> bool:
        small = self._small(rgb)
        prev, self._prev = self._prev, small
        if prev is None or prev.shape != small.shape:
            return True
        changed = np.count_nonzero(np.abs(small - prev) > self.pixel_delta)
        return changed > self.threshold * small.size

    def admit(self, moved: bool, now: float) -> bool:
        due = self._last_sent is None or now - self._last_sent >= self.keepalive_s
        if moved or due:
            self._last_sent = now
            return True
        return False


class Pacer:
    """Emit media timestamps in wall-clock time (``speed`` 1 = real time, 0 = as fast as possible).

    A timestamp going backwards or a new segment starts a new timeline, ``gap_s`` (media time)
    after the last item, so files played one after another (or in a loop) keep their pace.
    """

    def __init__(self, speed: float = 1.0, gap_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        if speed < 0:
            raise ValueError(f"speed must be >= 0, got {speed}")
        self.speed = speed
        self.gap_s = gap_s
        self.clock = clock
        self._anchor: tuple[float, float, int] | None = None  # (wall, pts, segment)
        self._last_due = float("-inf")

    def delay(self, pts: float, segment: int = 0) -> float:
        """Seconds to wait before emitting ``pts`` (0 if late)."""
        if self.speed == 0:
            return 0.0
        now = self.clock()
        if self._anchor is None or segment != self._anchor[2] or pts < self._anchor[1]:
            self._anchor = (max(now, self._last_due + self.gap_s / self.speed), pts, segment)
        wall0, pts0, _ = self._anchor
        self._last_due = wall0 + (pts - pts0) / self.speed
        return max(0.0, self._last_due - now)

    def wait(self, pts: float, segment: int, stop: threading.Event) -> bool:
        """Sleep until ``pts`` is due; False if ``stop`` was set meanwhile."""
        delay = self.delay(pts, segment)
        if delay > 0:
            return not stop.wait(delay)
        return not stop.is_set()

"""What flows inside ingest: decoded frames, the buffer between decoder and publisher, ids.

A source's decoder thread turns video into :class:`FrameRecord` objects and puts them into a
:class:`FrameBuffer`; the publisher thread takes them out, encodes and XADDs them. When the
publisher falls behind, the buffer's :class:`BufferPolicy` decides: live cameras drop the
oldest frame (a stale frame is worth less than a fresh one), replays wait (never drop).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

import numpy as np
import redis

from fallwatch.logging import redact_text


@dataclass(frozen=True, eq=False)
class FrameRecord:
    """One sampled frame. ``seq`` counts sampled frames of this source run (not the stream id).

    ``rgb`` is HxWx3 uint8. ``segment`` changes whenever the timeline restarts (a reconnect, the
    next file of a replay, another loop), so clips never span two segments.
    """

    camera_id: str
    seq: int
    captured_at: float
    rgb: np.ndarray
    gt_fall: bool | None = None
    pts_s: float = 0.0
    segment: int = 0
    source: str = ""

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


class BufferPolicy(StrEnum):
    DROP_OLDEST = "drop_oldest"  # live cameras: keep the newest frames
    WAIT = "wait"  # replays: block the decoder, never drop


class FrameBuffer:
    """A bounded FIFO between one producer and one consumer thread, with an explicit full policy."""

    def __init__(self, capacity: int, policy: BufferPolicy):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.policy = BufferPolicy(policy)
        self._items: deque[FrameRecord] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._dropped = 0

    def put(self, item: FrameRecord, stop: threading.Event | None = None) -> bool:
        """Add an item. Returns False if it was not added (buffer closed or ``stop`` set while waiting)."""
        with self._cond:
            while len(self._items) >= self.capacity and not self._closed:
                if self.policy is BufferPolicy.DROP_OLDEST:
                    self._items.popleft()
                    self._dropped += 1
                    break
                if stop is not None and stop.is_set():
                    return False
                self._cond.wait(0.1)
            if self._closed:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> FrameRecord | None:
        """The oldest item, or None after ``timeout`` seconds or when closed and empty."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """No more puts; ``get`` drains what is left, then returns None at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._closed and not self._items

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def take_dropped(self) -> int:
        """Frames dropped since the last call (to add to a counter)."""
        with self._cond:
            n, self._dropped = self._dropped, 0
            return n


class SeqAllocator:
    """Frame sequence numbers that keep growing across restarts, reserved from Redis in blocks.

    Frame ids are ``camera:seq``; starting again at 0 after a restart would reuse ids that the
    alerts service has already seen. One INCRBY per ``block`` frames keeps the cost negligible.
    """

    def __init__(self, client: redis.Redis, key: str, block: int = 256):
        self.client = client
        self.key = key
        self.block = block
        self._next = 0
        self._end = 0

    def next(self) -> int:
        if self._next >= self._end:
            self._end = int(self.client.incrby(self.key, self.block))
            self._next = self._end - self.block
        seq = self._next
        self._next += 1
        return seq


def describe_source(url: str) -> str:
    """A printable name of a source without credentials or query: scheme://host:port/path or a file name."""
    if url.startswith("webcam:"):
        return url
    parts = urlsplit(url)
    if len(parts.scheme) <= 1 or parts.scheme == "file":  # a path (or a Windows drive letter)
        return (parts.path if parts.scheme == "file" else url).rstrip("/").rsplit("/", 1)[-1]
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def clean_error(exc: BaseException | str, url: str, limit: int = 500) -> str:
    """An error message fit for logs and status: the URL replaced by its safe name, secrets redacted."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    if url:
        text = text.replace(url, describe_source(url))
    return redact_text(text)[:limit]

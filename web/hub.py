"""Live updates for the pages: one thread per process reads Redis and fans out to every browser.

It follows the alerts stream (every AlertEvent: start, update, end, ack, resolve; read with
XREAD, so nothing published while it reconnects is missed) and the camera-status stream (a camera going offline or online), and re-checks the camera tiles every
``web.camera_refresh_s`` so a camera whose frames stop is shown stale without any status message.
Each browser's server-sent-event stream reads its own asyncio queue; the page never polls.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog

from fallwatch.keys import Keys
from fallwatch.schemas import AlertEvent, SchemaError, decode

log = structlog.get_logger(__name__)

QUEUE_MAX = 256
BLOCK_MS = 200


def _tile_state(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a change of the tiles means (frame ages tick on the page, not here)."""
    return [(r["id"], r["state"], r["online"], r["stale"], r["reason"], json.dumps(r["open_event"])) for r in rows]


class Hub:
    def __init__(self, client: redis.Redis, keys: Keys, cameras: Callable[[], list[dict[str, Any]]],
                 refresh_s: float):
        self.client, self.keys, self.cameras, self.refresh_s = client, keys, cameras, refresh_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queues: set[asyncio.Queue[tuple[str, Any]]] = set()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread = threading.Thread(target=self._run, name="web-hub", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """End every browser's stream now (the server is stopping); they reconnect to the next one."""
        self.stop.set()
        self._broadcast("bye", {})

    def close(self) -> None:
        self.release()
        if self._thread is not None:
            self._thread.join(5)

    def subscribe(self) -> asyncio.Queue[tuple[str, Any]]:
        q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(QUEUE_MAX)
        with self._lock:
            self.queues.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[tuple[str, Any]]) -> None:
        with self._lock:
            self.queues.discard(q)

    def _broadcast(self, kind: str, data: Any) -> None:
        if self.loop is None:
            return
        with self._lock:
            queues = list(self.queues)
        for q in queues:
            self.loop.call_soon_threadsafe(_offer, q, (kind, data))

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self._serve()
            except redis.RedisError as exc:
                log.warning("web_live_updates_interrupted", error=str(exc))
                self.stop.wait(1.0)
            except Exception:  # never let the pages go silently stale
                log.exception("web_live_updates_failed")
                self.stop.wait(1.0)

    def _serve(self) -> None:
        alerts, status = self.keys.alerts_stream(), self.keys.camera_status_stream()
        last = {alerts: self._last_id(alerts), status: self._last_id(status)}
        tiles: list[tuple[Any, ...]] | None = None
        next_check = 0.0
        while not self.stop.is_set():
            reply = self.client.xread(last, count=100, block=BLOCK_MS) or []
            moved = False
            for stream, entries in reply:
                name = stream.decode()
                last[name] = entries[-1][0].decode()
                moved = True
                if name == alerts:
                    self._relay(entries)
            now = time.monotonic()
            if moved or now >= next_check:
                tiles = self._push_tiles(tiles)
                next_check = now + self.refresh_s

    def _relay(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for _, fields in entries:
            try:
                ev, _ = decode(fields, expect=AlertEvent)
            except SchemaError:
                continue
            self._broadcast("event", ev.model_dump(mode="json"))

    def _last_id(self, stream: str) -> str:
        last = self.client.xrevrange(stream, count=1)
        return last[0][0].decode() if last else "0-0"

    def _push_tiles(self, before: list[tuple[Any, ...]] | None) -> list[tuple[Any, ...]]:
        rows = self.cameras()
        state = _tile_state(rows)
        if state != before:
            self._broadcast("cameras", rows)
        return state


def _offer(q: asyncio.Queue[tuple[str, Any]], item: tuple[str, Any]) -> None:
    try:
        q.put_nowait(item)
    except asyncio.QueueFull:  # a stuck browser: it reloads state when it reconnects
        pass


"""Decoder thread → FrameBuffer → publisher loop, shared by cameras and replays.

The loop tells the publisher whether more frames are already waiting: if so it queues the frame and
writes the queue with the last of them (up to ``ingest.write_batch`` per round trip).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from ingest.publisher import Publisher
from ingest.records import FrameBuffer

log = structlog.get_logger(__name__)

Producer = Callable[[FrameBuffer, threading.Event], None]


def run_pipeline(name: str, producer: Producer, buffer: FrameBuffer, publisher: Publisher,
                 stop: threading.Event, limit: int | None = None, poll_s: float = 0.5) -> None:
    """Run ``producer(buffer, halt)`` in its own thread and publish what it buffers, in this thread.

    Returns when ``stop`` is set, ``limit`` items were published, or the producer finished and
    the buffer is drained. The producer must close the buffer when it ends; ``halt`` tells it to.
    """
    halt = threading.Event()
    thread = threading.Thread(target=_guarded, args=(name, producer, buffer, halt), name=name, daemon=True)
    thread.start()
    try:
        while not stop.is_set() and (limit is None or publisher.accepted < limit):
            rec = buffer.get(timeout=poll_s)
            if rec is not None:
                more = len(buffer) > 0 and (limit is None or publisher.accepted + 1 < limit)
                publisher.handle(rec, dropped=buffer.take_dropped(), flush=not more)
            elif buffer.finished:
                break
    finally:
        publisher.flush()  # what a stop left queued: one more try
        halt.set()
        buffer.close()
        thread.join()


def _guarded(name: str, producer: Producer, buffer: FrameBuffer, halt: threading.Event) -> None:
    try:
        producer(buffer, halt)
    except Exception:
        log.exception("ingest_producer_crashed", producer=name)
    finally:
        buffer.close()

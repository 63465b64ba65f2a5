"""Ingest against a Redis out of memory: frames are dropped and counted, not waited for."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import redis

from fallwatch.keys import Keys
from fallwatch.settings import IngestSettings
from ingest.publisher import Publisher
from ingest.records import FrameRecord
from tests.sentinel import fill, small_redis

KEYS = Keys()


@pytest.fixture
def full_redis():
    server = small_redis(maxmemory_mb=4)
    client = redis.Redis.from_url(server.url, socket_timeout=10)
    yield client
    client.close()
    server.stop()
    shutil.rmtree(server.data_dir, ignore_errors=True)


def frame(i: int) -> FrameRecord:
    return FrameRecord("hall", i, 1000.0 + i, np.full((48, 64, 3), i % 255, np.uint8), None, i / 2, 0)


def test_frames_refused_for_memory_are_dropped_counted_and_the_count_is_written_later(full_redis) -> None:
    pub = Publisher(full_redis, KEYS, "hall", IngestSettings(), threading.Event())
    assert pub.handle(frame(0))                      # reserves a block of frame numbers, then fills up
    fill(full_redis, "test:filler")
    assert [pub.handle(frame(i)) for i in range(1, 4)] == [False, False, False]   # no waiting: dropped
    assert pub.stats.oom == 3 and full_redis.xlen(KEYS.frames_stream()) == 1
    assert full_redis.get(KEYS.camera_counter("hall", "oom")) is None           # Redis refuses that too
    full_redis.delete("test:filler")
    assert pub.handle(frame(4))
    assert int(full_redis.get(KEYS.camera_counter("hall", "oom"))) == 3
    assert full_redis.xlen(KEYS.frames_stream()) == 2 and pub.stats.items == 2

"""Shared fixtures: a real redis-server per test session (never a mock), flushed per test."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fallwatch.keys import Keys
from fallwatch.redis import EmbeddedRedis
from fallwatch.settings import Settings


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A private redis-server on a unix socket (short /tmp path: sockets have a length limit)."""
    data_dir = Path(tempfile.mkdtemp(prefix="fw-redis-"))
    server = EmbeddedRedis(data_dir, appendonly=False).start()
    yield server
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def r(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A client on a flushed database."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(redis_url: str, r: redis.Redis, tmp_path: Path) -> Settings:
    """Default settings pointed at the test Redis (database flushed)."""
    return Settings(redis={"url": redis_url, "data_dir": str(tmp_path / "redis")})


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.redis.key_prefix)


@pytest.fixture(scope="module")
def tiny_edge():
    """The offline tiny ViLT, loaded once per module through the real from_pretrained path."""
    from edge_worker.model import EdgeModel
    from fallwatch.settings import EdgeSettings

    return EdgeModel.load(EdgeSettings(model="tiny"))


@pytest.fixture(scope="module")
def tiny_cloud():
    """The offline tiny LLaVA-NeXT-Video on the CPU, loaded once per module."""
    from cloud_worker.model import CloudModel
    from fallwatch.settings import CloudSettings

    return CloudModel.load(CloudSettings(model="tiny", device="cpu", dtype="fp32"))

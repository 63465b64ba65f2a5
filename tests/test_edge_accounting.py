"""A frame the edge group dropped is never also delivered: outputs and acknowledgement are one write."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from edge_worker.model import EdgeModel
from edge_worker.worker import EdgeWorker
from fallwatch.keys import Keys
from fallwatch.redis import EmbeddedRedis
from fallwatch.schemas import decode
from fallwatch.settings import EdgeSettings, Settings
from tests.frames import push_frames
from tests.helpers import wait_for


@pytest.fixture(scope="module")
def tiny_edge() -> EdgeModel:
    return EdgeModel.load(EdgeSettings(model="tiny"))


def offload_all(settings: Settings) -> Settings:
    return settings.model_copy(update={
        "switcher": settings.switcher.model_copy(update={"offload_all": True}),
        "edge": settings.edge.model_copy(update={"claim_idle_ms": 100})})


def test_a_worker_dying_mid_write_leaves_no_output_for_a_held_entry(settings, r: redis.Redis, keys: Keys,
                                                                    tiny_edge, monkeypatch) -> None:
    settings = offload_all(settings)
    push_frames(r, keys, 5)
    dying = EdgeWorker(settings, r, keys, tiny_edge, name="dying")
    dying.ensure_group()

    def killed(*_a, **_k):
        raise SystemExit("killed after scoring, before the offload job was queued")
    monkeypatch.setattr(dying, "enqueue", killed)
    with pytest.raises(SystemExit):
        dying.step(block_ms=0)
    r.xtrim(keys.frames_stream(), maxlen=0)                 # overload trims what it held
    alive = EdgeWorker(settings, r, keys, tiny_edge, name="alive")
    trimmed = lambda: int(r.get(keys.counter("frames_trimmed_pending")) or 0)  # noqa: E731
    assert wait_for(lambda: alive.claim() == [] and trimmed() > 0, 10)
    delivered = {decode(f)[0].frame_id for _, f in r.xrange(keys.verdicts_stream())}
    assert len(delivered) + trimmed() == 5
    assert delivered == set() and trimmed() == 5
    assert r.xpending(keys.frames_stream(), keys.edge_group())["pending"] == 0


def test_a_step_writes_outputs_and_acknowledges_together(settings, r: redis.Redis, keys: Keys, tiny_edge) -> None:
    settings = offload_all(settings)
    ids = push_frames(r, keys, 6)
    worker = EdgeWorker(settings, r, keys, tiny_edge, name="w1")
    worker.ensure_group()
    res = worker.step(block_ms=0)
    assert (res.scored, res.offloaded) == (6, 6)
    assert [decode(f)[0].frame_id for _, f in r.xrange(keys.verdicts_stream())] == ids
    assert worker.queue.count == 1 and all(r.exists(keys.pixels(i)) for i in ids)
    assert r.xpending(keys.frames_stream(), keys.edge_group())["pending"] == 0


def test_entries_claimed_with_their_data_are_scored_not_counted_as_trimmed(settings, r: redis.Redis, keys: Keys,
                                                                           tiny_edge, monkeypatch) -> None:
    """Redis 6.2 claims trimmed entries as nil; the worker then looks for its own pending entries that
    are gone. One it has just claimed with its data may be trimmed in between: it is scored (delivered),
    so it must not also be counted as trimmed while pending."""
    settings = offload_all(settings)
    ids = push_frames(r, keys, 6)
    dead = EdgeWorker(settings, r, keys, tiny_edge, name="dead")
    dead.ensure_group()
    entries = dead.read(block_ms=0)
    assert len(entries) == 6
    r.xtrim(keys.frames_stream(), minid=entries[2][0])     # the two oldest are trimmed while pending
    alive = EdgeWorker(settings, r, keys, tiny_edge, name="alive")
    claim = r.xautoclaim

    def claim_then_trim(*args, **kwargs):                     # ingest trims the rest right after the claim
        resp = claim(*args, **kwargs)
        if resp[1]:
            r.xtrim(keys.frames_stream(), maxlen=0)
        return resp
    monkeypatch.setattr(r, "xautoclaim", claim_then_trim)
    got: list = []
    assert wait_for(lambda: got.extend(alive.claim()) or got, 10)
    res = alive.process(got)
    delivered = {decode(f)[0].frame_id for _, f in r.xrange(keys.verdicts_stream())}
    trimmed = int(r.get(keys.counter("frames_trimmed_pending")) or 0)
    if r.info("server")["redis_version"] >= "7":
        pytest.skip("Redis 7 reports deleted ids atomically")
    assert res.scored == len(delivered) > 0 and len(delivered) + trimmed == len(ids)
    assert r.xpending(keys.frames_stream(), keys.edge_group())["pending"] == 0


REDIS7 = Path("/usr/bin/redis-server")


@pytest.fixture(params=["embedded", "redis 7"])
def any_redis(request, settings: Settings, r: redis.Redis, tmp_path: Path) -> Iterator[tuple[Settings, redis.Redis]]:
    """The embedded server (6.2: trimmed entries are claimed as nil), and Debian's 7 (reported deleted)."""
    if request.param == "embedded":
        yield settings, r
        return
    if not REDIS7.exists():
        pytest.skip("needs Debian's redis-server 7 (scripts/install-test-deps.sh)")
    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="fw-r7-")), appendonly=False, executable=str(REDIS7)).start()
    client = redis.Redis.from_url(server.url)
    try:
        yield Settings(redis={"url": server.url, "data_dir": str(tmp_path / "r7")}), client
    finally:
        client.close()
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.mark.parametrize("holder_first", [False, True])
def test_a_slow_holder_delivers_what_another_counted_as_trimmed_and_it_is_counted_once(
        any_redis, keys: Keys, tiny_edge, holder_first: bool) -> None:
    """A worker slower than claim_idle_ms still holds its frames in memory when overload trims them
    and another worker's claim finds them gone: whichever writes first, each frame ends delivered or
    dropped, never both."""
    settings, r = any_redis
    settings = offload_all(settings)
    ids = push_frames(r, keys, 4)
    slow = EdgeWorker(settings, r, keys, tiny_edge, name="slow")
    slow.ensure_group()
    held = slow.read(block_ms=0)
    r.xtrim(keys.frames_stream(), maxlen=0)                  # overload trims what it holds
    other = EdgeWorker(settings, r, keys, tiny_edge, name="other")
    trimmed = lambda: int(r.get(keys.frames_trimmed_pending()) or 0)  # noqa: E731
    if holder_first:
        slow.process(held)
    assert wait_for(lambda: other.claim() == [] and r.xpending(keys.frames_stream(), keys.edge_group())["pending"] == 0,
                    10)
    if not holder_first:
        assert trimmed() == 4
        slow.process(held)                                    # ... and delivers them after all
    delivered = {decode(f)[0].frame_id for _, f in r.xrange(keys.verdicts_stream())}
    assert delivered == set(ids) and trimmed() == 0

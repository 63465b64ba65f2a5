"""A frame the edge group dropped is never also delivered: outputs and acknowledgement are one write."""

from __future__ import annotations

import pytest
import redis

from edge_worker.model import EdgeModel
from edge_worker.worker import EdgeWorker
from fallwatch.keys import Keys
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

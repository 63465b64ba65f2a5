from __future__ import annotations

import json
import zlib

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from edge_worker.model import EdgeModel
from edge_worker.worker import EdgeWorker
from fallwatch.offload import OFFLOAD_JOB
from fallwatch.keys import Keys
from fallwatch.schemas import DeadLetter, EdgeVerdict, FrameMessage, decode, encode
from fallwatch.settings import EdgeSettings, Settings
from tests.frames import frame_entry, jpeg, push_frames


@pytest.fixture(scope="module")
def tiny_edge() -> EdgeModel:
    return EdgeModel.load(EdgeSettings(model="tiny"))


def verdicts(r: redis.Redis, keys: Keys) -> list[EdgeVerdict]:
    return [decode(f)[0] for _, f in r.xrange(keys.verdicts_stream())]


def rank_queue(v: EdgeVerdict) -> int:
    return 1 if v.is_fall else 0


def drain(worker: EdgeWorker, max_steps: int = 20) -> int:
    total = 0
    for _ in range(max_steps):
        res = worker.step(block_ms=0)
        total += res.read
        if res.read == 0:
            break
    return total


def test_every_frame_gets_one_verdict_and_is_acked(settings: Settings, r, keys, tiny_edge) -> None:
    ids = push_frames(r, keys, 11, gt_fall=True)
    worker = EdgeWorker(settings, r, keys, tiny_edge, name="w1")
    worker.ensure_group()
    assert drain(worker) == 11
    got = verdicts(r, keys)
    assert [v.frame_id for v in got] == ids
    assert all(v.confident and v.agreement is None and v.gt_fall is True for v in got)
    assert all(0 <= v.p_fall <= 1 and v.is_fall == (v.p_fall >= 0.5) for v in got)
    assert r.xpending(keys.frames_stream(), keys.edge_group())["pending"] == 0
    assert r.exists(keys.heartbeat("edge", "w1"))


def test_batches_respect_batch_size(settings: Settings, r, keys, tiny_edge) -> None:
    settings = settings.model_copy(update={"edge": settings.edge.model_copy(update={"batch_size": 4})})
    push_frames(r, keys, 10)
    worker = EdgeWorker(settings, r, keys, tiny_edge, name="w1")
    worker.ensure_group()
    sizes = [worker.step(block_ms=0).scored for _ in range(4)]
    assert sizes == [4, 4, 2, 0]


def test_offload_keeps_pixels_and_enqueues_a_json_job(settings: Settings, r, keys, tiny_edge) -> None:
    settings = settings.model_copy(update={"switcher": settings.switcher.model_copy(update={"offload_all": True})})
    ids = push_frames(r, keys, 3, n_images=1)
    clip_ids = push_frames(r, keys, 1, camera="cam2", n_images=4)
    worker = EdgeWorker(settings, r, keys, tiny_edge, name="w1")
    worker.ensure_group()
    res = worker.step(block_ms=0)
    assert (res.scored, res.offloaded, res.confident) == (4, 4, 0)
    assert all(not v.confident for v in verdicts(r, keys))
    for fid in ids + clip_ids:
        key = keys.pixels(fid)
        assert 0 < r.ttl(key) <= settings.ingest.pixels_ttl_s
    assert r.hlen(keys.pixels(clip_ids[0])) == 4
    queues = [Queue(q, connection=r, serializer=JSONSerializer) for q in keys.offload_queues(settings.cloud.queue)]
    jobs = [j for q in queues for j in q.jobs]
    assert len(jobs) == len({rank_queue(v) for v in verdicts(r, keys)})  # one micro-batched job per priority queue
    job = jobs[0]
    assert all(j.func_name == OFFLOAD_JOB for j in jobs)
    requests = {q["frame_id"]: q for j in jobs for q in j.args[0]}
    assert sorted(requests) == sorted(ids + clip_ids)
    assert requests[clip_ids[0]]["kind"] == "clip" and requests[clip_ids[0]]["n_images"] == 4
    by_id = {v.frame_id: v for v in verdicts(r, keys)}
    assert all(q["rank"] == rank_queue(by_id[f]) for f, q in requests.items())  # edge says fall: rank 1
    raw = zlib.decompress(r.hget(job.key, "data"))
    assert json.loads(raw)[0] == OFFLOAD_JOB  # stored as (compressed) JSON, never pickle


def test_micro_batches_are_split_by_cloud_batch_size(settings: Settings, r, keys, tiny_edge) -> None:
    settings = settings.model_copy(update={
        "switcher": settings.switcher.model_copy(update={"offload_all": True}),
        "cloud": settings.cloud.model_copy(update={"batch_size": 3}),
    })
    push_frames(r, keys, 8)
    worker = EdgeWorker(settings, r, keys, tiny_edge, name="w1")
    worker.ensure_group()
    worker.step(block_ms=0)
    sizes = [len(j.args[0]) for q in keys.offload_queues(settings.cloud.queue)
             for j in Queue(q, connection=r, serializer=JSONSerializer).jobs]
    assert sum(sizes) == 8 and max(sizes) == 3 and len(sizes) <= 4  # split by batch size within each rank


def test_poison_entries_are_dead_lettered_and_the_worker_carries_on(settings: Settings, r, keys, tiny_edge) -> None:
    stream = keys.frames_stream()
    push_frames(r, keys, 1, start=0)
    good = frame_entry("cam1", 1)
    r.xadd(stream, {**good, b"p0": b"\xff\xd8\xff\xe0 this is not a jpeg"})                 # corrupt JPEG
    r.xadd(stream, {b"junk": b"\x00\x01"})                                                  # garbage entry
    r.xadd(stream, {**good, b"v": b"9"})                                                    # wrong version
    small = settings.edge.model_copy(update={"max_image_bytes": 100_000, "max_image_pixels": 1_000_000})
    big = FrameMessage.make("cam1", 5, captured_at=1e9, width=600, height=600)
    r.xadd(stream, encode(big, [jpeg(600, 600, seed=5, quality=95)]))                       # oversized bytes
    bomb = FrameMessage.make("cam1", 6, captured_at=1e9, width=96, height=80)
    r.xadd(stream, encode(bomb, [_bomb()]))                                                  # pixel bomb
    push_frames(r, keys, 1, start=7)
    settings = settings.model_copy(update={"edge": small})
    worker = EdgeWorker(settings, r, keys, tiny_edge, name="w1")
    worker.ensure_group()
    res = worker.step(block_ms=0)
    assert res.read == 7 and res.scored == 2 and res.dead_lettered == 5
    letters = [decode(f, expect=DeadLetter)[0] for _, f in r.xrange(keys.dead_letter_stream())]
    assert [d.reason for d in letters] == ["bad_image", "bad_message", "bad_message", "oversized", "oversized"]
    assert "version 9" in letters[2].error
    assert "pixels" in letters[4].error
    assert [v.frame_id for v in verdicts(r, keys)] == ["cam1:0", "cam1:7"]
    assert r.xpending(stream, keys.edge_group())["pending"] == 0


def _bomb() -> bytes:
    """A small file whose header claims a 20000x20000 image: refused before decoding."""
    data = bytearray(jpeg(96, 80))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (20000).to_bytes(2, "big") * 2  # height, width
    assert len(data) < 100_000
    return bytes(data)


def test_pending_entries_of_a_dead_consumer_are_claimed(settings: Settings, r, keys, tiny_edge) -> None:
    settings = settings.model_copy(update={"edge": settings.edge.model_copy(update={"claim_idle_ms": 100})})
    ids = push_frames(r, keys, 5)
    dead = EdgeWorker(settings, r, keys, tiny_edge, name="dead")
    dead.ensure_group()
    assert len(dead.read(block_ms=0)) == 5  # read, then "crash" before scoring or acking
    import time

    time.sleep(0.15)
    alive = EdgeWorker(settings, r, keys, tiny_edge, name="alive")
    res = alive.step(block_ms=0)
    assert res.claimed == 5
    assert sorted(v.frame_id for v in verdicts(r, keys)) == sorted(ids)
    assert r.xpending(keys.frames_stream(), keys.edge_group())["pending"] == 0


def test_after_an_outage_the_worker_scores_what_it_had_read_first(settings: Settings, r, keys, tiny_edge) -> None:
    ids = push_frames(r, keys, 3)                    # claim_idle_ms stays at its default (30 s)
    worker = EdgeWorker(settings, r, keys, tiny_edge, name="w1")
    worker.ensure_group()
    assert len(worker.read(block_ms=0)) == 3        # read; then writing the outputs failed
    worker.on_outage(redis.ConnectionError("failover"))
    push_frames(r, keys, 2, camera="cam2")
    res = worker.step(block_ms=0)
    assert res.claimed == 3
    assert sorted(v.frame_id for v in verdicts(r, keys)) == sorted(ids)
    drain(worker)
    assert r.xpending(keys.frames_stream(), keys.edge_group())["pending"] == 0 and len(verdicts(r, keys)) == 5

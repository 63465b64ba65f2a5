"""Fast, in-process checks behind the fault tests: poison RQ jobs are refused without being run
or unpickled, a cloud worker stops while Redis is down, trimmed pending frames are claimed on
Redis 6.2, and frames trimmed unread by MAXLEN are counted."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time

import numpy as np
import pytest
import redis
from rq import Queue
from rq.callbacks import Callback
from rq.serializers import JSONSerializer

from cloud_worker.model import CloudModel
from cloud_worker.worker import build_worker, job_problem, run
from edge_worker.model import EdgeModel
from edge_worker.worker import EdgeWorker
from fallwatch.offload import OFFLOAD_FAILED, OFFLOAD_JOB
from fallwatch.keys import Keys
from fallwatch.redis import EmbeddedRedis
from fallwatch.schemas import CloudVerdict, DeadLetter, OffloadRequest, decode, to_dict
from fallwatch.settings import CloudSettings, EdgeSettings, Settings
from ingest.publisher import Publisher
from ingest.records import FrameRecord
from tests.faults import Tripwire
from tests.frames import jpeg, push_frames


@pytest.fixture(scope="module")
def tiny_cloud() -> CloudModel:
    return CloudModel.load(CloudSettings(model="tiny", device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def tiny_edge() -> EdgeModel:
    return EdgeModel.load(EdgeSettings(model="tiny"))


def offload_request(r: redis.Redis, keys: Keys, frame_id: str) -> dict:
    r.hset(keys.pixels(frame_id), "p0", jpeg(64, 48))
    r.expire(keys.pixels(frame_id), 60)
    return to_dict(OffloadRequest(frame_id=frame_id, camera_id="cam1", captured_at=time.time(), kind="image",
                                  n_images=1, pixels_key=keys.pixels(frame_id), edge_p_fall=0.5, agreement=0.1,
                                  deadline=time.time() + 30))


def letters(r: redis.Redis, keys: Keys) -> list[DeadLetter]:
    return [decode(f, expect=DeadLetter)[0] for _, f in r.xrange(keys.dead_letter_stream())]


def test_poison_jobs_are_refused_without_running_or_unpickling(settings, r, keys, tiny_cloud, tmp_path) -> None:
    name = keys.cloud_queue(settings.cloud.queue)
    tripwire = tmp_path / "unpickled"
    queue = Queue(name, connection=r, serializer=JSONSerializer)
    pickled = Queue(name, connection=r).enqueue(OFFLOAD_JOB, [Tripwire(tripwire)])      # RQ's pickle serializer
    garbage = queue.enqueue(OFFLOAD_JOB, [{}])
    r.hset(garbage.key, "data", b"\x00\xffnot json at all")
    foreign = queue.enqueue("os.getcwd")                                                   # JSON, another function
    callback = queue.enqueue(OFFLOAD_JOB, [{}], on_failure=Callback("os.abort"))           # foreign callback
    broken = queue.enqueue(OFFLOAD_JOB, [{}])
    r.hset(broken.key, "created_at", "not a date")                                         # RQ cannot load it
    good = queue.enqueue(OFFLOAD_JOB, [offload_request(r, keys, "cam1:1")], on_failure=Callback(OFFLOAD_FAILED))
    worker = build_worker(settings, r, keys, tiny_cloud, name="cloud-p")
    assert run(worker, threading.Event(), burst=True) == 1
    assert not tripwire.exists()
    got = {d.entry_id: d for d in letters(r, keys)}
    assert set(got) == {pickled.id, garbage.id, foreign.id, callback.id, broken.id}
    assert all(d.reason == "bad_job" and d.source == name for d in got.values())
    assert "not JSON" in got[pickled.id].error and "not JSON" in got[garbage.id].error
    assert "'os.getcwd' is not a fallwatch cloud job" in got[foreign.id].error
    assert "os.abort" in got[callback.id].error and "cannot be loaded" in got[broken.id].error
    failed = set(queue.failed_job_registry.get_job_ids())
    assert {pickled.id, garbage.id, foreign.id, callback.id} <= failed
    assert r.llen(queue.intermediate_queue_key) == 0 and queue.count == 0
    assert [decode(f, expect=CloudVerdict)[0].frame_id for _, f in r.xrange(keys.verdicts_stream())] == ["cam1:1"]
    assert good.get_status(refresh=True) == "finished"


def test_requests_past_their_deadline_are_not_scored(settings, r, keys, tiny_cloud) -> None:
    fresh, stale = offload_request(r, keys, "cam1:1"), offload_request(r, keys, "cam1:2")
    stale["deadline"] = time.time() - 1
    Queue(keys.cloud_queue(), connection=r, serializer=JSONSerializer).enqueue(OFFLOAD_JOB, [stale, fresh])
    worker = build_worker(settings, r, keys, tiny_cloud, name="cloud-d")
    assert run(worker, threading.Event(), burst=True) == 1
    got = [decode(f, expect=CloudVerdict)[0] for _, f in r.xrange(keys.verdicts_stream())]
    assert [(v.frame_id, v.ok) for v in got] == [("cam1:1", True)]
    assert not r.exists(keys.pixels("cam1:1")) and not r.exists(keys.pixels("cam1:2"))


def test_job_problem_accepts_only_fallwatch_jobs(settings, r, keys) -> None:
    queue = Queue(keys.cloud_queue(), connection=r, serializer=JSONSerializer)
    assert job_problem(queue.enqueue(OFFLOAD_JOB, [{}], on_failure=Callback(OFFLOAD_FAILED))) is None
    assert "not a fallwatch cloud job" in job_problem(queue.enqueue("cloud_worker.jobs.install", None))


def test_cloud_worker_stops_while_redis_is_down() -> None:
    server = EmbeddedRedis(tempfile.mkdtemp(prefix="fw-u-"), appendonly=False).start()
    settings = Settings(redis={"url": server.url, "retry_attempts": 1, "retry_base_s": 0.01, "retry_cap_s": 0.2,
                               "socket_timeout_s": 1})
    client, stop = redis.Redis.from_url(server.url, socket_timeout=1), threading.Event()
    worker = build_worker(settings, client, Keys(), model=None, name="cloud-down")
    thread = threading.Thread(target=run, args=(worker, stop), daemon=True)
    try:
        thread.start()
        deadline = time.time() + 10
        while not client.exists(Keys().heartbeat("cloud", "cloud-down")) and time.time() < deadline:
            time.sleep(0.05)
        listener = worker.pubsub_thread  # RQ's command listener of this worker (other tests' may linger)
        assert listener is not None and listener.is_alive()
        server.stop()
        time.sleep(1.5)  # RQ's own dequeue loop is now retrying the connection
        stop.set()
        thread.join(10)
        assert not thread.is_alive(), "the cloud worker kept retrying Redis after it was told to stop"
        assert wait(lambda: not listener.is_alive()), "RQ's command listener kept retrying the lost server"
    finally:
        stop.set()
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)


def test_edge_worker_stops_cleanly_while_redis_is_down(tiny_edge) -> None:
    server = EmbeddedRedis(tempfile.mkdtemp(prefix="fw-u-"), appendonly=False).start()
    settings = Settings(redis={"url": server.url, "retry_attempts": 1, "retry_base_s": 0.01, "retry_cap_s": 0.2,
                               "socket_timeout_s": 1}, edge={"block_ms": 50})
    client, stop, errors = redis.Redis.from_url(server.url, socket_timeout=1), threading.Event(), []
    worker = EdgeWorker(settings, client, Keys(), tiny_edge, name="edge-down")

    def body() -> None:
        try:
            worker.run(stop)
        except Exception as exc:  # noqa: BLE001 - what the test looks for
            errors.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    try:
        thread.start()
        assert wait(lambda: client.exists(Keys().heartbeat("edge", "edge-down")))
        server.stop()
        time.sleep(0.5)
        stop.set()
        thread.join(10)
        assert not thread.is_alive() and errors == []
    finally:
        stop.set()
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)


def wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.05)
    return bool(cond())


def test_trimmed_pending_frames_are_counted_and_do_not_hide_live_ones(settings, r, keys, tiny_edge) -> None:
    cfg = settings.model_copy(update={"edge": settings.edge.model_copy(update={"claim_idle_ms": 100,
                                                                               "batch_size": 4})})
    push_frames(r, keys, 12)
    dead = EdgeWorker(cfg, r, keys, tiny_edge, name="dead")
    dead.ensure_group()
    held = [eid for eid, _ in dead.read(block_ms=0)] + [eid for eid, _ in dead.read(block_ms=0)]
    assert len(held) == 8
    r.xdel(keys.frames_stream(), *held[:6])  # as MAXLEN would: gone while pending (more than one claim batch)
    time.sleep(0.15)
    alive = EdgeWorker(cfg, r, keys, tiny_edge, name="alive")
    claimed = []
    for _ in range(4):
        alive._last_claim = 0.0
        claimed += [eid for eid, _ in alive.claim()]
    assert claimed == held[6:]  # the live ones behind the trimmed ones are reached
    assert int(r.get(keys.counter("frames_trimmed_pending"))) == 6
    assert r.xpending(keys.frames_stream(), keys.edge_group())["pending"] == 2


def test_frames_trimmed_before_the_edge_read_them_are_counted_per_camera(settings, r, keys) -> None:
    ing = settings.ingest.model_copy(update={"stream_maxlen": 40})
    r.xgroup_create(keys.frames_stream(), keys.edge_group(), id="0", mkstream=True)
    pubs = {cam: Publisher(r, keys, cam, ing, threading.Event()) for cam in ("cam1", "cam2")}
    small = np.zeros((8, 8, 3), np.uint8)
    for i in range(10):
        pubs["cam1"].handle(FrameRecord("cam1", i, 1000.0 + i, small))
    read = r.xreadgroup(keys.edge_group(), "e1", {keys.frames_stream(): ">"}, count=6)[0][1]
    for i in range(10, 200):  # cam2's frames push cam1's unread ones out
        pubs["cam2"].handle(FrameRecord("cam2", i, 1000.0 + i, small))
    left = [json.loads(f[b"m"])["camera_id"] for _, f in r.xrange(keys.frames_stream())]
    assert 40 <= len(left) < 42 and set(left) == {"cam2"}  # exact trimming, a chunk (maxlen / 20) at a time
    trimmed = {cam: int(r.get(keys.counter(f"ingest:{cam}:trimmed")) or 0) for cam in pubs}
    assert trimmed == {"cam1": 10 - len(read), "cam2": 190 - len(left)}  # the 6 read ones are not counted
    assert int(r.get(keys.counter("frames_trimmed_unread"))) == sum(trimmed.values())
    assert pubs["cam2"].stats.trimmed == trimmed["cam2"] and pubs["cam2"].stats.items == 190


def _commands(r, name: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))


def test_a_backlog_is_written_in_batches_and_a_lone_frame_at_once(settings, r, keys) -> None:
    from ingest.pipeline import run_pipeline
    from ingest.records import BufferPolicy, FrameBuffer

    ing = settings.ingest.model_copy(update={"write_batch": 8})
    pub = Publisher(r, keys, "cam1", ing, threading.Event())
    small = np.zeros((8, 8, 3), np.uint8)
    assert pub.handle(FrameRecord("cam1", 0, 1000.0, small)) and r.xlen(keys.frames_stream()) == 1  # at once
    buffer = FrameBuffer(20, BufferPolicy.WAIT)
    for i in range(20):
        buffer.put(FrameRecord("cam1", i + 1, 1001.0 + i, small))
    buffer.close()
    execs = _commands(r, "exec")
    run_pipeline("cam1", lambda buf, halt: None, buffer, pub, threading.Event())
    assert r.xlen(keys.frames_stream()) == 21 and pub.stats.items == 21
    assert _commands(r, "exec") - execs == 3  # 8 + 8 + 4, each one transaction
    assert int(r.get(keys.camera_counter("cam1", "items"))) == 21
    newest, _ = decode(r.xrevrange(keys.frames_stream(), count=1)[0][1])
    assert r.hget(keys.camera_info("cam1"), "last_frame_id").decode() == newest.frame_id


def test_a_gated_frame_still_writes_what_was_queued_before_it(settings, r, keys) -> None:
    ing = settings.ingest.model_copy(update={"motion_gating": True, "keepalive_s": 3600})
    pub = Publisher(r, keys, "cam1", ing, threading.Event())
    still = np.zeros((32, 32, 3), np.uint8)
    assert pub.handle(FrameRecord("cam1", 0, 1000.0, still), flush=False)  # queued: more were waiting
    assert r.xlen(keys.frames_stream()) == 0 and pub.accepted == 1
    assert not pub.handle(FrameRecord("cam1", 1, 1001.0, still))  # gated, and the last one waiting
    assert r.xlen(keys.frames_stream()) == 1 and pub.stats.gated == 1


def test_a_refused_batch_is_dropped_whole_and_counted(settings, r, keys) -> None:
    pub = Publisher(r, keys, "cam1", settings.ingest, threading.Event())
    small = np.zeros((8, 8, 3), np.uint8)
    pub.handle(FrameRecord("cam1", 0, 1000.0, small))  # the stream exists, and the seq block is taken
    r.config_set("maxmemory", 1)
    try:
        for i in range(3):
            pub.handle(FrameRecord("cam1", i + 1, 1001.0 + i, small), flush=i == 2)
    finally:
        r.config_set("maxmemory", 0)
    assert r.xlen(keys.frames_stream()) == 1 and pub.stats.oom == 3 and pub.accepted == 1

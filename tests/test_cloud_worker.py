from __future__ import annotations

import threading
import time

import pytest
import redis
from rq import Queue, Retry
from rq.callbacks import Callback
from rq.serializers import JSONSerializer

from cloud_worker.model import CloudModel
from cloud_worker.worker import build_worker, run
from fallwatch.offload import OFFLOAD_FAILED, OFFLOAD_JOB
from fallwatch.keys import Keys
from fallwatch.schemas import CloudVerdict, DeadLetter, OffloadRequest, decode, to_dict
from fallwatch.settings import CloudSettings, Settings
from tests.frames import jpeg


@pytest.fixture(scope="module")
def tiny_cloud() -> CloudModel:
    return CloudModel.load(CloudSettings(model="tiny", device="cpu", dtype="fp32"))


def offload(r: redis.Redis, keys: Keys, frame_id: str, n_images: int = 1, store: bool = True) -> dict:
    key = keys.pixels(frame_id)
    if store:
        r.hset(key, mapping={f"p{i}": jpeg(64, 48, seed=i) for i in range(n_images)})
        r.expire(key, 60)
    req = OffloadRequest(frame_id=frame_id, camera_id=frame_id.split(":")[0], captured_at=time.time(),
                         kind="clip" if n_images > 1 else "image", n_images=n_images, pixels_key=key,
                         edge_p_fall=0.5, agreement=0.1, deadline=time.time() + 30)
    return to_dict(req)


def cloud_verdicts(r: redis.Redis, keys: Keys) -> list[CloudVerdict]:
    return [decode(f, expect=CloudVerdict)[0] for _, f in r.xrange(keys.verdicts_stream())]


def queue_for(settings: Settings, r: redis.Redis, keys: Keys) -> Queue:
    return Queue(keys.cloud_queue(settings.cloud.queue), connection=r, serializer=JSONSerializer)


def burst(settings: Settings, r: redis.Redis, keys: Keys, model) -> int:
    worker = build_worker(settings, r, keys, model, name="cloud-test")
    return run(worker, threading.Event(), burst=True)


def test_micro_batch_of_images_and_clips_gets_cloud_verdicts(settings, r, keys, tiny_cloud) -> None:
    reqs = [offload(r, keys, "cam1:1"), offload(r, keys, "cam1:2"), offload(r, keys, "cam2:1", n_images=4)]
    queue_for(settings, r, keys).enqueue(OFFLOAD_JOB, reqs)
    assert burst(settings, r, keys, tiny_cloud) == 1
    got = cloud_verdicts(r, keys)
    assert [v.frame_id for v in got] == ["cam1:1", "cam1:2", "cam2:1"]
    assert all(v.ok and 0 <= v.p_fall <= 1 and v.is_fall == (v.p_fall >= 0.5) for v in got)
    assert all(v.energy_j is None for v in got)  # no GPU counter here: never a made-up number
    assert not any(r.exists(keys.pixels(v.frame_id)) for v in got)  # pixels dropped once judged


def test_expired_pixels_give_a_failure_verdict(settings, r, keys, tiny_cloud) -> None:
    queue_for(settings, r, keys).enqueue(OFFLOAD_JOB, [offload(r, keys, "cam1:9", store=False),
                                                       offload(r, keys, "cam1:10")])
    burst(settings, r, keys, tiny_cloud)
    got = {v.frame_id: v for v in cloud_verdicts(r, keys)}
    assert not got["cam1:9"].ok and "pixels" in got["cam1:9"].error
    assert got["cam1:10"].ok


def test_a_job_that_keeps_failing_is_retried_then_publishes_failure(settings, r, keys) -> None:
    class Broken:
        model_id = "broken"
        calls = 0

        def score(self, items):
            Broken.calls += 1
            raise RuntimeError("CUDA out of memory")

    queue_for(settings, r, keys).enqueue(OFFLOAD_JOB, [offload(r, keys, "cam1:3")], retry=Retry(max=2),
                                         on_failure=Callback(OFFLOAD_FAILED))
    burst(settings, r, keys, Broken())
    assert Broken.calls == 3  # first try + 2 retries
    got = cloud_verdicts(r, keys)
    assert len(got) == 1 and not got[0].ok and "out of memory" in got[0].error


def test_a_payload_that_is_not_a_request_is_dead_lettered(settings, r, keys, tiny_cloud) -> None:
    queue_for(settings, r, keys).enqueue(OFFLOAD_JOB, {"hello": "world"})
    queue_for(settings, r, keys).enqueue(OFFLOAD_JOB, [offload(r, keys, "cam1:4")])
    assert burst(settings, r, keys, tiny_cloud) == 2
    letters = [decode(f, expect=DeadLetter)[0] for _, f in r.xrange(keys.dead_letter_stream())]
    assert [d.reason for d in letters] == ["bad_job"]
    assert [v.frame_id for v in cloud_verdicts(r, keys)] == ["cam1:4"]


def test_worker_stops_on_event_and_keeps_a_heartbeat(settings, r, keys, tiny_cloud) -> None:
    worker = build_worker(settings, r, keys, tiny_cloud, name="cloud-hb")
    stop = threading.Event()
    t = threading.Thread(target=run, args=(worker, stop))
    t.start()
    deadline = time.time() + 10
    while not r.exists(keys.heartbeat("cloud", "cloud-hb")) and time.time() < deadline:
        time.sleep(0.05)
    assert r.exists(keys.heartbeat("cloud", "cloud-hb"))
    queue_for(settings, r, keys).enqueue(OFFLOAD_JOB, [offload(r, keys, "cam1:5")])
    while not cloud_verdicts(r, keys) and time.time() < deadline:
        time.sleep(0.05)
    stop.set()
    t.join(5)
    assert not t.is_alive()
    assert [v.frame_id for v in cloud_verdicts(r, keys)] == ["cam1:5"]

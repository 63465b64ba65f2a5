"""The live pipeline end to end on a real Redis with tiny models: edge, cloud and alerts roles run
as threads of this process, exactly as their commands run them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import redis

from alerts.notify import Notifier
from alerts.service import AlertsService
from alerts.store import resolve
from cloud_worker.model import CloudModel
from cloud_worker.worker import build_worker, run as run_cloud
from edge_worker.model import EdgeModel
from edge_worker.worker import EdgeWorker
from fallwatch.keys import Keys
from fallwatch.schemas import AlertEvent, Decider, EventKind, EventType, FinalVerdict, FrameMessage, decode, encode
from fallwatch.settings import CloudSettings, EdgeSettings, Settings
from fallwatch.webhook import WebhookReceiver
from tests.frames import jpeg
from tests.helpers import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def edge_model() -> EdgeModel:
    return EdgeModel.load(EdgeSettings(model="tiny"))


@pytest.fixture(scope="module")
def cloud_model() -> CloudModel:
    return CloudModel.load(CloudSettings(model="tiny", device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def planted_images(edge_model: EdgeModel) -> dict[bool, bytes]:
    """One JPEG the tiny edge model reads as a fall and one it reads as no fall (seeded search)."""
    found: dict[bool, bytes] = {}
    for seed in range(200):
        data = jpeg(96, 80, seed=seed)
        p = float(edge_model.score([_rgb(data)]).p_fall[0])
        if p > 0.8:
            found.setdefault(True, data)
        elif p < 0.2:
            found.setdefault(False, data)
        if len(found) == 2:
            return found
    pytest.fail("no clear fall / no-fall images for the tiny edge model")


def _rgb(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def configure(settings: Settings, webhook_url: str, **sections) -> Settings:
    """The test settings with these section values (validated, as if from a config file)."""
    values = {
        "edge": {"model": "tiny", "batch_size": 8, "block_ms": 50},
        "cloud": {"model": "tiny", "device": "cpu", "dtype": "fp32", "batch_size": 4},
        "alerts": {"debounce_k": 2, "debounce_n": 3, "quiet_s": 2.0, "cooldown_s": 0.0, "cloud_timeout_s": 30.0},
        "notifications": {"urls": [webhook_url], "retry_base_s": 0.1},
    }
    for name, update in sections.items():
        values.setdefault(name, {}).update(update)
    data = settings.model_dump()
    for name, update in values.items():
        data[name].update(update)
    data["redis"]["url"] = settings.redis.url.get_secret_value()
    return Settings.model_validate(data)


@contextmanager
def roles(settings: Settings, redis_url: str, keys: Keys, edge_model, cloud_model=None) -> Iterator[None]:
    stop = threading.Event()

    def client() -> redis.Redis:
        return redis.Redis.from_url(redis_url)

    edge = EdgeWorker(settings, client(), keys, edge_model, name="edge-t")
    alerts = AlertsService(settings, client(), keys, name="alerts-t", block_ms=50)
    notifier = Notifier(settings, client(), keys, name="notify-t", block_ms=50)
    targets = [edge.run, alerts.run, notifier.run]
    if cloud_model is not None:
        worker = build_worker(settings, client(), keys, cloud_model, name="cloud-t")
        targets.append(lambda s: run_cloud(worker, s))
    threads = [threading.Thread(target=t, args=(stop,), daemon=True) for t in targets]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads)


def push(r: redis.Redis, keys: Keys, camera: str, pattern: list[bool], images: dict[bool, bytes], t0: float,
         gap_s: float = 0.5, first_seq: int = 0) -> list[str]:
    ids = []
    for seq, fall in enumerate(pattern, first_seq):
        msg = FrameMessage.make(camera, seq, captured_at=t0 + (seq - first_seq) * gap_s, width=96, height=80,
                                gt_fall=fall)
        r.xadd(keys.frames_stream(), encode(msg, [images[fall]]))
        ids.append(msg.frame_id)
    return ids


def finals(r: redis.Redis, keys: Keys) -> list[FinalVerdict]:
    return [decode(f, expect=FinalVerdict)[0] for _, f in r.xrange(keys.final_stream())]


def events(r: redis.Redis, keys: Keys) -> list[AlertEvent]:
    return [decode(f, expect=AlertEvent)[0] for _, f in r.xrange(keys.alerts_stream())]


def test_frames_in_final_verdicts_out_events_match_planted_falls(settings, r, keys, redis_url, edge_model,
                                                                  planted_images) -> None:
    # two planted falls: the first event latches (no longer seen, still open) until a person resolves
    # it; the second fall, captured after that, starts a new event
    first, second = [False] * 6 + [True] * 4 + [False] * 10, [False] * 3 + [True] * 3 + [False] * 8
    with WebhookReceiver() as hook:
        cfg = configure(settings, hook.url())
        t0 = time.time()
        ids = push(r, keys, "room1", first, planted_images, t0=t0)
        with roles(cfg, redis_url, keys, edge_model):
            assert wait_for(lambda: any(e.still_seen is False for e in events(r, keys)))
            opened = [e for e in events(r, keys) if e.kind == EventKind.FALL]
            assert {e.event_id for e in opened} == {opened[0].event_id} and opened[-1].type == EventType.UPDATE
            resolve(r, keys, opened[0].event_id, "nurse", "confirmed_fall", maxlen=1000)
            t1 = max(time.time(), t0 + len(first) * 0.5) + 1
            ids += push(r, keys, "room1", second, planted_images, t0=t1, first_seq=len(first))
            assert wait_for(lambda: len(finals(r, keys)) >= len(ids))
            assert wait_for(lambda: hook.count() >= 2)
    got = finals(r, keys)
    assert sorted(v.frame_id for v in got) == sorted(ids)  # N in, N out, no duplicates
    assert all(v.decided_by == Decider.EDGE and v.is_fall == v.gt_fall for v in got)
    starts = [e for e in events(r, keys) if e.type == EventType.START and e.kind == EventKind.FALL]
    ends = [e for e in events(r, keys) if e.type == EventType.END and e.kind == EventKind.FALL]
    assert len(starts) == 2 and [e.outcome for e in ends] == ["confirmed_fall"]
    planted_starts = [ids[6], ids[23]]
    assert [e.frame_ids[0] for e in starts] == planted_starts  # each event starts at its planted fall
    assert hook.count() == 2
    assert all("room1" in (m.get("title", "") + m.get("message", "")) for m in hook.received)


def test_offloaded_frames_are_decided_by_the_cloud(settings, r, keys, redis_url, edge_model, cloud_model,
                                                    planted_images) -> None:
    pattern = [False, True] * 6
    with WebhookReceiver() as hook:
        cfg = configure(settings, hook.url(), switcher={"offload_all": True})
        ids = push(r, keys, "room2", pattern, planted_images, t0=time.time())
        with roles(cfg, redis_url, keys, edge_model, cloud_model):
            assert wait_for(lambda: len(finals(r, keys)) >= len(ids), timeout=90)
    got = finals(r, keys)
    assert sorted(v.frame_id for v in got) == sorted(ids)
    assert all(v.decided_by == Decider.CLOUD and v.offloaded for v in got)
    assert not any(r.exists(keys.pixels(i)) for i in ids)  # pixels gone once judged


def test_without_a_cloud_worker_the_edge_verdict_stands_after_the_timeout(settings, r, keys, redis_url, edge_model,
                                                                           planted_images) -> None:
    with WebhookReceiver() as hook:
        cfg = configure(settings, hook.url(), switcher={"offload_all": True}, alerts={"cloud_timeout_s": 1.5})
        t0 = time.time()
        ids = push(r, keys, "room3", [True, False, True], planted_images, t0=t0, gap_s=0.01)
        with roles(cfg, redis_url, keys, edge_model, cloud_model=None):
            assert wait_for(lambda: len(finals(r, keys)) >= len(ids), timeout=30)
    got = finals(r, keys)
    assert sorted(v.frame_id for v in got) == sorted(ids)
    assert all(v.decided_by == Decider.EDGE_TIMEOUT for v in got)
    assert all(v.decided_at - v.captured_at >= 1.5 for v in got)
    assert [v.is_fall for v in sorted(got, key=lambda v: v.frame_id)] == [True, False, True]

"""Extension points (docs/extending.md): a notification channel and a camera source added by URL
scheme, with no edit to the code that builds them. Copy these tests for a new channel or source."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr

from alerts.notify import CHANNELS, AppriseChannel, Delivery, NotificationChannel, Notifier, build_channels, channel_id
from alerts.service import AlertsService
from cloud_worker.jobs import CloudScorer
from cloud_worker.worker import build_worker, run
from fallwatch.images import decode_rgb_array
from fallwatch.offload import enqueue_offload
from fallwatch.registry import SchemeRegistry, url_scheme
from fallwatch.schemas import CameraState, CameraStatus, CloudVerdict, FrameMessage, OffloadRequest, decode
from fallwatch.settings import Settings
from ingest.camera import run_camera
from ingest.sampling import FpsSampler
from ingest.sources import SOURCES, AvSource, RawFrame, WebcamSource, open_source
from fallwatch.streams import job_queue
from tests.frames import jpeg
from tests.helpers import FakeClock, edge_verdict, plant, wait_for

T0 = 1_700_000_000.0


class MemoChannel(NotificationChannel):
    """Keeps what it is sent: the shape of a channel apprise lacks."""

    boxes: dict[str, list[Delivery]] = {}

    def __init__(self, url: SecretStr, *, timeout_s: float, cooldown_s: float):
        super().__init__(channel_id(url.get_secret_value()), cooldown_s)
        self.box = MemoChannel.boxes.setdefault(url.get_secret_value(), [])

    def deliver(self, note: Delivery, attachment: Path | None = None) -> bool:
        self.box.append(note)
        return True


class StillSource:
    """``still:<grey level>``: the same grey picture for ever, as a live camera."""

    live = True

    def __init__(self, url: str, *, open_timeout_s: float, read_timeout_s: float, max_width: int):
        self.level, self.name, self.fps = int(url.split(":", 1)[1]), url, 10.0

    def frames(self, sampler: FpsSampler, stop: threading.Event) -> Iterator[RawFrame]:
        pts = 0.0
        while not stop.is_set():
            yield RawFrame(pts, np.full((48, 64, 3), self.level, np.uint8), None, 0, self.name)
            pts += 1 / sampler.fps
            stop.wait(1 / sampler.fps)


@pytest.fixture
def memo_scheme() -> Iterator[None]:
    CHANNELS.register("memo")(MemoChannel)
    yield
    CHANNELS.unregister("memo")
    MemoChannel.boxes.clear()


@pytest.fixture
def still_scheme() -> Iterator[None]:
    SOURCES.register("still")(StillSource)
    yield
    SOURCES.unregister("still")


def test_a_registry_picks_by_scheme_and_falls_back() -> None:
    reg: SchemeRegistry[str] = SchemeRegistry("thing", fallback="default")
    reg.register("a", "B")("first")
    assert (reg.lookup("a://x"), reg.lookup("b:1"), reg.lookup("c://x"), reg.lookup("/a/path")) == (
        "first", "first", "default", "default")
    with pytest.raises(ValueError, match="no other for scheme 'z' \\(known: \\)"):
        SchemeRegistry("other").lookup("z://x")
    assert url_scheme("webcam:0") == "webcam" and url_scheme("cam.mp4") == ""


def test_the_built_in_schemes() -> None:
    assert CHANNELS.lookup("json://host/hook") is AppriseChannel
    assert SOURCES.lookup("rtsp://cam/1") is AvSource and SOURCES.lookup("/videos/a.mp4") is AvSource
    src = open_source("webcam:3", open_timeout_s=1, read_timeout_s=1, max_width=320)
    assert isinstance(src, WebcamSource) and src.device == 3


def test_a_registered_channel_receives_the_fall_notification(redis_url, r, keys, memo_scheme) -> None:
    settings = Settings(redis={"url": redis_url}, notifications={"urls": ["memo://ward-3"]},
                        cameras=[{"id": "cam1", "name": "Room 12", "url": "rtsp://cam.local/1"}])
    assert [type(c) for c in build_channels(settings).values()] == [MemoChannel]
    plant(r, keys.verdicts_stream(), edge_verdict("cam1:0", T0, 0.91), edge_verdict("cam1:1", T0 + 0.5, 0.87))
    [event] = AlertsService(settings, r, keys, name="alerts", clock=FakeClock(T0 + 1)).step().events
    assert Notifier(settings, r, keys, "n1").step().delivered == 1
    [note] = MemoChannel.boxes["memo://ward-3"]
    assert note.event_id == event.event_id and note.title == "Fall detected: Room 12"


def test_a_registered_camera_source_is_ingested_like_any_camera(settings, r, keys, still_scheme) -> None:
    data = settings.model_dump(mode="python")
    data["redis"]["url"] = settings.redis.url.get_secret_value()
    cfg = Settings(**{**data, "cameras": [{"id": "cam1", "url": "still:200", "fps": 5}]})
    stop = threading.Event()
    thread = threading.Thread(target=run_camera, args=(cfg, cfg.cameras[0], r, keys, stop), daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: r.xlen(keys.frames_stream()) >= 2, 20)
    finally:
        stop.set()
        thread.join(10)
    msg, _ = decode(r.xrange(keys.frames_stream())[0][1], FrameMessage)
    assert msg.camera_id == "cam1" and msg.source == "still:200"
    first = decode(r.xrange(keys.camera_status_stream())[0][1], CameraStatus)[0]
    assert first.state is CameraState.ONLINE


class Brightness:
    """A cloud "architecture" in a few lines: p_fall is the mean brightness of the picture."""

    def score(self, items):
        p = np.array([float(np.asarray(x, np.float64).mean()) / 255 for x in items])
        return type("Scores", (), {"p_fall": p, "wall_s": 0.001, "energy_j": None})()


def test_any_cloud_scorer_serves_offload_jobs(settings, r, keys) -> None:
    scorer: CloudScorer = Brightness()
    reqs = []
    for i, seed in enumerate((1, 2)):
        key = keys.pixels(f"cam1:{i}")
        r.hset(key, mapping={"p0": jpeg(64, 48, seed=seed)})
        reqs.append(OffloadRequest(frame_id=f"cam1:{i}", camera_id="cam1", captured_at=T0, pixels_key=key,
                                   edge_p_fall=0.5, deadline=4e9))
    enqueue_offload(job_queue(r, keys.cloud_queue(settings.cloud.queue)), reqs, settings)
    assert run(build_worker(settings, r, keys, scorer, name="cloud-x"), threading.Event(), burst=True) == 1
    got = {v.frame_id: v for v in (decode(f, CloudVerdict)[0] for _, f in r.xrange(keys.verdicts_stream()))}
    for i, seed in enumerate((1, 2)):
        expected = decode_rgb_array(jpeg(64, 48, seed=seed), 10**7, 10**8).mean() / 255
        assert got[f"cam1:{i}"].ok and got[f"cam1:{i}"].p_fall == pytest.approx(expected)

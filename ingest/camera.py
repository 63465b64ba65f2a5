"""Live cameras: reconnecting capture loop, status on every change, one publisher per camera.

:func:`run_camera` is the unit a supervisor runs (in a thread, with a stop event);
:func:`run_cameras` runs several, one thread each.
"""

from __future__ import annotations

import threading
import time

import redis
import structlog

from fallwatch.keys import Keys
from fallwatch.settings import CameraSettings, IngestSettings, Settings
from fallwatch.streams import Backoff
from ingest.masks import Masker
from ingest.pipeline import run_pipeline
from ingest.publisher import Publisher
from ingest.records import BufferPolicy, FrameBuffer, FrameRecord, clean_error
from ingest.sampling import FpsSampler, Pacer
from ingest.sources import FrameSource, SourceError, open_source
from ingest.status import StatusReporter

log = structlog.get_logger(__name__)


def buffer_capacity(ing: IngestSettings) -> int:
    """Frames held between decoder and publisher: a few items' worth (a whole clip window in clip mode)."""
    if ing.clip.enabled:
        return max(8, 2 * ((ing.clip.frames - 1) * ing.clip.stride + 1))
    return 8


def source_for(cam: CameraSettings, ing: IngestSettings) -> FrameSource:
    return open_source(cam.url.get_secret_value(), open_timeout_s=ing.open_timeout_s,
                       read_timeout_s=ing.read_timeout_s, max_width=ing.max_width)


def run_camera(settings: Settings, cam: CameraSettings, client: redis.Redis, keys: Keys,
               stop: threading.Event, source: FrameSource | None = None) -> None:
    """Ingest one camera until ``stop`` is set: reconnect with capped backoff, report every state change."""
    ing = settings.effective_ingest(cam)
    url = cam.url.get_secret_value()
    status = StatusReporter(client, keys, cam.id, name=cam.display_name, sample_fps=ing.fps)
    try:
        source = source or source_for(cam, ing)
    except SourceError as exc:
        status.offline(clean_error(str(exc), url))
        return
    status.source = source.name
    publisher = Publisher(client, keys, cam.id, ing, stop, retry=settings.redis)
    buffer = FrameBuffer(buffer_capacity(ing), BufferPolicy.DROP_OLDEST)

    def capture(buf: FrameBuffer, halt: threading.Event) -> None:
        capture_loop(source, cam.id, ing, buf, status, halt, url, masker=Masker(cam.masks))

    log.info("camera_starting", camera=cam.id, source=source.name, fps=ing.fps, clip=ing.clip.enabled)
    run_pipeline(f"ingest-{cam.id}", capture, buffer, publisher, stop)
    status.offline("ingest stopped", expected=True)


def capture_loop(source: FrameSource, camera_id: str, ing: IngestSettings, buffer: FrameBuffer,
                 status: StatusReporter, halt: threading.Event, url: str = "", masker: Masker | None = None) -> None:
    """Open, read and sample ``source`` until ``halt``; on failure go offline, back off, reopen.
    ``masker`` fills the camera's masks into every sampled frame before anything else sees it."""
    backoff = Backoff(ing.reconnect_base_s, ing.reconnect_cap_s)
    pacer = None if source.live else Pacer(1.0, gap_s=1 / ing.fps)  # a file as a camera plays in real time
    segment, seq = 0, 0
    while not halt.is_set():
        reason = "end of stream"
        try:
            for raw in source.frames(FpsSampler(ing.fps), halt):
                if pacer is not None and not pacer.wait(raw.pts_s, segment, halt):
                    return
                status.online(source.fps)
                backoff.reset()
                rgb = masker.apply(raw.rgb) if masker else raw.rgb
                rec = FrameRecord(camera_id, seq, time.time(), rgb, raw.gt_fall, raw.pts_s, segment, source.name)
                seq += 1
                if not buffer.put(rec, halt):
                    return
        except SourceError as exc:
            reason = clean_error(str(exc), url)
        except Exception as exc:  # a decoder bug must not end the camera: report it and reconnect
            reason = clean_error(exc, url)
            log.exception("camera_capture_error", camera=camera_id, reason=reason)
        if halt.is_set():
            return
        status.offline(reason)
        segment += 1
        delay = backoff.next()
        log.info("camera_reconnect_wait", camera=camera_id, delay_s=delay)
        halt.wait(delay)


def select_cameras(settings: Settings, ids: list[str] | None = None) -> list[CameraSettings]:
    """The cameras to run: the given ids (KeyError naming unknown ones), else every enabled one."""
    if ids:
        return [settings.camera(i) for i in ids]
    return [c for c in settings.cameras if c.enabled]


def run_cameras(settings: Settings, cameras: list[CameraSettings], client: redis.Redis, keys: Keys,
                stop: threading.Event) -> None:
    """Run each camera in its own thread until ``stop`` is set."""
    threads = [
        threading.Thread(target=_run_guarded, args=(settings, cam, client, keys, stop),
                         name=f"camera-{cam.id}", daemon=True)
        for cam in cameras
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _run_guarded(settings: Settings, cam: CameraSettings, client: redis.Redis, keys: Keys,
                 stop: threading.Event) -> None:
    """:func:`run_camera` until ``stop``; a crash is reported offline (an alert, as for a dead stream)
    and the camera is restarted with the reconnect backoff (reset after a run longer than its cap)."""
    ing = settings.effective_ingest(cam)
    backoff = Backoff(ing.reconnect_base_s, ing.reconnect_cap_s)
    while not stop.is_set():
        started = time.monotonic()
        try:
            run_camera(settings, cam, client, keys, stop)
            return
        except Exception as exc:  # noqa: BLE001 - a bug must not end a camera for good
            reason = clean_error(exc, cam.url.get_secret_value())
            log.exception("camera_crashed", camera=cam.id, reason=reason)
        if time.monotonic() - started > ing.reconnect_cap_s:
            backoff.reset()
        StatusReporter(client, keys, cam.id, name=cam.display_name).offline(f"camera crashed: {reason}")
        stop.wait(backoff.next())

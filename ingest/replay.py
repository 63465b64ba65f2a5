"""Replays: a labelled dataset or labelled videos put on the frames stream at a given fps.

Every frame carries its ground truth (``gt_fall``). Replays never drop: the buffer waits, and
when an edge consumer group exists the publisher waits for it rather than let ``MAXLEN`` trim
frames nobody has read. Motion gating is off (every labelled frame counts).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import redis
import structlog

from fallwatch.datasets import DEFAULT_FALL_CLASSES, LabeledClip, load_clips, load_yolo
from fallwatch.keys import Keys
from fallwatch.settings import IngestSettings, Settings
from ingest.pipeline import run_pipeline
from ingest.publisher import Publisher
from ingest.records import BufferPolicy, FrameBuffer, FrameRecord
from ingest.sampling import FpsSampler, Pacer
from ingest.sources import (ImageListSource, RawFrame, Skips, SourceError, StopFlag, VideoListSource,
                            parse_video_spec)
from ingest.status import StatusReporter

log = structlog.get_logger(__name__)

CAMERA_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # as CameraSettings.id: frame ids are camera:seq


class ReplaySource(Protocol):
    name: str

    def frames(self, sampler: FpsSampler, stop: StopFlag) -> Iterator[RawFrame]: ...


@dataclass(frozen=True)
class ReplayResult:
    camera_id: str
    items: int
    frames: int
    seconds: float
    skipped: tuple[tuple[str, str], ...] = ()  # bad files: (file, why)


def dataset_source(root: Path, split: str, fall_classes: frozenset[int] = DEFAULT_FALL_CLASSES,
                   strict: bool = False) -> ImageListSource:
    """A YOLO split (``root/split/images``) as a replay source; bad files are skipped (or, strict, fatal)."""
    skips = Skips(strict)
    items = load_yolo(Path(root), split, fall_classes, on_bad=skips.skip)
    return ImageListSource(items, name=f"{Path(root).name}/{split}", strict=strict, skipped=skips.skipped)


def video_source(specs: Sequence[str] = (), clip_list: Path | None = None, max_width: int = 1280,
                 strict: bool = False) -> VideoListSource:
    """Videos from ``FILE[:fall|:nofall]`` specs and/or a clip list (see ``fallwatch.datasets.load_clips``)."""
    clips: list[LabeledClip] = [parse_video_spec(s) for s in specs]
    if clip_list is not None:
        clips += load_clips(Path(clip_list))
    return VideoListSource(clips, max_width=max_width, strict=strict)


def replay_ingest(settings: Settings, camera_id: str) -> IngestSettings:
    """Ingest settings of a replay: the camera's overrides if the id is configured, never gated."""
    cam = next((c for c in settings.cameras if c.id == camera_id), None)
    ing = settings.effective_ingest(cam) if cam is not None else settings.ingest
    return ing.model_copy(update={"motion_gating": False})


def replay_window(settings: Settings, ing: IngestSettings, speed: float) -> int:
    """Entries a replay may have on the stream not yet read by the edge group. Unpaced (speed 0), a few
    edge batches: the replay goes as fast as the edge reads, not all at once."""
    cap = max(1, ing.stream_maxlen // 2)
    return min(cap, 4 * settings.edge.batch_size) if speed == 0 else cap


def run_replay(settings: Settings, source: ReplaySource, client: redis.Redis, keys: Keys,
               stop: threading.Event, fps: float | None = None, loop: bool = False,
               camera_id: str = "replay", limit: int | None = None, speed: float = 1.0) -> ReplayResult:
    """Publish ``source`` as camera ``camera_id`` at ``fps`` (default ``ingest.fps``); ``speed`` 0 = no pacing."""
    if not CAMERA_ID.fullmatch(camera_id):
        raise ValueError(f"replay camera id {camera_id!r} must be 1-64 of A-Z a-z 0-9 _ -")
    ing = replay_ingest(settings, camera_id)
    fps = fps or ing.fps
    clips = ing.clip.enabled and not isinstance(source, ImageListSource)
    if ing.clip.enabled and not clips:
        log.warning("replay_clips_ignored", camera=camera_id, reason="clip mode needs videos, not images")
    publisher = Publisher(client, keys, camera_id, ing, stop, clips=clips,
                          max_pending=replay_window(settings, ing, speed), retry=settings.redis)
    status = StatusReporter(client, keys, camera_id, name=camera_id, source=source.name, sample_fps=fps)
    buffer = FrameBuffer(max(8, 2 * ing.clip.frames * ing.clip.stride), BufferPolicy.WAIT)

    failed: list[str] = []

    def produce(buf: FrameBuffer, halt: threading.Event) -> None:
        try:
            replay_loop(source, camera_id, fps, loop, speed, buf, halt)
        except SourceError as exc:  # --strict: a bad file stops the replay
            failed.append(str(exc))

    started = time.monotonic()
    status.online(fps)
    log.info("replay_started", camera=camera_id, source=source.name, fps=fps, loop=loop, limit=limit)
    run_pipeline(f"replay-{camera_id}", produce, buffer, publisher, stop, limit=limit)
    status.offline("replay finished", expected=True)
    if failed:
        raise SourceError(failed[0])
    result = ReplayResult(camera_id, publisher.stats.items, publisher.stats.frames, time.monotonic() - started,
                          tuple(getattr(source, "skipped", ())))
    log.info("replay_finished", camera=camera_id, items=result.items, frames=result.frames,
             seconds=round(result.seconds, 3))
    return result


def replay_loop(source: ReplaySource, camera_id: str, fps: float, loop: bool, speed: float,
                buffer: FrameBuffer, halt: threading.Event) -> None:
    """Feed the source's frames into ``buffer`` in (scaled) real time, once or until halted."""
    pacer = Pacer(speed, gap_s=1 / fps)
    seq, offset = 0, 0
    while not halt.is_set():
        segments = 0
        for raw in source.frames(FpsSampler(fps), halt):
            segment = offset + raw.segment
            segments = max(segments, raw.segment + 1)
            if not pacer.wait(raw.pts_s, segment, halt):
                return
            rec = FrameRecord(camera_id, seq, time.time(), raw.rgb, raw.gt_fall, raw.pts_s, segment, raw.source)
            seq += 1
            if not buffer.put(rec, halt):
                return
        if not loop or seq == 0:
            return
        offset += segments

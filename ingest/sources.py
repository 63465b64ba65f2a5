"""Frame sources: network streams and files through PyAV, webcams through OpenCV, and replays.

Every source has ``frames(sampler, stop)``: a generator that opens the source, yields the
sampled frames as :class:`RawFrame` and closes it again; a failure is a :class:`SourceError`
whose message is safe to log (no credentials). PyAV sources decide *before* decoding whether a
packet's frame can be wanted: a packet that cannot be is decoded with ``skip_frame=NONREF``,
so a non-reference frame (most B-frames) costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import cv2
import numpy as np
import structlog

from fallwatch.datasets import DatasetError, LabeledClip, LabeledImage, read_rgb
from fallwatch.registry import SchemeRegistry
from ingest.jpeg import fit_width
from ingest.records import clean_error, describe_source
from ingest.sampling import FpsSampler

log = structlog.get_logger(__name__)

NETWORK_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt", "rtp"})
_YUV420 = frozenset({"yuv420p", "yuvj420p"})


class SourceError(RuntimeError):
    """A source could not be opened or read. The message names the source, never its credentials."""


@dataclass(frozen=True, eq=False)
class RawFrame:
    pts_s: float
    rgb: np.ndarray
    gt_fall: bool | None = None
    segment: int = 0
    source: str = ""


class FrameSource(Protocol):
    name: str  # printable, without credentials
    live: bool  # paced by the source itself (a camera) rather than read as fast as possible (a file)
    fps: float | None  # nominal input fps, known once opened

    def frames(self, sampler: FpsSampler, stop: "StopFlag") -> Iterator[RawFrame]: ...


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


def is_network_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() in NETWORK_SCHEMES


def frame_to_rgb(frame, max_width: int) -> np.ndarray:
    """A decoded PyAV frame as HxWx3 uint8 RGB, scaled to ``max_width`` in the same swscale pass.

    4:2:0 frames that need no scaling go through OpenCV's I420 converter, about 3x faster.
    """
    width, height = fit_width(frame.width, frame.height, max_width)
    if (width, height) == (frame.width, frame.height) and frame.format.name in _YUV420 \
            and width % 2 == 0 and height % 2 == 0:
        return cv2.cvtColor(frame.to_ndarray(), cv2.COLOR_YUV2RGB_I420)
    return frame.reformat(width=width, height=height, format="rgb24").to_ndarray()


class AvSource:
    """RTSP (over TCP), RTMP, HTTP and file URLs decoded with PyAV, one decoder thread."""

    def __init__(self, url: str, *, open_timeout_s: float = 10.0, read_timeout_s: float = 5.0,
                 max_width: int = 1280, gt_fall: bool | None = None, name: str | None = None):
        self.url = url
        self.name = name or describe_source(url)
        self.live = is_network_url(url)
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_width = max_width
        self.gt_fall = gt_fall
        self.fps: float | None = None
        self.decoded = 0  # frames decoded in the last session (for benchmarks)

    def _options(self) -> dict[str, str]:
        scheme = urlsplit(self.url).scheme.lower()
        if scheme in ("rtsp", "rtsps"):
            return {"rtsp_transport": "tcp", "timeout": str(int(self.read_timeout_s * 1e6))}
        if scheme in ("http", "https"):
            return {"rw_timeout": str(int(self.read_timeout_s * 1e6))}
        return {}

    def _open(self):
        import av  # noqa: PLC0415 - heavy, only where video is read

        try:
            container = av.open(self.url, options=self._options(),
                                timeout=(self.open_timeout_s, self.read_timeout_s))
        except av.error.ExitError:  # the interrupt callback: open timeout
            raise SourceError(f"cannot open {self.name}: no answer within {self.open_timeout_s:g}s") from None
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise SourceError(f"cannot open {self.name}: {clean_error(exc, self.url)}") from None
        if not container.streams.video:
            container.close()
            raise SourceError(f"{self.name} has no video stream")
        return container

    def frames(self, sampler: FpsSampler, stop: StopFlag, segment: int = 0) -> Iterator[RawFrame]:
        import av  # noqa: PLC0415

        container = self._open()
        try:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else None
            stream.codec_context.thread_count = 1  # many cameras per core: one thread each is cheapest
            yield from self._decode(container, stream, sampler, stop, segment)
        except av.error.ExitError:  # the interrupt callback: read timeout
            raise SourceError(f"{self.name} stalled: no frame for {self.read_timeout_s:g}s") from None
        except (av.error.FFmpegError, OSError) as exc:
            raise SourceError(f"reading {self.name} failed: {clean_error(exc, self.url)}") from None
        finally:
            container.close()

    def _decode(self, container, stream, sampler: FpsSampler, stop: StopFlag, segment: int) -> Iterator[RawFrame]:
        codec = stream.codec_context
        time_base = float(stream.time_base or 0)  # a float: Fraction arithmetic per packet is slow
        started = last_frame = time.monotonic()
        self.decoded = 0
        for packet in container.demux(stream):
            if stop.is_set():
                return
            if packet.pts is not None and time_base:
                codec.skip_frame = "NONE" if sampler.wants(packet.pts * time_base) else "NONREF"
            for frame in codec.decode(packet):
                self.decoded += 1
                last_frame = time.monotonic()
                t = frame.time if frame.time is not None else last_frame - started
                if sampler.take(t):
                    yield RawFrame(t, frame_to_rgb(frame, self.max_width), self.gt_fall, segment, self.name)
            if self.live and time.monotonic() - last_frame > self.read_timeout_s:
                raise SourceError(f"{self.name} stalled: no frame for {self.read_timeout_s:g}s")
        if self.live:
            raise SourceError(f"{self.name} ended the stream (server closed or restarted)")


class WebcamSource:
    """A local camera through OpenCV (``webcam:N``); frames not sampled are grabbed, never decoded."""

    live = True

    def __init__(self, device: int | str, *, open_timeout_s: float = 10.0, read_timeout_s: float = 5.0,
                 max_width: int = 1280):
        self.device = device
        self.name = f"webcam:{device}" if isinstance(device, int) else describe_source(str(device))
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_width = max_width
        self.fps: float | None = None

    def _open(self) -> cv2.VideoCapture:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.open_timeout_s * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.read_timeout_s * 1000)]
        cap = cv2.VideoCapture(self.device, cv2.CAP_ANY, params)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {self.name}")
        self.fps = float(cap.get(cv2.CAP_PROP_FPS)) or None
        return cap

    def frames(self, sampler: FpsSampler, stop: StopFlag, segment: int = 0) -> Iterator[RawFrame]:
        cap = self._open()
        started = time.monotonic()
        try:
            while not stop.is_set():
                if not cap.grab():
                    raise SourceError(f"{self.name}: no frame (camera unplugged or stream ended)")
                t = time.monotonic() - started
                if sampler.take(t):
                    yield RawFrame(t, self._retrieve(cap), None, segment, self.name)
        finally:
            cap.release()

    def _retrieve(self, cap: cv2.VideoCapture) -> np.ndarray:
        ok, bgr = cap.retrieve()
        if not ok or bgr is None:
            raise SourceError(f"{self.name}: frame could not be decoded")
        width, height = fit_width(bgr.shape[1], bgr.shape[0], self.max_width)
        if width != bgr.shape[1]:
            bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


SourceFactory = Callable[..., FrameSource]  # (url, *, open_timeout_s, read_timeout_s, max_width)

# URL scheme -> camera source; PyAV opens every scheme (and plain path) no other source claims.
SOURCES: SchemeRegistry[SourceFactory] = SchemeRegistry("camera source", fallback=AvSource)


@SOURCES.register("webcam")
def open_webcam(url: str, **timeouts: Any) -> FrameSource:
    """``webcam:N``: local video device N through OpenCV."""
    index = url.split(":", 1)[1]
    if not index.isdigit():
        raise SourceError(f"webcam URL must be webcam:N with a device number, got {url!r}")
    return WebcamSource(int(index), **timeouts)


def open_source(url: str, *, open_timeout_s: float, read_timeout_s: float, max_width: int) -> FrameSource:
    """The source for a camera URL, by its scheme (see :data:`SOURCES`)."""
    return SOURCES.lookup(url)(url, open_timeout_s=open_timeout_s, read_timeout_s=read_timeout_s, max_width=max_width)


# --- replays ---------------------------------------------------------------------------------


class Skips:
    """The replay policy for a bad file: skip it and remember why, or (``strict``) stop with SourceError."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.skipped: list[tuple[str, str]] = []  # (file, why)

    def skip(self, file: str, error: str) -> None:
        if self.strict:
            raise SourceError(f"{error} (--strict stops at the first bad file)")
        self.skipped.append((file, error))
        log.warning("replay_file_skipped", file=file, error=error)


class ImageListSource(Skips):
    """Labelled images (a YOLO split), each once and in order, one every 1/fps of the sampler's fps."""

    live = False
    fps: float | None = None

    def __init__(self, items: Sequence[LabeledImage], name: str = "dataset", strict: bool = False,
                 skipped: Sequence[tuple[str, str]] = ()):
        if not items and not skipped:
            raise SourceError(f"{name}: no images to replay")
        super().__init__(strict)
        self.skipped += skipped
        self.items = list(items)
        self.name = name

    def frames(self, sampler: FpsSampler, stop: StopFlag) -> Iterator[RawFrame]:
        for i, item in enumerate(self.items):
            if stop.is_set():
                return
            try:
                rgb = read_rgb(item.path)
            except DatasetError as exc:
                self.skip(str(item.path), str(exc))
                continue
            yield RawFrame(i / sampler.fps, rgb, item.fall, 0, item.id)


class VideoListSource(Skips):
    """Labelled video files one after another, each a segment, sampled to the sampler's fps."""

    live = False

    def __init__(self, clips: Sequence[LabeledClip], max_width: int = 1280, name: str = "videos",
                 strict: bool = False):
        if not clips:
            raise SourceError(f"{name}: no videos to replay")
        super().__init__(strict)
        self.clips = list(clips)
        self.max_width = max_width
        self.name = name
        self.fps: float | None = None

    def frames(self, sampler: FpsSampler, stop: StopFlag) -> Iterator[RawFrame]:
        for segment, clip in enumerate(self.clips):
            if stop.is_set():
                return
            sampler.reset()
            src = AvSource(str(clip.path), max_width=self.max_width, gt_fall=clip.fall, name=clip.id)
            try:
                yield from src.frames(sampler, stop, segment)
            except SourceError as exc:
                self.skip(str(clip.path), str(exc))
            self.fps = src.fps


def parse_video_spec(spec: str) -> LabeledClip:
    """``FILE``, ``FILE:fall`` or ``FILE:nofall`` as a clip (label None when not given)."""
    from fallwatch.datasets import parse_fall  # noqa: PLC0415

    path, label = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head and "/" not in tail and not Path(spec).is_file():
        try:
            label = parse_fall(tail, spec)
            path = head
        except DatasetError:
            if Path(head).is_file():
                raise SourceError(f"--video {spec}: {tail!r} is not a label (use FILE:fall or FILE:nofall)") from None
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"video {p} does not exist")
    return LabeledClip(id=p.stem, path=p, fall=label)

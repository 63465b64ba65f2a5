"""Fast unit tests of ingest: sampling, clips, motion gating, buffers, JPEG, names, pacing."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from ingest.jpeg import encode_jpeg, fit_width
from fallwatch.streams import Backoff
from ingest.publisher import clip_label
from ingest.records import BufferPolicy, FrameBuffer, FrameRecord, clean_error, describe_source
from ingest.sampling import ClipAssembler, FpsSampler, MotionGate, Pacer
from ingest.sources import SourceError, parse_video_spec


def rec(i: int, segment: int = 0, gt: bool | None = None, shape=(8, 8, 3)) -> FrameRecord:
    return FrameRecord("cam", i, 1000.0 + i, np.zeros(shape, np.uint8), gt, i / 2, segment)


def picks(src_fps: float, dst_fps: float, n: int, offset: float = 0.0) -> list[int]:
    sampler = FpsSampler(dst_fps)
    return [k for k in range(n) if sampler.take(offset + k / src_fps)]


# --- sampling -------------------------------------------------------------------------------


def test_18fps_to_2fps_takes_every_ninth_frame():
    assert picks(18, 2, 90) == [0, 9, 18, 27, 36, 45, 54, 63, 72, 81]


def test_sampling_takes_first_frame_of_each_slot_at_uneven_ratios():
    assert picks(30, 2, 60) == [0, 15, 30, 45]
    # 25 fps: 0.5 s falls between frames 12 (0.48 s) and 13 (0.52 s): the first frame after it wins.
    assert picks(25, 2, 50) == [0, 13, 25, 38]
    # a stream starting at an arbitrary timestamp samples the same way
    assert picks(18, 2, 36, offset=12345.678) == [0, 9, 18, 27]


def test_sampler_never_upsamples_and_keeps_rate_with_jitter():
    assert picks(5, 10, 10) == list(range(10))  # asking for more than the source has: every frame
    rng = np.random.default_rng(0)
    times = [k / 18 + rng.uniform(-0.01, 0.01) for k in range(180)]
    sampler = FpsSampler(2)
    kept = [t for t in times if sampler.take(t)]
    assert len(kept) == 20
    assert all(0.4 < b - a < 0.6 for a, b in zip(kept, kept[1:]))


def test_sampler_peek_does_not_commit_and_restarts_on_backwards_time():
    sampler = FpsSampler(2)
    assert sampler.take(10.0)
    assert not sampler.wants(10.2) and sampler.wants(10.5) and sampler.wants(10.5)
    assert sampler.take(10.5) and not sampler.take(10.6)
    assert sampler.take(3.0)  # a new file / restarted stream: new timeline
    assert not sampler.take(3.1) and sampler.take(3.5)


# --- clips ----------------------------------------------------------------------------------


def test_clip_assembly_with_stride():
    clips = ClipAssembler(frames=3, stride=2)
    out = [clips.push(rec(i)) for i in range(12)]
    done = [[r.seq for r in c] for c in out if c is not None]
    assert done == [[0, 2, 4], [5, 7, 9]]  # windows of 5 sampled frames, back to back
    assert [i for i, c in enumerate(out) if c] == [4, 9]


def test_clip_never_spans_segments_or_sizes():
    clips = ClipAssembler(frames=3)
    assert clips.push(rec(0, segment=0)) is None
    assert clips.push(rec(1, segment=0)) is None
    assert clips.push(rec(2, segment=1)) is None  # reconnect: the partial clip is dropped
    assert clips.push(rec(3, segment=1)) is None
    clip = clips.push(rec(4, segment=1))
    assert [r.seq for r in clip] == [2, 3, 4]
    assert clips.push(rec(5)) is None
    assert clips.push(rec(6, shape=(16, 8, 3))) is None  # size change
    assert [r.seq for r in clips.push(rec(7, shape=(16, 8, 3))) or []] == []
    assert [r.seq for r in clips.push(rec(8, shape=(16, 8, 3)))] == [6, 7, 8]


def test_clip_label_is_fall_if_any_frame_is():
    assert clip_label([rec(0, gt=False), rec(1, gt=True)]) is True
    assert clip_label([rec(0, gt=False), rec(1, gt=None)]) is False
    assert clip_label([rec(0), rec(1)]) is None


# --- motion gating --------------------------------------------------------------------------


def test_motion_gate_detects_change_and_ignores_noise():
    rng = np.random.default_rng(1)
    still = rng.integers(0, 200, (120, 160, 3), dtype=np.uint8)
    gate = MotionGate(threshold=0.01, keepalive_s=10)
    assert gate.moved(still)  # first frame
    noisy = np.clip(still.astype(int) + rng.integers(-5, 6, still.shape), 0, 255).astype(np.uint8)
    assert not gate.moved(noisy)
    person = noisy.copy()
    person[40:100, 60:90] = 255  # a bright block appears: ~9% of the picture
    assert gate.moved(person)
    assert not gate.moved(person.copy())


def test_motion_gate_averages_fine_texture_jitter_away_but_sees_a_person():
    stripes = np.zeros((480, 640, 3), np.uint8)
    stripes[:, (np.arange(640) % 4) < 2] = 220  # 2 px stripes: carpet, blinds, sensor-level detail
    gate = MotionGate(threshold=0.01, keepalive_s=10)
    assert gate.moved(stripes)
    assert not gate.moved(np.roll(stripes, 1, axis=1))  # a 1 px shake: every pixel column flips
    fallen = np.roll(stripes, 1, axis=1)
    fallen[300:420, 200:440] = 20  # a body on the floor: ~9% of the frame
    assert gate.moved(fallen)


def test_motion_gate_keepalive():
    gate = MotionGate(threshold=0.01, keepalive_s=5)
    sent = [t for t in np.arange(0, 20, 0.5) if gate.admit(False, float(t))]
    assert sent == [0.0, 5.0, 10.0, 15.0]
    assert gate.admit(True, 15.5)  # motion goes through at once
    assert not gate.admit(False, 16.0)
    assert gate.admit(False, 20.5)  # 5 s after the last one sent


# --- buffer ---------------------------------------------------------------------------------


def test_drop_oldest_keeps_newest_and_counts():
    buf = FrameBuffer(3, BufferPolicy.DROP_OLDEST)
    for i in range(5):
        assert buf.put(rec(i))
    assert buf.take_dropped() == 2 and buf.take_dropped() == 0
    assert [buf.get(0).seq for _ in range(3)] == [2, 3, 4]
    assert buf.get(0.01) is None


def test_wait_policy_blocks_producer_and_never_drops():
    buf = FrameBuffer(2, BufferPolicy.WAIT)
    done = threading.Event()

    def produce():
        for i in range(6):
            buf.put(rec(i))
        buf.close()
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    time.sleep(0.05)
    assert not done.is_set() and len(buf) == 2  # blocked on a full buffer
    got = []
    while (item := buf.get(1.0)) is not None:
        got.append(item.seq)
    assert got == list(range(6)) and buf.take_dropped() == 0 and buf.finished


def test_wait_policy_gives_up_on_stop_and_close():
    buf = FrameBuffer(1, BufferPolicy.WAIT)
    assert buf.put(rec(0))
    stop = threading.Event()
    stop.set()
    assert not buf.put(rec(1), stop)
    buf.close()
    assert not buf.put(rec(2))
    assert buf.get(0).seq == 0 and buf.get(0) is None and buf.finished


# --- JPEG -----------------------------------------------------------------------------------


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG"
        return np.asarray(img.convert("RGB"))


def test_jpeg_downscales_above_max_width_and_keeps_aspect():
    rgb = np.zeros((480, 1920, 3), np.uint8)
    rgb[:, :960, 0] = 255  # left half red
    img = encode_jpeg(rgb, quality=80, max_width=640)
    out = _decode(img.data)
    assert (img.width, img.height) == (640, 160) == (out.shape[1], out.shape[0])
    assert out[80, 100, 0] > 200 and out[80, 100, 2] < 60  # colours not swapped: red stays red
    assert out[80, 600, 0] < 60


def test_jpeg_keeps_small_frames_and_quality_changes_size():
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 160, dtype=np.float32)[None, :, None] + np.zeros((120, 1, 3), np.float32)
    rgb = np.clip(ramp + rng.normal(0, 8, ramp.shape), 0, 255).astype(np.uint8)
    low, high = encode_jpeg(rgb, 20, 1280), encode_jpeg(rgb, 95, 1280)
    assert (low.width, low.height) == (160, 120)
    assert len(low.data) < len(high.data)
    assert np.abs(_decode(high.data).astype(int) - rgb).mean() < 12


def test_jpeg_rejects_bad_arrays_with_the_shape():
    with pytest.raises(ValueError, match=r"HxWx3 uint8.*\(10, 10\)"):
        encode_jpeg(np.zeros((10, 10), np.uint8), 80, 640)
    with pytest.raises(ValueError, match="float32"):
        encode_jpeg(np.zeros((10, 10, 3), np.float32), 80, 640)


def test_fit_width_even_sizes():
    assert fit_width(640, 480, 1280) == (640, 480)
    assert fit_width(1921, 1081, 640) == (640, 360)
    assert fit_width(4000, 10, 101) == (100, 2)


# --- names, errors, backoff, pacing ---------------------------------------------------------


def test_source_names_never_hold_credentials():
    url = "rtsp://admin:hunter2@10.0.0.5:554/Streaming/101?token=abc"
    assert describe_source(url) == "rtsp://10.0.0.5:554/Streaming/101"
    assert describe_source("/data/clips/a.mp4") == "a.mp4"
    assert describe_source("file:///data/b.mp4") == "b.mp4"
    assert describe_source("webcam:0") == "webcam:0"
    err = clean_error(OSError(f"Connection refused: '{url}'"), url)
    assert "hunter2" not in err and "token" not in err and "10.0.0.5:554" in err
    assert "hunter2" not in clean_error("failed rtsp://u:hunter2@other/x", "")


def test_backoff_is_capped_and_resets():
    b = Backoff(0.5, 4)
    assert [b.next() for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    b.reset()
    assert b.next() == 0.5


def test_pacer_real_time_and_new_timelines():
    now = [100.0]
    pacer = Pacer(2.0, clock=lambda: now[0])
    assert pacer.delay(5.0) == 0  # anchors
    assert pacer.delay(6.0) == pytest.approx(0.5)  # twice real time
    now[0] = 101.0
    assert pacer.delay(6.0) == 0  # late: no wait
    assert pacer.delay(1.0) == 0  # backwards: new timeline
    assert pacer.delay(2.0) == pytest.approx(0.5)
    assert pacer.delay(9.0, segment=1) == pytest.approx(0.5)  # new segment: not before the last one was due
    assert Pacer(0).delay(1e9) == 0
    gapped = Pacer(1.0, gap_s=0.5, clock=lambda: now[0])
    assert gapped.delay(0.0) == 0 and gapped.delay(1.0) == pytest.approx(1.0)
    assert gapped.delay(0.0, segment=1) == pytest.approx(1.5)  # next file: 0.5 s after the last frame


def test_video_spec_labels(tmp_path):
    f = tmp_path / "clip.mp4"
    f.write_bytes(b"x")
    assert parse_video_spec(f"{f}:fall").fall is True
    assert parse_video_spec(f"{f}:nofall").fall is False
    assert parse_video_spec(str(f)).fall is None
    with pytest.raises(SourceError, match="missing.mp4 does not exist"):
        parse_video_spec(str(tmp_path / "missing.mp4") + ":fall")

"""Ingest end to end on a real (private) Redis: files, replays, clips, status, counters, redaction."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
import structlog
from PIL import Image
from typer.testing import CliRunner

from fallwatch import logging as fw_logging
from fallwatch.schemas import CameraState, CameraStatus, FrameMessage, ItemKind, decode
from fallwatch.settings import Settings
from ingest.camera import capture_loop, run_camera
from ingest.publisher import Publisher
from ingest.records import BufferPolicy, FrameBuffer, FrameRecord
from ingest.replay import dataset_source, run_replay, video_source
from ingest.sources import AvSource, RawFrame, SourceError, WebcamSource
from ingest.sampling import FpsSampler
from ingest.status import StatusReporter, read_info
from ingest_media import index_frame, read_index, write_mp4, write_yolo


def frames_on_stream(r, keys) -> list[tuple[FrameMessage, list[bytes]]]:
    return [decode(fields, FrameMessage) for _, fields in r.xrange(keys.frames_stream())]


def statuses(r, keys) -> list[CameraStatus]:
    return [decode(fields, CameraStatus)[0] for _, fields in r.xrange(keys.camera_status_stream())]


def jpeg_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def counter(r, keys, cam: str, name: str) -> int:
    return int(r.get(keys.camera_counter(cam, name)) or 0)


def with_camera(settings: Settings, url: str, **cam) -> Settings:
    data = settings.model_dump(mode="python")
    data["redis"]["url"] = settings.redis.url.get_secret_value()
    data["cameras"] = [{"id": "cam1", "url": url, **cam}]
    return Settings(**data)


def run_for(fn, seconds: float, *args) -> threading.Event:
    stop = threading.Event()
    t = threading.Thread(target=fn, args=(*args, stop), daemon=True)
    t.start()
    time.sleep(seconds)
    stop.set()
    t.join(10)
    assert not t.is_alive()
    return stop


# --- file sources ---------------------------------------------------------------------------


def test_file_source_decodes_the_sampled_frames_and_skips_non_reference_ones(tmp_path):
    path = write_mp4(tmp_path / "a.mp4", 72, fps=18)
    src = AvSource(str(path))
    got = list(src.frames(FpsSampler(2), threading.Event()))
    assert [round(f.pts_s * 18) for f in got] == [0, 9, 18, 27, 36, 45, 54, 63]
    assert [read_index(f.rgb) for f in got] == [0, 9, 18, 27, 36, 45, 54, 63]  # the right pictures
    assert got[0].rgb.shape == (120, 160, 3) and src.fps == 18
    assert src.decoded < 72  # non-reference frames that were not wanted were never decoded


def test_file_source_decodes_straight_to_max_width(tmp_path):
    path = write_mp4(tmp_path / "a.mp4", 18, width=320, height=240)
    got = list(AvSource(str(path), max_width=160).frames(FpsSampler(2), threading.Event()))
    assert got[0].rgb.shape == (120, 160, 3) and read_index(got[1].rgb) == 9


def test_webcam_source_reads_through_opencv(tmp_path):
    path = write_mp4(tmp_path / "a.mp4", 10)
    got = []
    with pytest.raises(SourceError, match="a.mp4: no frame"):  # a camera that ends is an error
        for frame in WebcamSource(str(path)).frames(FpsSampler(1e7), threading.Event()):
            got.append(frame)
    assert [read_index(f.rgb) for f in got] == list(range(10))


def test_file_camera_publishes_sampled_frames_in_real_time(settings, keys, r, tmp_path):
    path = write_mp4(tmp_path / "cam.mp4", 36, fps=18)
    cfg = with_camera(settings, str(path), fps=4.0)
    run_for(lambda s, c, cl, k, stop: run_camera(s, c, cl, k, stop), 1.3, cfg, cfg.cameras[0], r, keys)
    frames = frames_on_stream(r, keys)
    # 4 fps in real time: about 5 frames in 1.3 s (not all 8 of the 2 s clip); 18 -> 4 fps takes
    # the first frame at or after each 0.25 s step
    assert 2 <= len(frames) <= 7, len(frames)
    msgs = [m for m, _ in frames]
    assert [m.frame_id for m in msgs] == [f"cam1:{m.seq}" for m in msgs]
    assert [m.seq for m in msgs] == list(range(msgs[0].seq, msgs[0].seq + len(msgs)))
    assert all(m.kind is ItemKind.IMAGE and m.n_images == 1 and (m.width, m.height) == (160, 120) for m in msgs)
    assert [read_index(jpeg_rgb(imgs[0])) for _, imgs in frames] == [0, 5, 9, 14, 18, 23, 27][:len(frames)]
    assert msgs[0].source == "cam.mp4"
    st = statuses(r, keys)
    assert [s.state for s in st] == [CameraState.ONLINE, CameraState.OFFLINE]
    assert st[0].fps == 18 and st[1].reason == "ingest stopped"
    info = read_info(r, keys, "cam1")
    assert info["state"] == "offline" and info["last_frame_id"] == msgs[-1].frame_id
    assert abs(float(info["last_frame_at"]) - msgs[-1].captured_at) < 1e-3
    assert float(info["fps"]) == 18 and float(info["sample_fps"]) == 4 and info["name"] == "cam1"
    assert counter(r, keys, "cam1", "items") == len(frames)


def test_frame_ids_keep_growing_across_restarts(settings, keys, r, tmp_path):
    path = write_mp4(tmp_path / "cam.mp4", 18, fps=18)
    cfg = with_camera(settings, str(path), fps=18.0)
    for _ in range(2):
        run_for(lambda s, c, cl, k, stop: run_camera(s, c, cl, k, stop), 0.4, cfg, cfg.cameras[0], r, keys)
    ids = [m.frame_id for m, _ in frames_on_stream(r, keys)]
    assert len(ids) == len(set(ids)) > 4


def test_dead_file_url_goes_offline_with_a_clear_reason(settings, keys, r, tmp_path):
    cfg = with_camera(settings, str(tmp_path / "nowhere" / "cam.mp4"))
    run_for(lambda s, c, cl, k, stop: run_camera(s, c, cl, k, stop), 0.3, cfg, cfg.cameras[0], r, keys)
    st = statuses(r, keys)
    assert st[0].state is CameraState.OFFLINE and st[0].camera_id == "cam1"
    assert "cannot open cam.mp4" in st[0].reason and "No such file" in st[0].reason
    assert len(st) == 1  # retries of a dead source do not repeat the status
    info = read_info(r, keys, "cam1")
    assert info["state"] == "offline" and "No such file" in info["reason"]


def test_no_password_in_logs_or_status(settings, keys, r):
    out = io.StringIO()
    saved = structlog.get_config()
    fw_logging.configure("debug", "json", stream=out)
    try:
        url = "rtsp://admin:S3cretPw@127.0.0.1:9/live?token=T0kenValue"  # port 9: nothing listens
        cfg = with_camera(settings, url)
        cfg.ingest.open_timeout_s = 1.0
        run_for(lambda s, c, cl, k, stop: run_camera(s, c, cl, k, stop), 0.8, cfg, cfg.cameras[0], r, keys)
    finally:
        structlog.configure(**saved)
    st = statuses(r, keys)
    assert st and st[0].state is CameraState.OFFLINE and "127.0.0.1:9" in st[0].reason
    dump = out.getvalue() + json.dumps([s.reason for s in st]) + json.dumps(read_info(r, keys, "cam1"))
    assert "camera_offline" in out.getvalue()
    assert "S3cretPw" not in dump and "T0kenValue" not in dump


# --- publisher: gating, drops, clips --------------------------------------------------------


def test_motion_gating_skips_still_frames_and_sends_keepalives(settings, keys, r):
    ing = settings.ingest.model_copy(update={"motion_gating": True, "keepalive_s": 2.0})
    pub = Publisher(r, keys, "cam1", ing, threading.Event())
    still = index_frame(3)
    moving = index_frame(200)
    sent = []
    for i in range(12):  # 0.5 s apart; motion at 1.5 s only
        rgb = moving if i == 3 else still
        sent.append(pub.handle(FrameRecord("cam1", i, 1000 + i * 0.5, rgb)))
    assert [i for i, s in enumerate(sent) if s] == [0, 3, 4, 8]  # first, motion (and back), keepalive
    assert pub.stats.gated == 8
    assert counter(r, keys, "cam1", "gated") == 5  # written with the next published item
    assert counter(r, keys, "cam1", "items") == 4


def test_live_buffer_drops_count_on_redis(settings, keys, r):
    pub = Publisher(r, keys, "cam1", settings.ingest, threading.Event())
    buf = FrameBuffer(2, BufferPolicy.DROP_OLDEST)
    for i in range(5):
        buf.put(FrameRecord("cam1", i, 1000.0 + i, index_frame(i)))
    while (rec := buf.get(0)) is not None:
        pub.handle(rec, dropped=buf.take_dropped())
    assert [read_index(jpeg_rgb(imgs[0])) for _, imgs in frames_on_stream(r, keys)] == [3, 4]
    assert counter(r, keys, "cam1", "dropped") == 3 and counter(r, keys, "cam1", "frames") == 2


def test_stream_is_trimmed_to_maxlen(settings, keys, r):
    ing = settings.ingest.model_copy(update={"stream_maxlen": 10})
    pub = Publisher(r, keys, "cam1", ing, threading.Event())
    small = np.zeros((8, 8, 3), np.uint8)
    for i in range(300):
        pub.handle(FrameRecord("cam1", i, 1000.0 + i, small))
    assert r.xlen(keys.frames_stream()) < 150  # approximate trimming: far below 300


# --- replays --------------------------------------------------------------------------------


def test_replay_yolo_folder_with_labels_and_limit(settings, keys, r, tmp_path):
    write_yolo(tmp_path / "ds", "valid", [0, 1, None, 0, 1, 1])
    result = run_replay(settings, dataset_source(tmp_path / "ds", "valid"), r, keys, threading.Event(),
                        fps=200, camera_id="replay1", limit=4)
    frames = frames_on_stream(r, keys)
    assert result.items == 4 == len(frames)
    assert [m.gt_fall for m, _ in frames] == [True, False, None, True]
    assert [m.source for m, _ in frames] == ["img000", "img001", "img002", "img003"]
    assert [read_index(jpeg_rgb(imgs[0])) for _, imgs in frames] == [0, 1, 2, 3]
    assert all(m.camera_id == "replay1" for m, _ in frames)
    assert [s.state for s in statuses(r, keys)] == [CameraState.ONLINE, CameraState.OFFLINE]


def test_replay_paces_at_fps_and_loops(settings, keys, r, tmp_path):
    write_yolo(tmp_path / "ds", "valid", [0, 1, 1])
    started = time.monotonic()
    result = run_replay(settings, dataset_source(tmp_path / "ds", "valid"), r, keys, threading.Event(),
                        fps=20, loop=True, limit=8)
    elapsed = time.monotonic() - started
    assert result.items == 8 and elapsed > 7 / 20 * 0.9
    assert [m.gt_fall for m, _ in frames_on_stream(r, keys)] == [True, False, False] * 2 + [True, False]


def test_replay_videos_as_clips_with_labels(settings, keys, r, tmp_path):
    fall = write_mp4(tmp_path / "fall.mp4", 54, fps=18)
    nofall = write_mp4(tmp_path / "walk.mp4", 36, fps=18)
    data = settings.model_dump(mode="python")
    data["redis"]["url"] = settings.redis.url.get_secret_value()
    data["ingest"]["clip"] = {"enabled": True, "frames": 3, "stride": 2}
    cfg = Settings(**data)
    src = video_source([f"{fall}:fall", f"{nofall}:nofall"])
    result = run_replay(cfg, src, r, keys, threading.Event(), fps=6, speed=0)
    frames = frames_on_stream(r, keys)
    # 6 fps: fall.mp4 gives 18 sampled frames -> 3 clips of 5-frame windows; walk.mp4 12 -> 2 clips
    assert result.items == 5 and result.frames == 15
    assert [m.gt_fall for m, _ in frames] == [True, True, True, False, False]
    assert all(m.kind is ItemKind.CLIP and m.n_images == 3 and len(imgs) == 3 for m, imgs in frames)
    first = [read_index(jpeg_rgb(img)) for img in frames[0][1]]
    assert first == [0, 6, 12]  # sampled every 3rd source frame, clip stride 2
    assert [m.source for m, _ in frames] == ["fall"] * 3 + ["walk"] * 2


def test_replay_waits_for_the_edge_group_instead_of_losing_frames(settings, keys, r, tmp_path):
    write_yolo(tmp_path / "ds", "valid", [0] * 12)
    data = settings.model_dump(mode="python")
    data["redis"]["url"] = settings.redis.url.get_secret_value()
    data["ingest"]["stream_maxlen"] = 10  # the publisher keeps at most 5 undelivered
    cfg = Settings(**data)
    r.xgroup_create(keys.frames_stream(), keys.edge_group(), id="0", mkstream=True)
    stop = threading.Event()
    done = []
    t = threading.Thread(target=lambda: done.append(run_replay(
        cfg, dataset_source(tmp_path / "ds", "valid"), r, keys, stop, fps=1000, speed=0)), daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while r.xlen(keys.frames_stream()) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    assert r.xlen(keys.frames_stream()) == 5 and not done  # blocked: nobody read them
    read, deadline = 0, time.monotonic() + 30
    while read < 12 and time.monotonic() < deadline:  # the replay may end before its last frames are read
        got = r.xreadgroup(keys.edge_group(), "w", {keys.frames_stream(): ">"}, count=2, block=500)
        read += sum(len(entries) for _, entries in got)
    t.join(10)
    assert read == 12 and done[0].items == 12


@pytest.fixture
def restore_logging():
    """The CLI configures logging onto CliRunner's stream, which is closed afterwards: restore it."""
    import logging

    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:], root.level = handlers, level


def test_cli_replay_dataset(settings, keys, r, tmp_path, restore_logging):
    from fallwatch.cli import app
    from ingest.cli import register

    if "replay" not in {c.name for c in app.registered_commands}:
        register(app)
    write_yolo(tmp_path / "ds", "train", [0, 1, 1, 0])
    env = {"FALLWATCH_REDIS__URL": settings.redis.url.get_secret_value()}
    res = CliRunner().invoke(app, ["replay", "--dataset", str(tmp_path / "ds"), "--split", "train",
                                   "--fps", "100", "--limit", "3", "--camera-id", "bed2"], env=env)
    assert res.exit_code == 0, res.output
    assert "replayed 3 items" in res.output
    assert [(m.camera_id, m.gt_fall) for m, _ in frames_on_stream(r, keys)] == [("bed2", True), ("bed2", False), ("bed2", False)]
    bad = CliRunner().invoke(app, ["replay", "--fps", "2"], env=env)
    assert bad.exit_code == 2 and "either --dataset" in bad.output


def test_capture_loop_reconnects_with_one_status_per_change(settings, keys, r):
    """A live source that fails is reopened with backoff; states alternate, never repeat."""

    class FlakySource:
        name, live, fps = "flaky", True, 10.0

        def __init__(self):
            self.opens = 0

        def frames(self, sampler, stop):
            self.opens += 1
            if self.opens % 2 == 0:
                raise SourceError("flaky: connection refused")
            for i in range(3):
                if sampler.take(i / 10):
                    yield RawFrame(i / 10, index_frame(i))
            raise SourceError("flaky: connection reset")

    src = FlakySource()
    ing = settings.ingest.model_copy(update={"fps": 10.0, "reconnect_base_s": 0.05})
    status = StatusReporter(r, keys, "cam1", source="flaky")
    buf = FrameBuffer(100, BufferPolicy.DROP_OLDEST)
    halt = threading.Event()
    t = threading.Thread(target=capture_loop, args=(src, "cam1", ing, buf, status, halt), daemon=True)
    t.start()
    deadline = time.monotonic() + 30  # leaves as soon as it reopened 5 times
    while src.opens < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    halt.set()
    t.join(5)
    st = statuses(r, keys)
    assert [s.state for s in st[:4]] == [CameraState.ONLINE, CameraState.OFFLINE] * 2
    assert st[1].reason == st[3].reason == "flaky: connection reset"
    recs = list(iter(lambda: buf.get(0), None))
    assert [r.segment for r in recs[:6]] == [0, 0, 0, 2, 2, 2]  # a new segment after every reconnect
    assert [r.seq for r in recs[:6]] == list(range(6))


def test_cli_ingest_runs_cameras_and_stops_cleanly_on_sigterm(settings, keys, r, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    clip = write_mp4(tmp_path / "cam.mp4", 90, fps=18)
    config = tmp_path / "fallwatch.yaml"
    config.write_text(
        "cameras:\n"
        f"  - {{id: lobby, url: '{clip}', fps: 4}}\n"
        f"  - {{id: spare, url: '{clip}', enabled: false}}\n"
    )
    env = {**os.environ, "FALLWATCH_REDIS__URL": settings.redis.url.get_secret_value(),
           "FALLWATCH_LOGGING__FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-m", "fallwatch", "--config", str(config), "ingest"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while r.xlen(keys.frames_stream()) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    cams = {m.camera_id for m, _ in frames_on_stream(r, keys)}
    assert cams == {"lobby"}  # the disabled camera is not ingested
    last = statuses(r, keys)[-1]
    assert (last.camera_id, last.state, last.reason) == ("lobby", CameraState.OFFLINE, "ingest stopped")
    assert '"event": "camera_online"' in err


def test_http_source_streams_a_video_over_http(tmp_path):
    import functools
    import http.server

    write_mp4(tmp_path / "a.mp4", 36, fps=18)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        src = AvSource(f"http://127.0.0.1:{server.server_address[1]}/a.mp4", read_timeout_s=5)
        got = []
        with pytest.raises(SourceError, match="ended the stream"):  # a network source that ends is an outage
            for frame in src.frames(FpsSampler(2), threading.Event()):
                got.append(read_index(frame.rgb))
    finally:
        server.shutdown()
        server.server_close()
    assert got == [0, 9, 18, 27] and src.live


def test_bad_webcam_url_is_an_offline_camera(settings, keys, r):
    cfg = with_camera(settings, "webcam:front")
    run_camera(cfg, cfg.cameras[0], r, keys, threading.Event())
    st = statuses(r, keys)
    assert [s.state for s in st] == [CameraState.OFFLINE]
    assert "webcam URL must be webcam:N" in st[0].reason

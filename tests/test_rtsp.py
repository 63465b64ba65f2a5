"""Ingest against a real RTSP server (GStreamer): frames arrive, a killed server means offline,
a restarted one is reconnected to on its own. Needs ``scripts/install-rtsp.sh``."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fallwatch.schemas import CameraState, CameraStatus, FrameMessage, decode
from fallwatch.settings import Settings
from ingest.camera import run_camera
from tests.helpers import free_port, wait_for

pytestmark = [pytest.mark.rtsp, pytest.mark.slow]

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER = Path(__file__).with_name("rtsp_server.py")


def _gst_rtsp_available() -> bool:
    probe = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
    try:
        return subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if not _gst_rtsp_available():
    pytest.skip("GStreamer's RTSP server is not installed (run scripts/install-rtsp.sh)", allow_module_level=True)


class RtspServer:
    def __init__(self, port: int, *extra: str):
        self.port = port
        self.args = [SYSTEM_PYTHON, str(SERVER), "--port", str(port), *extra]
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout_s: float = 20) -> "RtspServer":
        deadline = time.monotonic() + timeout_s
        while True:  # the port may linger briefly after a kill
            self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            line = self.proc.stdout.readline()
            if line.startswith("READY"):
                return self
            self.proc.wait(5)
            if time.monotonic() > deadline:
                raise RuntimeError(f"RTSP server did not start: {line} {self.proc.stderr.read()}")
            time.sleep(0.2)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


class Camera:
    """One ingest camera thread on ``url`` with fast timeouts, and what it has written so far."""

    def __init__(self, settings: Settings, r, keys, cam_id: str, url: str, read_timeout_s: float,
                 open_timeout_s: float):
        data = settings.model_dump(mode="python")
        data["redis"]["url"] = settings.redis.url.get_secret_value()
        data["ingest"].update(fps=4.0, read_timeout_s=read_timeout_s, open_timeout_s=open_timeout_s,
                              reconnect_base_s=0.2, reconnect_cap_s=1.0)
        data["cameras"] = [{"id": cam_id, "url": url}]
        cfg = Settings(**data)
        self.r, self.keys, self.stop = r, keys, threading.Event()
        self.thread = threading.Thread(target=run_camera, args=(cfg, cfg.cameras[0], r, keys, self.stop), daemon=True)

    def states(self) -> list[CameraStatus]:
        return [decode(f, CameraStatus)[0] for _, f in self.r.xrange(self.keys.camera_status_stream())]

    def frame_count(self) -> int:
        return self.r.xlen(self.keys.frames_stream())

    def close(self) -> None:
        self.stop.set()
        self.thread.join(15)


def test_rtsp_camera_goes_offline_and_reconnects(settings, keys, r):
    port = free_port()
    server = RtspServer(port, "--user", "viewer", "--password", "Pw-4-rtsp").start()
    cam = Camera(settings, r, keys, "door", f"rtsp://viewer:Pw-4-rtsp@127.0.0.1:{port}/stream", 2.0, 5.0)
    states, frame_count = cam.states, cam.frame_count
    try:
        cam.thread.start()
        assert wait_for(lambda: frame_count() >= 3, 20), "frames from the RTSP camera"
        msg, images = decode(r.xrange(keys.frames_stream(), count=1)[0][1], FrameMessage)
        assert (msg.camera_id, msg.width, msg.height) == ("door", 320, 240) and images[0][:2] == b"\xff\xd8"
        assert msg.source == f"rtsp://127.0.0.1:{port}/stream"
        assert states()[0].state is CameraState.ONLINE and states()[0].fps == pytest.approx(18, abs=1)

        server.kill()
        assert wait_for(lambda: states()[-1].state is CameraState.OFFLINE, 15), "the offline status"
        offline = states()[-1]
        assert offline.reason == f"rtsp://127.0.0.1:{port}/stream ended the stream (server closed or restarted)"
        before = frame_count()

        server.start()
        assert wait_for(lambda: states()[-1].state is CameraState.ONLINE, 20), "the camera to come back online"
        assert wait_for(lambda: frame_count() >= before + 3, 20), "frames after the reconnect"
        assert [s.state for s in states()] == [CameraState.ONLINE, CameraState.OFFLINE, CameraState.ONLINE]
        ids = [decode(f, FrameMessage)[0].frame_id for _, f in r.xrange(keys.frames_stream())]
        assert len(ids) == len(set(ids))
    finally:
        cam.close()
        server.kill()
    assert not cam.thread.is_alive()
    assert states()[-1].state is CameraState.OFFLINE and states()[-1].reason == "ingest stopped"


def test_stalled_rtsp_stream_is_offline_and_recovers(settings, keys, r):
    port = free_port()
    server = RtspServer(port).start()
    cam = Camera(settings, r, keys, "hall", f"rtsp://127.0.0.1:{port}/stream", 1.5, 3.0)
    states = cam.states
    try:
        cam.thread.start()
        assert wait_for(lambda: r.xlen(keys.frames_stream()) >= 2, 20), "frames"
        server.proc.send_signal(signal.SIGSTOP)  # the server hangs: TCP stays open, no data
        assert wait_for(lambda: states()[-1].state is CameraState.OFFLINE, 20), "the stalled camera to go offline"
        reason = states()[-1].reason
        server.proc.send_signal(signal.SIGCONT)
        before = r.xlen(keys.frames_stream())
        assert wait_for(lambda: states()[-1].state is CameraState.ONLINE, 20), "recovery after the stall"
        assert wait_for(lambda: r.xlen(keys.frames_stream()) > before, 10), "frames after the stall"
    finally:
        cam.close()
        if server.proc:
            server.proc.send_signal(signal.SIGCONT)
        server.kill()
    assert reason == f"rtsp://127.0.0.1:{port}/stream stalled: no frame for 1.5s"

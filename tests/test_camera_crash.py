"""A camera thread that crashes is reported offline (an alert) and restarted with backoff."""

from __future__ import annotations

import threading

import ingest.camera as camera
from alerts.service import AlertsService
from fallwatch.schemas import CameraState, CameraStatus, EventKind, EventType, decode
from fallwatch.settings import Settings
from ingest_media import write_mp4
from tests.helpers import wait_for


def statuses(r, keys) -> list[CameraStatus]:
    return [decode(fields, CameraStatus)[0] for _, fields in r.xrange(keys.camera_status_stream())]


def test_a_crashed_camera_goes_offline_raises_an_alert_and_is_restarted(settings, r, keys, tmp_path,
                                                                       monkeypatch) -> None:
    path = write_mp4(tmp_path / "cam.mp4", 36, fps=18)
    data = settings.model_dump(mode="python")
    data["redis"]["url"] = settings.redis.url.get_secret_value()
    data["ingest"].update(reconnect_base_s=0.2, reconnect_cap_s=1.0)
    data["alerts"]["offline_grace_s"] = 0  # the offline event at once (no grace period)
    cfg = Settings(**{**data, "cameras": [{"id": "cam1", "name": "Hall", "url": str(path), "fps": 4}]})
    real, calls = camera.run_pipeline, []

    def crash_once(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("decoder bug")
        return real(*args, **kw)

    monkeypatch.setattr(camera, "run_pipeline", crash_once)
    stop = threading.Event()
    thread = threading.Thread(target=camera.run_cameras, args=(cfg, cfg.cameras, r, keys, stop), daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: r.xlen(keys.frames_stream()) >= 1, 20), "the camera was not restarted"
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive() and len(calls) == 2
    st = statuses(r, keys)
    crashed = st[0]
    assert crashed.state is CameraState.OFFLINE and not crashed.expected
    assert "camera crashed: RuntimeError: decoder bug" in crashed.reason
    assert CameraState.ONLINE in [s.state for s in st[1:]]  # back after the restart

    events = AlertsService(cfg, r, keys, name="alerts").step().events
    assert (events[0].type, events[0].kind, events[0].camera_id) == (EventType.START, EventKind.CAMERA_OFFLINE, "cam1")
    assert "decoder bug" in (events[0].description or "")

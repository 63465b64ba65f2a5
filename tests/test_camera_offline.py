"""A camera blip pages nobody: a camera counts as offline for notifications only after
alerts.offline_grace_s; when an offline camera is back, caregivers are told."""

from __future__ import annotations

from alerts.events import CameraAlertState, on_status, on_tick
from alerts.notify import Delivery, Notifier
from alerts.service import AlertsService
from fallwatch.schemas import CameraState, CameraStatus, EventKind, EventType, decode
from fallwatch.settings import AlertsSettings, Settings
from tests.helpers import FakeClock, plant
from tests.test_notify import hook  # noqa: F401 - a fixture

T0 = 1_700_000_000.0
CFG = AlertsSettings(offline_grace_s=10)


def status(state: CameraState, at: float, reason: str = "") -> CameraStatus:
    return CameraStatus(camera_id="cam1", state=state, at=at, reason=reason)


def test_drops_shorter_than_the_grace_period_raise_nothing() -> None:
    state, steps = CameraAlertState(), []
    for blip in range(5):  # 1.5 s down every 8 s, for 40 s
        t = T0 + 8 * blip
        state, down = on_status(state, status(CameraState.OFFLINE, t), 10)
        state, tick = on_tick(state, t + 1.4, CFG)
        state, up = on_status(state, status(CameraState.ONLINE, t + 1.5), 10)
        steps += down + tick + up
    assert steps == [] and not state.active


def test_a_camera_offline_past_the_grace_period_starts_then_ends_an_event() -> None:
    state, steps = on_status(CameraAlertState(), status(CameraState.OFFLINE, T0, "rtsp timeout"), 10)
    assert steps == [] and state.active                          # visited by the timer
    assert on_tick(state, T0 + 9.9, CFG)[1] == []
    state, [start] = on_tick(state, T0 + 10, CFG)
    assert (start.type, start.kind, start.at, start.description) == (EventType.START, EventKind.CAMERA_OFFLINE,
                                                                     T0, "rtsp timeout")
    assert on_tick(state, T0 + 30, CFG)[1] == []                 # once
    state, [end] = on_status(state, status(CameraState.ONLINE, T0 + 40), 10)
    assert (end.type, end.event_id) == (EventType.END, start.event_id) and not state.active


def test_caregivers_hear_offline_once_and_back_online(redis_url, r, keys, hook) -> None:  # noqa: F811
    settings = Settings(redis={"url": redis_url}, alerts={"offline_grace_s": 10},
                        notifications={"urls": [f"json://127.0.0.1:{hook.port}/hook"], "cooldown_s": 3600},
                        cameras=[{"id": "cam1", "name": "Hall", "url": "rtsp://cam.local/1"}])
    clock = FakeClock(T0)
    svc = AlertsService(settings, r, keys, name="a", clock=clock)
    for blip in range(5):
        plant(r, keys.camera_status_stream(), status(CameraState.OFFLINE, T0 + 8 * blip))
        clock.t = T0 + 8 * blip + 1.5
        svc.step()
        plant(r, keys.camera_status_stream(), status(CameraState.ONLINE, clock.t))
        svc.step()
    assert r.xlen(keys.notify_outbox_stream()) == 0 and r.xlen(keys.alerts_stream()) == 0
    plant(r, keys.camera_status_stream(), status(CameraState.OFFLINE, T0 + 50, "rtsp timeout"))
    svc.step()
    clock.t = T0 + 61
    [start] = svc.step().events
    plant(r, keys.camera_status_stream(), status(CameraState.ONLINE, T0 + 90))
    [end] = svc.step().events
    assert (start.type, end.type, start.event_id) == (EventType.START, EventType.END, end.event_id)
    notes = [decode(f, expect=Delivery)[0] for f in read_all_raw(r, keys.notify_outbox_stream())]
    assert [n.title for n in notes] == ["Camera offline: Hall", "Camera back online: Hall"]
    assert "after 40 s offline" in notes[1].body
    notifier = Notifier(settings, r, keys, "n1")
    assert notifier.step().delivered == 2                         # the channel's cooldown does not hide it
    assert [m["title"] for m in hook.received] == ["Camera offline: Hall", "Camera back online: Hall"]


def read_all_raw(r, stream: str) -> list[dict]:
    return [fields for _, fields in r.xrange(stream)]



"""Alert events: debounce, updates, latching (no longer seen, resolve), cooldown, ordering, camera
offline, acknowledgement."""

from __future__ import annotations

import time

import pytest
import redis
import typer
from typer.testing import CliRunner

from alerts.cli import register
from alerts.events import CameraAlertState, on_final, on_resolve, on_status, on_tick
from alerts.service import AlertsService
from alerts.store import EventNotFound, acknowledge, load_event, resolve
from tests.helpers import FakeClock, edge_verdict, plant, read_all
from fallwatch.keys import Keys
from fallwatch.schemas import (AlertEvent, CameraState, CameraStatus, Decider, EventKind, EventType,
                               FinalVerdict)
from fallwatch.settings import AlertsSettings, Settings

T0 = 1_700_000_000.0
CFG = AlertsSettings(debounce_k=2, debounce_n=3, quiet_s=10, cooldown_s=20, cloud_timeout_s=5)


def final(i: int, at: float, fall: bool, p: float | None = None, cam: str = "cam1") -> FinalVerdict:
    return FinalVerdict(frame_id=f"{cam}:{i}", camera_id=cam, captured_at=at, is_fall=fall,
                        p_fall=p if p is not None else (0.9 if fall else 0.1), decided_by=Decider.EDGE,
                        latency_ms=50)


def feed(seq: list[tuple[float, bool]], state: CameraAlertState | None = None, cfg: AlertsSettings = CFG):
    """Apply (offset, fall) verdicts in the given (arrival) order; return the state and all steps."""
    state = state or CameraAlertState()
    steps = []
    for dt, fall in seq:
        state, new = on_final(state, final(int(dt * 10), T0 + dt, fall), cfg)
        steps += new
    return state, steps


def types(steps) -> list[str]:
    return [s.type.value for s in steps]


# --- the state machine ------------------------------------------------------------------------


def test_k_falls_within_n_start_an_event_and_single_falls_do_not() -> None:
    _, steps = feed([(0, True), (1, False), (2, False), (3, True)])
    assert steps == []  # two falls, but never within 3 consecutive verdicts
    _, steps = feed([(0, True), (1, False), (2, True)])
    assert types(steps) == ["start"]
    assert steps[0].frame_ids == ("cam1:0", "cam1:20") and steps[0].at == T0


def test_further_falls_update_quiet_marks_unseen_and_resolve_starts_the_cooldown() -> None:
    state, steps = feed([(0, True), (1, True), (2, True), (3, False), (12.5, False)])
    assert types(steps) == ["start", "update", "update"]
    start, update, unseen = steps
    assert start.event_id == update.event_id == unseen.event_id
    assert update.frame_ids == ("cam1:20",) and update.seen is True
    assert unseen.seen is False and unseen.seen_until == T0 + 2  # the last fall the models saw
    assert unseen.at == pytest.approx(T0 + 2 + 10)  # noticed at last fall + quiet_s
    assert state.fall_event == start.event_id and state.fall_unseen  # latched: still open
    assert feed([(14, False), (30, False)], state)[1] == []  # said once, not on every quiet verdict
    # a person resolves it: falls within the cooldown start nothing; after it, a new event
    state = on_resolve(state, start.event_id, T0 + 12, CFG.cooldown_s)
    assert state.fall_event is None and state.cooldown_until == pytest.approx(T0 + 12 + 20)
    state, steps = feed([(20, True), (21, True), (22, True)], state)
    assert steps == []
    state, steps = feed([(33, True), (34, True)], state)
    assert types(steps) == ["start"] and steps[0].event_id != start.event_id


def test_timer_marks_a_quiet_event_unseen_by_the_wall_clock_and_a_new_fall_seen_again() -> None:
    state, _ = feed([(0, True), (1, True)])
    assert on_tick(state, T0 + 10.5, CFG)[1] == []
    state, steps = on_tick(state, T0 + 11.5, CFG)
    assert types(steps) == ["update"] and steps[0].seen is False and state.fall_event is not None
    assert on_tick(state, T0 + 500, CFG)[1] == []  # the camera may go dark: the event stays open
    state, steps = feed([(40, True)], state)
    assert types(steps) == ["update"] and steps[0].seen is True and not state.fall_unseen


def test_late_verdicts_are_placed_by_capture_time() -> None:
    # arrival order F(0) N(2) N(3) F(1): by capture time F F N sits in one window of 3
    _, steps = feed([(0, True), (2, False), (3, False), (1, True)])
    assert types(steps) == ["start"] and steps[0].at == T0
    # a straggler captured before a resolved event was resolved starts nothing, even without cooldown
    cfg = CFG.model_copy(update={"cooldown_s": 0.0})
    state, steps = feed([(0, True), (1, True), (15, False)], cfg=cfg)
    assert types(steps) == ["start", "update"]
    state = on_resolve(state, steps[0].event_id, T0 + 15, 0.0)
    state, steps = feed([(5, True), (6, True)], state, cfg=cfg)
    assert steps == []


def test_redelivered_verdict_changes_nothing() -> None:
    state, _ = feed([(0, True)])
    again, steps = on_final(state, final(0, T0, True), CFG)
    assert steps == [] and again == state


def test_camera_offline_and_online() -> None:
    off = CameraStatus(camera_id="cam1", state=CameraState.OFFLINE, reason="no frames for 5s", at=T0)
    on = CameraStatus(camera_id="cam1", state=CameraState.ONLINE, at=T0 + 30)
    state, steps = on_status(CameraAlertState(), off)
    assert types(steps) == ["start"] and steps[0].kind is EventKind.CAMERA_OFFLINE
    assert on_status(state, off) == (state, [])
    state, end = on_status(state, on)
    assert types(end) == ["end"] and end[0].event_id == steps[0].event_id and not state.active


# --- through Redis --------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def cfg(redis_url: str, r: redis.Redis) -> Settings:
    return Settings(redis={"url": redis_url}, alerts={**CFG.model_dump(), "offline_grace_s": 0},
                    cameras=[{"id": "cam1", "name": "Room 12", "url": "rtsp://cam.local/1"}])


def alert_events(r: redis.Redis, keys: Keys) -> list[AlertEvent]:
    return [m for m in read_all(r, keys.alerts_stream()) if isinstance(m, AlertEvent)]


def published(sub: redis.client.PubSub, wait_s: float = 20.0) -> list[AlertEvent]:
    """Events received on the channel (the first call also consumes the subscribe reply)."""
    out: list[AlertEvent] = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        msg = sub.get_message(timeout=0.05)
        if msg is not None:
            out.append(AlertEvent.from_json(msg["data"]))
        elif out:
            break
    return out


def test_events_are_streamed_published_and_stored(cfg, r, keys, clock) -> None:
    svc = AlertsService(cfg, r, keys, name="a", clock=clock)
    sub = r.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(keys.alerts_channel())
    plant(r, keys.verdicts_stream(), *(edge_verdict(f"cam1:{i}", T0 + i, p) for i, p in enumerate([0.8, 0.3, 0.95])))
    rep = svc.step()
    assert [e.type for e in rep.events] == [EventType.START]
    [ev] = alert_events(r, keys)
    assert (ev.camera_name, ev.confidence, ev.frame_ids) == ("Room 12", 0.95, ["cam1:0", "cam1:2"])
    assert published(sub) == [ev]
    state = r.hgetall(keys.event(ev.event_id))
    assert state[b"active"] == b"1" and state[b"acknowledged"] == b"0"
    assert r.smembers(keys.alert_cameras()) == {b"cam1"}
    # quiet for longer than quiet_s: the event says so and stays open
    clock.advance(2 + 10.5)
    [unseen] = svc.step().events
    assert (unseen.type, unseen.still_seen, unseen.seen_until) == (EventType.UPDATE, False, T0 + 2)
    assert r.hget(keys.event(ev.event_id), "active") == b"1"
    assert r.smembers(keys.alert_cameras()) == {b"cam1"}
    clock.advance(3600)
    assert svc.step().events == ()  # an hour later, nobody came: still open
    # only a person ends it
    end = resolve(r, keys, ev.event_id, "nurse-ann", "confirmed_fall", maxlen=1000, clock=clock)
    assert end.type is EventType.END and r.hget(keys.event(ev.event_id), "active") == b"0"
    assert r.smembers(keys.alert_cameras()) == set()
    assert published(sub)[-1] == end
    sub.close()


def test_camera_offline_event_from_the_status_stream(cfg, r, keys, clock) -> None:
    svc = AlertsService(cfg, r, keys, name="a", clock=clock)
    plant(r, keys.camera_status_stream(),
          CameraStatus(camera_id="cam1", state=CameraState.OFFLINE, reason="rtsp timeout", at=T0),
          CameraStatus(camera_id="cam1", state=CameraState.OFFLINE, reason="rtsp timeout", at=T0 + 5))
    svc.step()
    plant(r, keys.camera_status_stream(), CameraStatus(camera_id="cam1", state=CameraState.ONLINE, at=T0 + 9))
    svc.step()
    events = alert_events(r, keys)
    assert [(e.type, e.kind) for e in events] == [(EventType.START, EventKind.CAMERA_OFFLINE),
                                                  (EventType.END, EventKind.CAMERA_OFFLINE)]
    assert events[0].description == "rtsp timeout" and events[0].event_id == events[1].event_id


def test_ack_becomes_part_of_the_event_state(cfg, r, keys, clock) -> None:
    svc = AlertsService(cfg, r, keys, name="a", clock=clock)
    plant(r, keys.verdicts_stream(), edge_verdict("cam1:0", T0, 0.9), edge_verdict("cam1:1", T0 + 1, 0.9))
    [start] = svc.step().events
    sub = r.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(keys.alerts_channel())
    ev = acknowledge(r, keys, start.event_id, "nurse-ann", maxlen=1000)
    assert (ev.type, ev.acknowledged, ev.acknowledged_by) == (EventType.UPDATE, True, "nurse-ann")
    assert published(sub) == [ev]
    sub.close()
    stored = r.hgetall(keys.event(start.event_id))
    assert stored[b"acknowledged"] == b"1" and stored[b"acknowledged_by"] == b"nurse-ann"
    assert alert_events(r, keys)[-1] == ev
    # a further fall updates the event and keeps the acknowledgement
    plant(r, keys.verdicts_stream(), edge_verdict("cam1:2", T0 + 2, 0.7))
    [update] = svc.step().events
    assert update.type is EventType.UPDATE and update.acknowledged and update.frame_ids[-1] == "cam1:2"
    assert load_event(r, keys, start.event_id).acknowledged_by == "nurse-ann"
    with pytest.raises(EventNotFound):
        acknowledge(r, keys, "nope", "x", maxlen=1000)


def test_ack_command(cfg, redis_url, r, keys, clock) -> None:
    plant(r, keys.camera_status_stream(), CameraStatus(camera_id="cam1", state=CameraState.OFFLINE, at=T0))
    [ev] = AlertsService(cfg, r, keys, name="a", clock=clock).step().events
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    env = {"FALLWATCH_REDIS__URL": redis_url}
    result = CliRunner().invoke(app, ["alerts", "ack", ev.event_id, "--by", "night shift"], env=env)
    assert result.exit_code == 0, result.output
    assert "acknowledged by night shift" in result.output
    assert load_event(r, keys, ev.event_id).acknowledged
    missing = CliRunner().invoke(app, ["alerts", "ack", "no-such-event"], env=env)
    assert missing.exit_code == 2


def test_history_is_bounded_in_time_and_count() -> None:
    state, _ = feed([(i * 0.5, False) for i in range(100)])  # 50 s of verdicts, horizon 15 s
    assert len(state.history) == 31 and state.history[0].at == T0 + 34.5
    cfg, state = CFG.model_copy(update={"quiet_s": 3600.0}), CameraAlertState()
    for i in range(600):
        state, _ = on_final(state, final(i, T0 + i * 0.01, False), cfg)
    assert len(state.history) == 256 and state.history[0].frame_id == "cam1:344"


def test_a_planned_stop_raises_no_offline_alert() -> None:
    from alerts.events import CameraAlertState, on_status
    from fallwatch.schemas import CameraState, CameraStatus

    state = CameraAlertState()
    planned = CameraStatus(camera_id="c", state=CameraState.OFFLINE, reason="replay finished", expected=True)
    assert on_status(state, planned)[1] == []
    failed = CameraStatus(camera_id="c", state=CameraState.OFFLINE, reason="read timeout")
    assert [s.kind.value for s in on_status(state, failed)[1]] == ["camera_offline"]

"""Alert events in Redis: per-camera state transitions, event records, the alerts stream and
channel, the notification outbox, and acknowledgements.

A camera's transition is one optimistic transaction (WATCH the camera state and the events it
touches, then MULTI/EXEC): the new state, the event records, the XADDs to the alerts stream and
the outbox and the PUBLISH all happen together or not at all, so two alerts processes, or an ack
arriving meanwhile, never interleave half-written steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
import structlog

from alerts.events import EVENT_FRAMES_MAX, CameraAlertState, Step, Transition, on_final, on_status, on_tick
from alerts.notify import deliveries_for
from fallwatch.keys import Keys
from fallwatch.schemas import AlertEvent, CameraStatus, EventType, FinalVerdict, encode
from fallwatch.settings import Settings

log = structlog.get_logger(__name__)

EVENT_TTL_S = 30 * 86400


class EventNotFound(KeyError):
    """No event with this id (never existed, or expired)."""


def camera_name(settings: Settings, camera_id: str) -> str:
    try:
        return settings.camera(camera_id).display_name
    except KeyError:
        return camera_id


def _flag(value: bool) -> str:
    return "1" if value else "0"


def load_event(client: Any, keys: Keys, event_id: str) -> AlertEvent | None:
    raw = client.hget(keys.event(event_id), "m")
    return AlertEvent.from_json(raw) if raw is not None else None


def write_event(pipe: Any, keys: Keys, event: AlertEvent, active: bool, maxlen: int) -> None:
    """Queue the event's record, its alerts-stream entry and its publication on ``pipe``."""
    key = keys.event(event.event_id)
    pipe.hset(key, mapping={
        "m": event.to_json(), "type": event.type.value, "kind": event.kind.value,
        "camera_id": event.camera_id, "started_at": repr(event.started_at), "at": repr(event.at),
        "acknowledged": _flag(event.acknowledged), "acknowledged_by": event.acknowledged_by or "",
        "active": _flag(active),
    })
    pipe.expire(key, EVENT_TTL_S)
    pipe.xadd(keys.alerts_stream(), encode(event), maxlen=maxlen, approximate=True)
    pipe.publish(keys.alerts_channel(), event.to_json())


def _merged_confidence(current: AlertEvent, step: Step) -> tuple[float | None, Any]:
    if step.confidence is None or (current.confidence is not None and current.confidence >= step.confidence):
        return current.confidence, current.decided_by
    return step.confidence, step.decided_by


def build_event(step: Step, current: AlertEvent | None, camera_id: str, name: str) -> AlertEvent:
    """The AlertEvent for a lifecycle step, carrying over the event's state (ack, frames)."""
    if step.type is EventType.START or current is None:
        return AlertEvent(
            event_id=step.event_id, type=step.type, kind=step.kind, camera_id=camera_id, camera_name=name,
            started_at=step.at, at=step.at, confidence=step.confidence, decided_by=step.decided_by,
            frame_ids=list(step.frame_ids)[-EVENT_FRAMES_MAX:], description=step.description,
        )
    confidence, decided_by = _merged_confidence(current, step)
    frames = current.frame_ids + [f for f in step.frame_ids if f not in current.frame_ids]
    return AlertEvent.model_validate({
        **current.model_dump(), "type": step.type, "at": step.at, "confidence": confidence,
        "decided_by": decided_by, "frame_ids": frames[-EVENT_FRAMES_MAX:],
        "description": step.description or current.description,
    })


class EventStore:
    """Applies final verdicts, camera status changes and the quiet timer to camera states."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings,
                 clock: Callable[[], float] = time.time):
        self.client, self.keys, self.settings, self.clock = client, keys, settings, clock
        self.cfg = settings.alerts

    def apply_final(self, verdict: FinalVerdict) -> list[AlertEvent]:
        return self.transact(verdict.camera_id, lambda s: on_final(s, verdict, self.cfg))

    def apply_status(self, status: CameraStatus) -> list[AlertEvent]:
        return self.transact(status.camera_id, lambda s: on_status(s, status, self.cfg.offline_grace_s))

    def tick(self) -> list[AlertEvent]:
        """End fall events that have been quiet long enough, on every camera with an active event."""
        now = self.clock()
        events: list[AlertEvent] = []
        for raw in self.client.smembers(self.keys.alert_cameras()):
            events += self.transact(raw.decode(), lambda s: on_tick(s, now, self.cfg))
        return events

    def state(self, camera_id: str) -> CameraAlertState:
        return self._load_state(self.client, camera_id)

    def _load_state(self, client: Any, camera_id: str) -> CameraAlertState:
        raw = client.hget(self.keys.camera_state(camera_id), "state")
        return CameraAlertState.model_validate_json(raw) if raw is not None else CameraAlertState()

    def transact(self, camera_id: str, fn: Callable[[CameraAlertState], Transition]) -> list[AlertEvent]:
        """Run one transition of a camera atomically; retried when a watched key changes."""
        key = self.keys.camera_state(camera_id)
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    before = self._load_state(pipe, camera_id)
                    after, steps = fn(before)
                    if after == before and not steps:
                        pipe.unwatch()
                        return []
                    events = self._events_for(pipe, camera_id, steps)
                    pipe.multi()
                    self._queue_writes(pipe, camera_id, after, events)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        for ev in events:
            log.info("alert_event", event_id=ev.event_id, type=ev.type.value, kind=ev.kind.value,
                     camera=camera_id, confidence=ev.confidence)
        return events

    def _events_for(self, pipe: Any, camera_id: str, steps: list[Step]) -> list[AlertEvent]:
        name = camera_name(self.settings, camera_id)
        events: list[AlertEvent] = []
        for step in steps:
            current = None
            if step.type is not EventType.START:
                pipe.watch(self.keys.event(step.event_id))
                current = load_event(pipe, self.keys, step.event_id)
            events.append(build_event(step, current, camera_id, name))
        return events

    def _queue_writes(self, pipe: Any, camera_id: str, state: CameraAlertState, events: list[AlertEvent]) -> None:
        pipe.hset(self.keys.camera_state(camera_id), mapping={"state": state.model_dump_json(), "camera_id": camera_id})
        for ev in events:
            write_event(pipe, self.keys, ev, active=ev.type is not EventType.END, maxlen=self.cfg.stream_maxlen)
            for delivery in deliveries_for(ev, self.settings):
                pipe.xadd(self.keys.notify_outbox_stream(), delivery.to_fields())
        if state.active:
            pipe.sadd(self.keys.alert_cameras(), camera_id)
        else:
            pipe.srem(self.keys.alert_cameras(), camera_id)


def acknowledge(client: redis.Redis, keys: Keys, event_id: str, by: str, maxlen: int,
                clock: Callable[[], float] = time.time) -> AlertEvent:
    """Mark an event acknowledged and publish an ``update``. Idempotent; raises EventNotFound."""
    key = keys.event(event_id)
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(key)
                current = load_event(pipe, keys, event_id)
                if current is None:
                    raise EventNotFound(event_id)
                if current.acknowledged:
                    pipe.unwatch()
                    return current
                active = pipe.hget(key, "active") == b"1"
                event = AlertEvent.model_validate({**current.model_dump(), "type": EventType.UPDATE,
                                                   "at": clock(), "acknowledged": True, "acknowledged_by": by})
                pipe.multi()
                write_event(pipe, keys, event, active=active, maxlen=maxlen)
                pipe.execute()
                break
            except redis.WatchError:
                continue
    log.info("alert_acknowledged", event_id=event_id, by=by)
    return event

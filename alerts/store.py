"""Alert events in Redis: per-camera state transitions, event records, the alerts stream and
channel, the notification outbox, acknowledgements and resolutions (a person closing an event
with an outcome: the only way a fall event ends). Escalation tiers are in ``alerts.escalation``.

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

from alerts.escalation import Escalator, queue_start, start_tier
from alerts.notify import deliveries_for
from alerts.events import (EVENT_FRAMES_MAX, CameraAlertState, EventStep, Transition, on_final, on_resolve,
                           on_status, on_tick)
from fallwatch.defaults import EVENT_TTL_S
from fallwatch.keys import Keys, text
from fallwatch.redis import wait_replica
from fallwatch.schemas import (AlertEvent, CameraStatus, EventKind, EventOutcome, EventRecord, EventType, FinalVerdict,
                               OutcomeRecord, encode)
from fallwatch.settings import Settings


log = structlog.get_logger(__name__)


class EventNotFound(KeyError):
    """No event with this id (never existed, or expired)."""


class BadTransition(ValueError):
    """The event is not in a state that allows this step (e.g. resolving a resolved event)."""


ACK_SOURCES = ("cli", "web", "mqtt")
OUTCOMES_MAXLEN = 10_000_000  # ground truth: effectively never trimmed


def _check_source(source: str) -> None:
    if source not in ACK_SOURCES:
        raise ValueError(f"unknown source {source!r}; one of {ACK_SOURCES}")


def camera_name(settings: Settings, camera_id: str) -> str:
    try:
        return settings.camera(camera_id).display_name
    except KeyError:
        return camera_id


def load_event(client: Any, keys: Keys, event_id: str) -> AlertEvent | None:
    raw = client.hgetall(keys.event(event_id))
    return EventRecord.from_hash(raw).event() if raw else None


def write_event(pipe: Any, keys: Keys, event: AlertEvent, active: bool, maxlen: int) -> None:
    """Queue the event's record, its alerts-stream entry and its publication on ``pipe``."""
    key = keys.event(event.event_id)
    pipe.hset(key, mapping=EventRecord.of(event, active).to_hash())
    pipe.expire(key, EVENT_TTL_S)
    pipe.zadd(keys.events_index(), {event.event_id: event.started_at})
    pipe.zremrangebyscore(keys.events_index(), "-inf", event.started_at - EVENT_TTL_S)
    pipe.xadd(keys.alerts_stream(), encode(event), maxlen=maxlen, approximate=True)
    pipe.publish(keys.alerts_channel(), event.to_json())


def _merged_confidence(current: AlertEvent, step: EventStep) -> tuple[float | None, Any]:
    if step.confidence is None or (current.confidence is not None and current.confidence >= step.confidence):
        return current.confidence, current.decided_by
    return step.confidence, step.decided_by


def _seen(step: EventStep, current: AlertEvent | None) -> dict[str, Any]:
    """still_seen / seen_until of a fall event after ``step``."""
    if step.kind is not EventKind.FALL:
        return {}
    if step.type is EventType.START or step.seen:
        return {"still_seen": True, "seen_until": None}
    if step.seen is False:
        return {"still_seen": False, "seen_until": step.seen_until}
    return {} if current is None else {"still_seen": current.still_seen, "seen_until": current.seen_until}


def build_event(step: EventStep, current: AlertEvent | None, camera_id: str, name: str) -> AlertEvent:
    """The AlertEvent for a lifecycle step, carrying over the event's state (ack, frames)."""
    if step.type is EventType.START or current is None:
        return AlertEvent(
            event_id=step.event_id, type=step.type, kind=step.kind, camera_id=camera_id, camera_name=name,
            started_at=step.at, at=step.at, confidence=step.confidence, decided_by=step.decided_by,
            frame_ids=list(step.frame_ids)[-EVENT_FRAMES_MAX:], description=step.description, **_seen(step, None),
        )
    confidence, decided_by = _merged_confidence(current, step)
    frames = current.frame_ids + [f for f in step.frame_ids if f not in current.frame_ids]
    return AlertEvent.model_validate({
        **current.model_dump(), "type": step.type, "at": step.at, "confidence": confidence,
        "decided_by": decided_by, "frame_ids": frames[-EVENT_FRAMES_MAX:],
        "description": step.description or current.description, **_seen(step, current),
    })


class EventStore:
    """Applies final verdicts, camera status changes and the quiet timer to camera states."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings,
                 clock: Callable[[], float] = time.time):
        self.client, self.keys, self.settings, self.clock = client, keys, settings, clock
        self.cfg = settings.alerts
        self.escalator = Escalator(client, keys, settings, clock)

    def apply_final(self, verdict: FinalVerdict) -> list[AlertEvent]:
        return self.transact(verdict.camera_id, lambda s: on_final(s, verdict, self.cfg))

    def apply_status(self, status: CameraStatus) -> list[AlertEvent]:
        return self.transact(status.camera_id, lambda s: on_status(s, status, self.cfg.offline_grace_s))

    def tick(self) -> list[AlertEvent]:
        """Mark fall events quiet long enough as no longer seen (every camera with an active event),
        then fire the escalation tiers that are due."""
        now = self.clock()
        events: list[AlertEvent] = []
        for raw in self.client.smembers(self.keys.alert_cameras()):
            events += self.transact(text(raw), lambda s: on_tick(s, now, self.cfg))
        return events + self.escalator.fire_due()

    def _load_state(self, client: Any, camera_id: str) -> CameraAlertState:
        return load_state(client, self.keys, camera_id)

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
        wait_replica(self.client, self.keys.replica_barrier())  # events and the outbox survive a failover
        for ev in events:
            log.info("alert_event", event_id=ev.event_id, type=ev.type.value, kind=ev.kind.value,
                     camera=camera_id, confidence=ev.confidence)
        return events

    def _events_for(self, pipe: Any, camera_id: str, steps: list[EventStep]) -> list[AlertEvent]:
        name = camera_name(self.settings, camera_id)
        events: list[AlertEvent] = []
        for step in steps:
            current = None
            if step.type is not EventType.START:
                pipe.watch(self.keys.event(step.event_id))
                current = load_event(pipe, self.keys, step.event_id)
            events.append(start_tier(build_event(step, current, camera_id, name), self.settings))
        return events

    def _queue_writes(self, pipe: Any, camera_id: str, state: CameraAlertState, events: list[AlertEvent]) -> None:
        pipe.hset(self.keys.camera_state(camera_id), mapping={"state": state.model_dump_json(), "camera_id": camera_id})
        for ev in events:
            write_event(pipe, self.keys, ev, active=ev.type is not EventType.END, maxlen=self.cfg.stream_maxlen)
            if ev.type is EventType.START:
                queue_start(pipe, self.keys, ev, self.settings)
            else:  # a camera back online is notified too
                for delivery in deliveries_for(ev, self.settings):
                    pipe.xadd(self.keys.notify_outbox_stream(), encode(delivery))
        if state.active:
            pipe.sadd(self.keys.alert_cameras(), camera_id)
        else:
            pipe.srem(self.keys.alert_cameras(), camera_id)


def load_state(client: Any, keys: Keys, camera_id: str) -> CameraAlertState:
    raw = client.hget(keys.camera_state(camera_id), "state")
    return CameraAlertState.model_validate_json(raw) if raw is not None else CameraAlertState()


def acknowledge(client: redis.Redis, keys: Keys, event_id: str, by: str, maxlen: int,
                clock: Callable[[], float] = time.time, source: str = "cli") -> AlertEvent:
    """Mark an event acknowledged (who, when, from where) and publish an ``update``; its escalation
    stops. Idempotent: the first acknowledgement stands. Raises EventNotFound."""
    _check_source(source)
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
                at = clock()
                event = AlertEvent.model_validate({**current.model_dump(), "type": EventType.UPDATE, "at": at,
                                                   **_ack_fields(by, at, source), "next_escalation_at": None})
                pipe.multi()
                write_event(pipe, keys, event, active=active, maxlen=maxlen)
                pipe.zrem(keys.escalations(), event_id)
                pipe.execute()
                break
            except redis.WatchError:
                continue
    wait_replica(client, keys.replica_barrier())
    log.info("alert_acknowledged", event_id=event_id, by=by, source=source)
    return event


def _ack_fields(by: str, at: float, source: str) -> dict[str, Any]:
    return {"acknowledged": True, "acknowledged_by": by, "acknowledged_at": at, "ack_source": source}


def resolve(client: redis.Redis, keys: Keys, event_id: str, by: str, outcome: EventOutcome | str, maxlen: int,
            note: str = "", source: str = "cli", *, cooldown_s: float = 0.0,
            clock: Callable[[], float] = time.time) -> AlertEvent:
    """Close an open event with a person's ``outcome`` and publish its ``end`` (acknowledging it too,
    if nobody had). The camera may start a new fall event ``cooldown_s`` after this. Raises
    EventNotFound for an unknown id and BadTransition for an event that has already ended."""
    outcome, key = EventOutcome(outcome), keys.event(event_id)
    _check_source(source)
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(key)
                current = _check_resolvable(load_event(pipe, keys, event_id), event_id, pipe.hget(key, "active"))
                event = _resolved(current, by, outcome, note, source, clock())
                _queue_resolve(pipe, keys, event, maxlen, cooldown_s)
                break
            except redis.WatchError:
                continue
    wait_replica(client, keys.replica_barrier())
    log.info("alert_resolved", event_id=event_id, by=by, outcome=outcome.value, source=source)
    return event


def _check_resolvable(current: AlertEvent | None, event_id: str, active: bytes | None) -> AlertEvent:
    if current is None:
        raise EventNotFound(event_id)
    if current.kind is not EventKind.FALL:
        raise BadTransition(f"event {event_id} is a {current.kind.value} event; only fall events take an outcome")
    if current.outcome is not None:
        raise BadTransition(f"event {event_id} was already resolved as {current.outcome.value} by {current.resolved_by}")
    if active != b"1":
        raise BadTransition(f"event {event_id} has already ended")
    return current


def _resolved(current: AlertEvent, by: str, outcome: EventOutcome, note: str, source: str, at: float) -> AlertEvent:
    ack = {} if current.acknowledged else _ack_fields(by, at, source)
    return AlertEvent.model_validate({
        **current.model_dump(), "type": EventType.END, "at": at, **ack, "outcome": outcome,
        "outcome_note": note or None, "resolved_by": by, "resolved_at": at, "next_escalation_at": None,
    })


def _queue_resolve(pipe: Any, keys: Keys, event: AlertEvent, maxlen: int, cooldown_s: float) -> None:
    """WATCH the camera's state, then in one MULTI: the end event, the state freed, the escalation dropped."""
    state_key = keys.camera_state(event.camera_id)
    pipe.watch(state_key)
    state = on_resolve(load_state(pipe, keys, event.camera_id), event.event_id, event.at, cooldown_s)
    pipe.multi()
    write_event(pipe, keys, event, active=False, maxlen=maxlen)
    pipe.hset(state_key, mapping={"state": state.model_dump_json(), "camera_id": event.camera_id})
    if not state.active:
        pipe.srem(keys.alert_cameras(), event.camera_id)
    pipe.zrem(keys.escalations(), event.event_id)
    pipe.xadd(keys.outcomes_stream(), encode(outcome_record(event)), maxlen=OUTCOMES_MAXLEN, approximate=True)
    pipe.execute()


def outcome_record(event: AlertEvent) -> OutcomeRecord:
    """The ground truth a resolve leaves: the outcome against the event's frame ids."""
    assert event.outcome is not None and event.resolved_by is not None and event.resolved_at is not None
    return OutcomeRecord(event_id=event.event_id, camera_id=event.camera_id, started_at=event.started_at,
                         frame_ids=event.frame_ids, outcome=event.outcome, note=event.outcome_note or "",
                         by=event.resolved_by, source=event.ack_source or "cli", at=event.resolved_at,
                         confidence=event.confidence, decided_by=event.decided_by)

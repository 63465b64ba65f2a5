"""Escalation of fall events nobody acknowledges, durable in Redis.

A camera's tiers come from ``Settings.escalation_for`` (its own ``escalation`` or
``alerts.escalation``); without any, a fall has one tier: ``notifications.urls`` and the camera's
``notify`` URLs, at once. Tier 1 (``after_s: 0``) is notified in the transaction that starts the
event, together with those URLs; each later tier k is due at ``started_at + after_s`` of tier k.

The next due tier of every open fall event is one member of the sorted set
``keys.escalations()``, scored by its due time. :meth:`Escalator.fire_due` takes a due member in
one optimistic transaction (WATCH the set and the event, then MULTI: the ``update`` event with the
new tier, the outbox entries of the tier's channels, and the member moved to the next tier's due
time or removed). A second alerts process that read the same member fails its EXEC, reads again
and finds it moved, so each tier fires once; a process killed before EXEC wrote nothing, and the
member is still due when an alerts process runs again. An acknowledged or ended event's member is
dropped instead of fired (acknowledge and resolve also remove it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
import structlog

from alerts.notify import Delivery, channel_id, channel_ids_for, compose, deliveries_for
from fallwatch.keys import Keys
from fallwatch.redis import wait_replica
from fallwatch.schemas import AlertEvent, EventKind, EventType, encode
from fallwatch.settings import EscalationTier, Settings

log = structlog.get_logger(__name__)


def tier_channels(settings: Settings, camera_id: str, tier: int) -> list[str]:
    """Channel ids notified at tier ``tier`` (1-based): tier 1 adds the camera's usual channels."""
    tiers = settings.escalation_for(camera_id)
    own = [channel_id(u.get_secret_value()) for u in tiers[tier - 1].urls] if tiers else []
    base = channel_ids_for(settings, camera_id) if tier == 1 else []
    return list(dict.fromkeys(base + own))


def with_tier(event: AlertEvent, tiers: list[EscalationTier], tier: int) -> AlertEvent:
    """``event`` marked as notified at ``tier``, with the due time of the next one."""
    nxt = event.started_at + tiers[tier].after_s if tier < len(tiers) else None
    return event.model_copy(update={
        "escalation_tier": tier, "escalation_tiers": max(1, len(tiers)),
        "escalation_name": tiers[tier - 1].name if tiers else None, "next_escalation_at": nxt,
    })


def start_tier(event: AlertEvent, settings: Settings) -> AlertEvent:
    """A starting fall event marked as notified at tier 1; other events unchanged."""
    if event.type is not EventType.START or event.kind is not EventKind.FALL:
        return event
    return with_tier(event, settings.escalation_for(event.camera_id), 1)


def tier_deliveries(event: AlertEvent, settings: Settings) -> list[Delivery]:
    """Outbox entries of the tier ``event`` was just marked with (an event's start: its usual ones)."""
    if event.kind is not EventKind.FALL:
        return deliveries_for(event, settings)
    title, body = compose(event, settings)
    frame = event.frame_ids[-1] if event.frame_ids else None
    return [Delivery(event_id=event.event_id, channel=ch, camera_id=event.camera_id, kind=event.kind,
                     title=title, body=body, frame_id=frame, tier=event.escalation_tier)
            for ch in tier_channels(settings, event.camera_id, event.escalation_tier)]


def queue_start(pipe: Any, keys: Keys, event: AlertEvent, settings: Settings) -> None:
    """On ``pipe`` (inside MULTI): a starting event's notifications and its next tier's due time."""
    for delivery in tier_deliveries(event, settings):
        pipe.xadd(keys.notify_outbox_stream(), encode(delivery))
    if event.next_escalation_at is not None:
        pipe.zadd(keys.escalations(), {event.event_id: event.next_escalation_at})


class Escalator:
    """Fires due escalation tiers; safe to run in several alerts processes at once."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings,
                 clock: Callable[[], float] = time.time):
        self.client, self.keys, self.settings, self.clock = client, keys, settings, clock

    def due(self, now: float, limit: int = 100) -> list[str]:
        raw = self.client.zrangebyscore(self.keys.escalations(), "-inf", now, start=0, num=limit)
        return [r.decode() for r in raw]

    def fire_due(self, limit: int = 100) -> list[AlertEvent]:
        """Fire every tier due by now (at most ``limit``); returns the ``update`` events published."""
        now = self.clock()
        fired = (self.fire(event_id, now) for event_id in self.due(now, limit))
        return [ev for ev in fired if ev is not None]

    def fire(self, event_id: str, now: float) -> AlertEvent | None:
        """Fire ``event_id``'s due tier once; None if it is not due, taken by another process, or moot."""
        from alerts.store import load_event  # noqa: PLC0415 - alerts.store imports this module

        zkey, ekey = self.keys.escalations(), self.keys.event(event_id)
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(zkey, ekey)
                    score = pipe.zscore(zkey, event_id)
                    if score is None or score > now:
                        pipe.unwatch()
                        return None
                    current = load_event(pipe, self.keys, event_id)
                    open_ = pipe.hget(ekey, "active") == b"1"
                    event = self._next(current, now) if current is not None and open_ else None
                    pipe.multi()
                    if event is None:
                        pipe.zrem(zkey, event_id)
                    else:
                        self._queue_fire(pipe, event)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        if event is not None:
            wait_replica(self.client, self.keys.replica_barrier())
            log.info("alert_escalated", event_id=event_id, camera=event.camera_id, tier=event.escalation_tier,
                     tier_name=event.escalation_name, open_s=round(now - event.started_at, 1))
        return event

    def _next(self, current: AlertEvent, now: float) -> AlertEvent | None:
        tiers = self.settings.escalation_for(current.camera_id)
        tier = current.escalation_tier + 1
        if current.acknowledged or current.kind is not EventKind.FALL or tier > len(tiers):
            return None
        return with_tier(current.model_copy(update={"type": EventType.UPDATE, "at": now}), tiers, tier)

    def _queue_fire(self, pipe: Any, event: AlertEvent) -> None:
        from alerts.store import write_event  # noqa: PLC0415

        write_event(pipe, self.keys, event, active=True, maxlen=self.settings.alerts.stream_maxlen)
        for delivery in tier_deliveries(event, self.settings):
            pipe.xadd(self.keys.notify_outbox_stream(), encode(delivery))
        if event.next_escalation_at is None:
            pipe.zrem(self.keys.escalations(), event.event_id)
        else:
            pipe.zadd(self.keys.escalations(), {event.event_id: event.next_escalation_at})

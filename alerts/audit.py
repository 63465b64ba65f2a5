"""Audit verdicts in the alerts service: a fall the edge missed is never ignored.

An audit's cloud verdict (``route="audit"``) does not take part in merging: the frame's final
verdict came from the edge at once. When the cloud says fall and the edge said no fall, the
camera's fall event is started (or, if one is open, updated) with decider ``cloud_audit``,
whatever the debounce and cooldown say: a possible fall that the cloud saw is always shown.
"""

from __future__ import annotations

from alerts.events import CameraAlertState, EventStep, Transition
from alerts.merge import cloud_decision, cloud_usable
from fallwatch.schemas import CloudVerdict, Decider, EventKind, EventType, new_id


def is_audit(msg: object) -> bool:
    return isinstance(msg, CloudVerdict) and msg.route == "audit"


def missed_fall(c: CloudVerdict) -> bool:
    """The cloud saw a fall where the edge, whose verdict stood, did not."""
    if not cloud_usable(c) or c.edge_p_fall is None:
        return False
    return cloud_decision(c)[0] and c.edge_p_fall < 0.5


def on_audit_fall(state: CameraAlertState, c: CloudVerdict) -> Transition:
    """Start a fall event decided by ``cloud_audit``, or add the frame to the open one."""
    p = cloud_decision(c)[1]
    if state.fall_event is not None:
        step = EventStep(EventType.UPDATE, EventKind.FALL, state.fall_event, at=c.captured_at, confidence=p,
                    decided_by=Decider.CLOUD_AUDIT, frame_ids=(c.frame_id,))
        return state.model_copy(update={"last_fall_at": max(state.last_fall_at, c.captured_at)}), [step]
    step = EventStep(EventType.START, EventKind.FALL, new_id(), at=c.captured_at, confidence=p,
                decided_by=Decider.CLOUD_AUDIT, frame_ids=(c.frame_id,))
    return state.model_copy(update={"fall_event": step.event_id, "last_fall_at": c.captured_at}), [step]


class AuditHandler:
    """Applies audit verdicts: the late-fall event (once per frame) and, when set, the drift monitor."""

    def __init__(self, client, keys, store, drift=None, ttl_s: int = 86400):
        self.client, self.keys, self.store, self.drift, self.ttl_s = client, keys, store, drift, ttl_s

    def handle(self, c: CloudVerdict) -> list:
        if not cloud_usable(c) or not self.client.set(self.keys.audit_done(c.frame_id), 1, nx=True, ex=self.ttl_s):
            return []  # failed, or already applied (redelivery)
        events = []
        if missed_fall(c):
            events += self.store.transact(c.camera_id, lambda s: on_audit_fall(s, c))
        if self.drift is not None and c.edge_p_fall is not None:
            events += self.drift.on_audit(c)
        return events

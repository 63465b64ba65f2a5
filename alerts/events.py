"""The per-camera alert state machine, as pure functions (the Redis side is in ``alerts.store``).

Fall events
    ``alerts.debounce_k`` fall verdicts among ``alerts.debounce_n`` consecutive final verdicts
    (consecutive in capture order) start an event; each further fall verdict updates it. A fall
    event latches: once ``alerts.quiet_s`` pass without a fall (checked on every verdict and by a
    timer) the event is marked no longer seen (an ``update`` with ``still_seen`` false and
    ``seen_until``), not ended; a later fall marks it seen again. Only a person ends it, with
    ``alerts.store.resolve`` (:func:`on_resolve`). After that no new event starts on that camera
    for ``alerts.cooldown_s``, and falls captured before then do not count towards the next one.

Order
    Final verdicts can arrive out of capture order: an offloaded frame is decided seconds after
    the confident frames that follow it. Each verdict is inserted at its ``captured_at`` place
    in a short per-camera history, and the debounce test looks at every window of n consecutive
    verdicts that contains it, so a late cloud verdict counts as if it had arrived on time. The
    history keeps ``cloud_timeout_s + quiet_s`` of capture time (at most ``HISTORY_MAX`` or 2n
    verdicts), enough for any verdict the merge step can still produce. A verdict captured
    before a resolved event's cooldown ends (``resolved_at + cooldown_s``) cannot start a new
    event: stragglers of a resolved event are absorbed by its cooldown.

Times
    Quiet and cooldown are measured on the capture timeline (a resolve's cooldown starts at its
    wall-clock time, which is where live cameras' capture times are); the timer compares the wall clock
    with the last fall's capture time. The moment a fall is no longer seen is ``last fall +
    quiet_s``, whichever of the two notices it.

Camera offline
    ``CameraStatus`` offline starts a ``camera_offline`` event once the camera has stayed offline for
    ``alerts.offline_grace_s`` (checked by the timer; a shorter drop raises nothing), online ends it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from fallwatch.schemas import (CameraAlertState, CameraState, CameraStatus, Decider, EventKind, EventType, FinalVerdict,
                               Observation, new_id)
from fallwatch.settings import AlertsSettings

HISTORY_MAX = 256
EVENT_FRAMES_MAX = 100


@dataclass(frozen=True)
class EventStep:
    """One lifecycle step to publish; ``alerts.store`` turns it into an AlertEvent."""

    type: EventType
    kind: EventKind
    event_id: str
    at: float
    confidence: float | None = None
    decided_by: Decider | None = None
    frame_ids: tuple[str, ...] = ()
    description: str | None = None
    seen: bool | None = None  # fall updates: True, seen (again); False, no longer seen
    seen_until: float | None = None  # with seen False: capture time of the last fall seen


Transition = tuple[CameraAlertState, list[EventStep]]


def _insert(history: tuple[Observation, ...], obs: Observation) -> tuple[tuple[Observation, ...], int]:
    orders = [h.order for h in history]
    i = bisect.bisect(orders, obs.order)
    return history[:i] + (obs,) + history[i:], i


def _prune(history: tuple[Observation, ...], cfg: AlertsSettings) -> tuple[Observation, ...]:
    """Keep ``cloud_timeout_s + quiet_s`` of capture time, and at most max(HISTORY_MAX, 2n) verdicts."""
    if not history:
        return history
    horizon = history[-1].at - (cfg.cloud_timeout_s + cfg.quiet_s)
    kept = tuple(h for h in history if h.at >= horizon)
    return kept[-max(HISTORY_MAX, 2 * cfg.debounce_n):]


def hit_window(history: tuple[Observation, ...], i: int, k: int, n: int,
               since: float = 0.0) -> tuple[Observation, ...] | None:
    """The falls (captured at or after ``since``) of the first window of n consecutive verdicts
    containing position i that holds at least k of them."""
    for start in range(max(0, i - n + 1), i + 1):
        falls = tuple(h for h in history[start:start + n] if h.fall and h.at >= since)
        if len(falls) >= k:
            return falls
    return None


def _strongest(falls: tuple[Observation, ...]) -> Observation:
    return max(falls, key=lambda h: (h.p, h.at))


def _start(falls: tuple[Observation, ...], description: str | None) -> EventStep:
    top = _strongest(falls)
    return EventStep(EventType.START, EventKind.FALL, new_id(), at=falls[0].at, confidence=top.p,
                decided_by=top.by, frame_ids=tuple(h.frame_id for h in falls), description=description)


def _unseen(state: CameraAlertState, cfg: AlertsSettings) -> Transition:
    """The models stopped seeing the fall: say so on the event, which stays open."""
    assert state.fall_event is not None
    step = EventStep(EventType.UPDATE, EventKind.FALL, state.fall_event, at=state.last_fall_at + cfg.quiet_s,
                seen=False, seen_until=state.last_fall_at)
    return state.model_copy(update={"fall_unseen": True}), [step]


def _quiet(state: CameraAlertState, t: float, cfg: AlertsSettings) -> bool:
    return state.fall_event is not None and not state.fall_unseen and t - state.last_fall_at > cfg.quiet_s


def on_final(state: CameraAlertState, verdict: FinalVerdict, cfg: AlertsSettings) -> Transition:
    """Apply one final verdict. A verdict already in the history (redelivery) changes nothing."""
    obs = Observation.of(verdict)
    if any(h.frame_id == obs.frame_id for h in state.history):
        return state, []
    history, i = _insert(state.history, obs)
    state = state.model_copy(update={"history": history})
    steps: list[EventStep] = []
    if _quiet(state, obs.at, cfg):
        state, steps = _unseen(state, cfg)
    if state.fall_event is not None and obs.fall:
        steps.append(EventStep(EventType.UPDATE, EventKind.FALL, state.fall_event, at=obs.at, confidence=obs.p,
                          decided_by=obs.by, frame_ids=(obs.frame_id,), seen=True, description=verdict.description))
        state = state.model_copy(update={"last_fall_at": max(state.last_fall_at, obs.at), "fall_unseen": False})
    elif state.fall_event is None and obs.fall and obs.at >= state.cooldown_until:
        falls = hit_window(history, i, cfg.debounce_k, cfg.debounce_n, since=state.cooldown_until)
        if falls is not None:
            step = _start(falls, verdict.description)
            steps.append(step)
            last_fall = max(h.at for h in falls)
            state = state.model_copy(update={"fall_event": step.event_id, "last_fall_at": last_fall})
    return state.model_copy(update={"history": _prune(state.history, cfg)}), steps


def on_tick(state: CameraAlertState, now: float, cfg: AlertsSettings) -> Transition:
    """Mark a fall event no longer seen once it has been quiet for ``quiet_s`` of wall-clock time;
    start the offline event of a camera offline for longer than ``offline_grace_s``."""
    if state.offline_since is not None and now - state.offline_since >= cfg.offline_grace_s:
        state, steps = _offline(state, state.offline_since, state.offline_reason)
        more = on_tick(state, now, cfg)
        return more[0], steps + more[1]
    if _quiet(state, now, cfg):
        return _unseen(state, cfg)
    return state, []


def _offline(state: CameraAlertState, at: float, reason: str) -> Transition:
    step = EventStep(EventType.START, EventKind.CAMERA_OFFLINE, new_id(), at=at, description=reason or None)
    return state.model_copy(update={"offline_event": step.event_id, "offline_since": None}), [step]


def on_resolve(state: CameraAlertState, event_id: str, at: float, cooldown_s: float) -> CameraAlertState:
    """A person closed ``event_id`` at ``at``: the camera can start a new event after ``cooldown_s``."""
    if state.fall_event == event_id:
        until = max(state.cooldown_until, at + cooldown_s)
        return state.model_copy(update={"fall_event": None, "fall_unseen": False, "cooldown_until": until})
    if state.offline_event == event_id:
        return state.model_copy(update={"offline_event": None})
    return state


def on_status(state: CameraAlertState, status: CameraStatus, grace_s: float = 0.0) -> Transition:
    """Offline starts a camera_offline event (after ``grace_s``, through :func:`on_tick`), online ends it;
    repeats, planned stops and drops shorter than the grace period raise nothing."""
    offline = status.state is CameraState.OFFLINE and not status.expected
    if offline and state.offline_event is None and state.offline_since is None:
        if grace_s <= 0:
            return _offline(state, status.at, status.reason)
        return state.model_copy(update={"offline_since": status.at, "offline_reason": status.reason}), []
    if status.state is not CameraState.OFFLINE and state.offline_since is not None:
        return state.model_copy(update={"offline_since": None, "offline_reason": ""}), []
    if status.state is CameraState.ONLINE and state.offline_event is not None:
        step = EventStep(EventType.END, EventKind.CAMERA_OFFLINE, state.offline_event, at=status.at,
                    description=status.reason or None)
        return state.model_copy(update={"offline_event": None}), [step]
    return state, []

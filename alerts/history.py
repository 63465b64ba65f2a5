"""Reading alert events back: the open ones a caregiver must act on, and the history pages.

Every event id is in ``keys.events_index()`` scored by its start time (``alerts.store.write_event``
adds it), so a page reads one ZREVRANGEBYSCORE and one pipelined HGET per event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fallwatch.keys import Keys
from fallwatch.schemas import AlertEvent, EventKind, SchemaError

OPEN_SCAN = 500        # newest events looked at for the open list
HISTORY_SCAN = 5000    # newest events of a time range looked at for one history query
UNRESOLVED = "none"


@dataclass(frozen=True)
class StoredEvent:
    event: AlertEvent
    active: bool

    @property
    def open(self) -> bool:
        """Needs a person: still running, or a fall event nobody has resolved yet."""
        return self.event.outcome is None and (self.active or self.event.kind is EventKind.FALL)


def load_many(client: Any, keys: Keys, event_ids: list[str]) -> list[StoredEvent]:
    pipe = client.pipeline(transaction=False)
    for event_id in event_ids:
        pipe.hmget(keys.event(event_id), "m", "active")
    out = []
    for raw, active in pipe.execute():
        try:
            if raw is not None:
                out.append(StoredEvent(AlertEvent.from_json(raw), active == b"1"))
        except SchemaError:
            continue  # an unreadable record is skipped, not fatal to the page
    return out


def _ids(client: Any, keys: Keys, since: float | None, until: float | None, count: int) -> list[str]:
    raw = client.zrevrangebyscore(keys.events_index(), "+inf" if until is None else until,
                                  "-inf" if since is None else since, start=0, num=count)
    return [r.decode() for r in raw]


def open_events(client: Any, keys: Keys) -> list[StoredEvent]:
    """Open events, newest first."""
    return [e for e in load_many(client, keys, _ids(client, keys, None, None, OPEN_SCAN)) if e.open]


def _matches(e: StoredEvent, camera: str | None, outcome: str | None, kind: str | None) -> bool:
    got = e.event.outcome.value if e.event.outcome else UNRESOLVED
    return ((camera is None or e.event.camera_id == camera) and (outcome is None or got == outcome)
            and (kind is None or e.event.kind.value == kind))


def history(client: Any, keys: Keys, *, camera: str | None = None, outcome: str | None = None,
            kind: str | None = None, since: float | None = None, until: float | None = None,
            page: int = 1, size: int = 20) -> tuple[list[StoredEvent], int]:
    """One page of past events matching the filters (newest first) and how many match in all."""
    rows = [e for e in load_many(client, keys, _ids(client, keys, since, until, HISTORY_SCAN))
            if _matches(e, camera, outcome, kind)]
    start = (page - 1) * size
    return rows[start:start + size], len(rows)

"""Consumer-group plumbing shared by the alerts service and the notifier.

Entries are read with XREADGROUP and acknowledged by the caller only after its outputs are
written (at-least-once). Entries left pending by a consumer that died are taken over with
XAUTOCLAIM once they have been idle long enough.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
import structlog

from fallwatch.schemas import DeadLetter, encode

log = structlog.get_logger(__name__)

DEAD_LETTER_MAXLEN = 100_000


@dataclass(frozen=True)
class Entry:
    """One stream entry. ``fields`` is None when the entry was deleted before it was claimed."""

    stream: str
    id: str
    fields: dict[bytes, bytes] | None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def ensure_group(client: redis.Redis, stream: str, group: str, start_id: str = "0") -> None:
    """Create ``group`` on ``stream`` (and the stream) reading from ``start_id`` (default: the
    beginning; ``$``: only new entries); no-op if it exists."""
    try:
        client.xgroup_create(stream, group, id=start_id, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def read_group(client: redis.Redis, group: str, consumer: str, streams: list[str],
               count: int, block_ms: int | None = None) -> list[Entry]:
    """New entries for this consumer from ``streams`` (one XREADGROUP)."""
    reply = client.xreadgroup(group, consumer, {s: ">" for s in streams}, count=count, block=block_ms)
    return _entries(reply)


def read_own_pending(client: redis.Redis, group: str, consumer: str, stream: str, count: int) -> list[Entry]:
    """Entries delivered to this consumer name earlier and never acknowledged."""
    return _entries(client.xreadgroup(group, consumer, {stream: "0"}, count=count))


def _entries(reply: Any) -> list[Entry]:
    out: list[Entry] = []
    for stream, items in reply or []:  # RESP2 reply: [[stream, [(id, fields), ...]], ...]
        for entry_id, fields in items:
            out.append(Entry(_text(stream), _text(entry_id), fields or None))
    return out


def reclaim(client: redis.Redis, stream: str, group: str, consumer: str,
            min_idle_ms: int, limit: int = 1000) -> list[Entry]:
    """XAUTOCLAIM entries idle at least ``min_idle_ms`` (from consumers that died), up to ``limit``."""
    claimed: list[Entry] = []
    cursor = "0-0"
    while len(claimed) < limit:
        reply = client.xautoclaim(stream, group, consumer, min_idle_ms, start_id=cursor,
                                  count=min(100, limit - len(claimed)))
        cursor = _text(reply[0])
        claimed.extend(Entry(stream, _text(i), f or None) for i, f in reply[1] if i is not None)
        if cursor == "0-0":
            break
    if claimed:
        log.info("entries_reclaimed", stream=stream, group=group, count=len(claimed))
    return claimed


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def trim_consumed(client: redis.Redis, stream: str) -> int:
    """Trim entries every group of ``stream`` has read and acknowledged (XTRIM MINID ~).

    The boundary is, per group, its oldest pending entry or else its last delivered entry; the
    lowest over all groups is kept, with everything after it. Returns how many entries went.
    """
    groups = client.xinfo_groups(stream)
    if not groups:
        return 0
    bounds = []
    for g in groups:
        if int(g["pending"]):
            bounds.append(_text(client.xpending(stream, g["name"])["min"]))
        else:
            bounds.append(_text(g["last-delivered-id"]))
    return int(client.xtrim(stream, minid=min(bounds, key=_id_tuple), approximate=True))


def ack(client: redis.Redis, group: str, entry: Entry) -> None:
    client.xack(entry.stream, group, entry.id)


def dead_letter(client: redis.Redis, dead_stream: str, entry: Entry, reason: str, error: str,
                worker: str, pipe: Any = None) -> DeadLetter:
    """Record an entry that cannot be processed (the caller acknowledges it)."""
    msg = DeadLetter(source=entry.stream, entry_id=entry.id, reason=reason[:200], error=error[:4000], worker=worker)
    (pipe or client).xadd(dead_stream, encode(msg), maxlen=DEAD_LETTER_MAXLEN, approximate=True)
    log.warning("dead_letter", source=entry.stream, entry_id=entry.id, reason=reason, error=error[:500])
    return msg

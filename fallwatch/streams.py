"""Redis plumbing every role shares: consumer groups, dead letters, backoff, the RQ queue.

Entries are read with XREADGROUP and acknowledged by the caller only after its outputs are
written (at-least-once). Entries left pending by a consumer that died are taken over with
XAUTOCLAIM once they have been idle long enough.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
import structlog
from rq import Queue
from rq.serializers import JSONSerializer

from fallwatch.defaults import DEAD_LETTER_MAXLEN
from fallwatch.keys import text
from fallwatch.schemas import DeadLetter, encode
from fallwatch.settings import RedisSettings

log = structlog.get_logger(__name__)


class Backoff:
    """Capped exponential backoff: base, 2*base, 4*base, ... up to cap; :meth:`reset` after success."""

    def __init__(self, base: float, cap: float):
        self.base = base
        self.cap = cap
        self.attempt = 0

    @classmethod
    def redis(cls, cfg: RedisSettings) -> "Backoff":
        """The backoff of a role's Redis-outage retry loop (``redis.retry_base_s`` .. ``retry_cap_s``)."""
        return cls(min(cfg.retry_base_s, cfg.retry_cap_s), cfg.retry_cap_s)

    def next(self) -> float:
        delay = min(self.cap, self.base * (2 ** self.attempt))
        self.attempt = min(self.attempt + 1, 62)
        return delay

    def reset(self) -> None:
        self.attempt = 0


def job_queue(client: redis.Redis, name: str) -> Queue:
    """The RQ queue ``name`` with RQ's JSON serializer (job data from Redis is never unpickled)."""
    return Queue(name, connection=client, serializer=JSONSerializer)


@dataclass(frozen=True)
class Entry:
    """One stream entry. ``fields`` is None when the entry was deleted before it was claimed."""

    stream: str
    id: str
    fields: dict[bytes, bytes] | None


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
            out.append(Entry(text(stream), text(entry_id), fields or None))
    return out


def reclaim(client: redis.Redis, stream: str, group: str, consumer: str,
            min_idle_ms: int, limit: int = 1000) -> list[Entry]:
    """XAUTOCLAIM entries idle at least ``min_idle_ms`` (from consumers that died), up to ``limit``."""
    claimed: list[Entry] = []
    cursor = "0-0"
    while len(claimed) < limit:
        reply = client.xautoclaim(stream, group, consumer, min_idle_ms, start_id=cursor,
                                  count=min(100, limit - len(claimed)))
        cursor = text(reply[0])
        claimed.extend(Entry(stream, text(i), f or None) for i, f in reply[1] if i is not None)
        if cursor == "0-0":
            break
    if claimed:
        log.info("entries_reclaimed", stream=stream, group=group, count=len(claimed))
    return claimed


def id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as (ms, seq), for comparing ids."""
    ms, _, seq = text(entry_id).partition("-")
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
            bounds.append(text(client.xpending(stream, g["name"])["min"]))
        else:
            bounds.append(text(g["last-delivered-id"]))
    return int(client.xtrim(stream, minid=min(bounds, key=id_tuple), approximate=True))


def ack(client: redis.Redis, group: str, entry: Entry) -> None:
    client.xack(entry.stream, group, entry.id)


def write_dead_letter(client: Any, dead_stream: str, source: str, entry_id: str, reason: str, error: str,
                      worker: str) -> DeadLetter:
    """Record an input that cannot be processed on ``dead_stream`` (``client`` may be a pipeline)."""
    msg = DeadLetter(source=source, entry_id=entry_id, reason=reason[:200], error=error[:4000], worker=worker)
    client.xadd(dead_stream, encode(msg), maxlen=DEAD_LETTER_MAXLEN, approximate=True)
    log.warning("dead_letter", source=source, entry_id=entry_id, reason=reason, error=error[:500])
    return msg


def dead_letter(client: redis.Redis, dead_stream: str, entry: Entry, reason: str, error: str,
                worker: str, pipe: Any = None) -> DeadLetter:
    """Record a stream entry that cannot be processed (the caller acknowledges it)."""
    return write_dead_letter(pipe or client, dead_stream, entry.stream, entry.id, reason, error, worker)

"""Frames trimmed while a worker held them: counted once, and taken back out of the count when the
worker that held them still delivers them.

An entry delivered to a worker can be trimmed by ``MAXLEN`` before that worker acknowledges it. Another
worker then finds it (its ``XAUTOCLAIM``) with nothing left to score and counts it as dropped
(``frames_trimmed_pending``). But the holder may only be slow, not dead: it still has the frame in
memory and writes its verdict. Each step below is one atomic script, so whichever of the two comes
first decides, and the entry is either dropped or delivered, never both:

- :data:`CLAIM`: ``XAUTOCLAIM``, and the ids Redis 7 reports deleted (it takes them off the pending list
  itself) counted and remembered in the same step;
- :data:`DROP`: ids pending for this worker whose entries are gone (Redis 6.2 claims them as nil)
  acknowledged, and counted and remembered only if they were still pending;
- :func:`uncount`: the holder's write acknowledged fewer entries than it delivered: those it finds
  remembered were counted as dropped, and come out of the count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from fallwatch.keys import Keys

REMEMBER_S = 86400

# KEYS: frames stream, counter, remembered ids. ARGV: group, consumer, min idle ms, count, remember s.
CLAIM = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', ARGV[4])
local deleted = r[3]
if deleted and #deleted > 0 then
  redis.call('INCRBY', KEYS[2], #deleted)
  redis.call('SADD', KEYS[3], unpack(deleted))
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
return r
"""

# KEYS: frames stream, counter, remembered ids. ARGV: group, remember s, ids...
DROP = """
local n = 0
for i = 3, #ARGV do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('SADD', KEYS[3], ARGV[i])
    n = n + 1
  end
end
if n > 0 then
  redis.call('INCRBY', KEYS[2], n)
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
return n
"""

# KEYS: counter, remembered ids. ARGV: ids delivered but no longer pending at the write.
UNCOUNT = """
local n = redis.call('SREM', KEYS[2], unpack(ARGV))
if n > 0 then redis.call('DECRBY', KEYS[1], n) end
return n
"""


def _keys(keys: Keys) -> list[str]:
    return [keys.frames_stream(), keys.frames_trimmed_pending(), keys.frames_trimmed_pending_ids()]


def claim(client: redis.Redis, keys: Keys, consumer: str, min_idle_ms: int, count: int) -> list[Any]:
    """``XAUTOCLAIM`` from the start of the group's pending list; Redis 7's deleted ids already counted."""
    return client.eval(CLAIM, 3, *_keys(keys), keys.edge_group(), consumer, min_idle_ms, count, REMEMBER_S)


def drop(client: redis.Redis, keys: Keys, ids: Sequence[Any]) -> int:
    """Acknowledge entries gone from the stream; how many were still pending (and now counted)."""
    if not ids:
        return 0
    return int(client.eval(DROP, 3, *_keys(keys), keys.edge_group(), REMEMBER_S, *ids))


def uncount(client: redis.Redis, keys: Keys, ids: Sequence[str]) -> int:
    """Entries this worker delivered after another counted them as dropped: out of the count again."""
    if not ids:
        return 0
    return int(client.eval(UNCOUNT, 2, keys.frames_trimmed_pending(), keys.frames_trimmed_pending_ids(), *ids))

"""A lease in Redis: one holder at a time among processes that may all run the same role.

The holder renews it more often than its TTL; when the holder dies the key expires and another
process takes over. :meth:`Lease.hold` takes or renews it in one Lua call.
"""

from __future__ import annotations

from typing import Any

_HOLD = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class Lease:
    """``key`` held by ``holder`` for ``ttl_s`` after each :meth:`hold`."""

    def __init__(self, client: Any, key: str, holder: str, ttl_s: float):
        self.client, self.key, self.holder = client, key, holder
        self.ttl_ms = max(1, int(1000 * ttl_s))
        self._hold, self._release = client.register_script(_HOLD), client.register_script(_RELEASE)

    def hold(self) -> bool:
        """Take the lease if it is free, renew it if it is ours; False when another process holds it."""
        return bool(self._hold(keys=[self.key], args=[self.holder, self.ttl_ms]))

    def release(self) -> None:
        """Give the lease up (only if it is still ours), so another process takes over at once."""
        self._release(keys=[self.key], args=[self.holder])

    def owner(self) -> str | None:
        raw = self.client.get(self.key)
        return raw.decode() if isinstance(raw, bytes) else raw

"""The cloud budget's shared state: a token bucket in Redis, and the cloud's measured service time.

:class:`TokenBucket` is the site's hard budget. One Lua script refills it by the server's clock
and spends from it atomically, so every edge worker of a site draws from the same bucket and two
workers can never overspend it together. It is a plain hash without a TTL, so it is persisted
with the rest of Redis (AOF) and a restart does not hand out a fresh budget.

A spend takes a ranked list of (cost, floor) pairs and grants the longest prefix that fits: an
item is granted only if the bucket stays at or above its floor after it. Rank-0 items have floor
0; lower-ranked items keep a reserve for them. Because the grant is a prefix of a ranked list, a
higher-ranked item is never refused while a lower-ranked one of the same spend is granted.

In GPU-seconds mode the edge debits an estimate (the cloud's recent seconds per item) and the cloud
worker settles the difference once it has measured the job (:meth:`TokenBucket.settle`), so the
bucket is spent in measured seconds.

:class:`ServiceReporter` (cloud side) and :func:`read_service` (edge side) share the cloud's recent
seconds per item and per job through ``keys.cloud_service()``, one field per cloud worker.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass

import redis

from fallwatch.keys import Keys
from fallwatch.settings import BudgetSettings

_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cap, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(h[1]), tonumber(h[2])
if tokens == nil or ts == nil then tokens, ts = cap, now end
tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
local granted = 0
if ARGV[3] == 'settle' then
  tokens = math.min(cap, tokens - tonumber(ARGV[4]))
else
  for i = 4, #ARGV, 2 do
    local cost, floor = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
    if tokens - cost < floor then break end
    tokens = tokens - cost
    granted = granted + 1
  end
end
local t_tokens, t_now = string.format('%.17g', tokens), string.format('%.6f', now)
redis.call('HSET', KEYS[1], 'tokens', t_tokens, 'ts', t_now)
return {granted, t_tokens, t_now}
"""


@dataclass(frozen=True)
class Grant:
    granted: int
    tokens: float
    shared: bool = True  # False: decided by the local fallback allowance
    at: float = 0.0  # when it was decided: the Redis server's clock for the shared bucket


def _prefix(tokens: float, items: list[tuple[float, float]]) -> tuple[int, float]:
    """The same rule as the Lua script, for the local fallback."""
    granted = 0
    for cost, floor in items:
        if tokens - cost < floor:
            break
        tokens -= cost
        granted += 1
    return granted, tokens


class LocalBucket:
    """A worker's own token bucket: what it may spend while the shared one cannot be reached."""

    def __init__(self, capacity: float, rate_per_s: float, clock=time.monotonic):
        self.capacity, self.rate, self.clock = capacity, rate_per_s, clock
        self.tokens, self._ts = capacity, clock()
        self._lock = threading.Lock()

    def resize(self, capacity: float, rate_per_s: float) -> None:
        with self._lock:
            self.capacity, self.rate = capacity, rate_per_s
            self.tokens = min(self.tokens, capacity)

    def take(self, items: list[tuple[float, float]]) -> Grant:
        with self._lock:
            now = self.clock()
            self.tokens = min(self.capacity, self.tokens + max(0.0, now - self._ts) * self.rate)
            self._ts = now
            scaled = [(cost, floor * self.capacity) for cost, floor in items]
            granted, self.tokens = _prefix(self.tokens, scaled)
            return Grant(granted, self.tokens, shared=False, at=time.time())


class TokenBucket:
    """The site's shared hard budget: ``capacity`` tokens, refilled at ``rate_per_s``."""

    def __init__(self, client: redis.Redis, keys: Keys, capacity: float, rate_per_s: float):
        self.client, self.key = client, keys.budget_bucket()
        self.capacity, self.rate = capacity, rate_per_s
        self._script = client.register_script(_BUCKET)

    @classmethod
    def for_site(cls, client: redis.Redis, keys: Keys, cfg: BudgetSettings) -> "TokenBucket":
        """The bucket of ``cloud.budget``: burst_s seconds of refill, refilled at hard_per_hour."""
        return cls(client, keys, cfg.hard_per_hour * cfg.burst_s / 3600, cfg.hard_per_hour / 3600)

    def take(self, items: list[tuple[float, float]]) -> Grant:
        """Grant the longest prefix of ranked (cost, floor-as-share-of-capacity) items that fits."""
        args = [self.capacity, self.rate, "take"]
        for cost, floor in items:
            args += [repr(float(cost)), repr(float(floor) * self.capacity)]
        granted, tokens, at = self._script(keys=[self.key], args=args)
        return Grant(int(granted), float(tokens), at=float(at))

    def settle(self, delta: float) -> float:
        """Debit ``delta`` more tokens (negative: give some back). Returns the tokens left."""
        args = [self.capacity, self.rate, "settle", repr(float(delta))]
        _granted, tokens, _at = self._script(keys=[self.key], args=args)
        return float(tokens)

    def level(self) -> float:
        """Tokens now (refilled up to this moment), without spending any."""
        return self.take([]).tokens


@dataclass(frozen=True)
class ServiceEstimate:
    """The cloud's recent speed: seconds per item and per job, and how many workers reported it."""

    item_s: float
    job_s: float
    workers: int
    measured: bool


class ServiceReporter:
    """A cloud worker's measured seconds per item (moving average) and per job (recent 90th
    percentile), written to ``keys.cloud_service()``."""

    def __init__(self, alpha: float = 0.3, jobs: int = 50):
        self.alpha = alpha
        self.item_s: float | None = None
        self._jobs: deque[float] = deque(maxlen=jobs)

    @property
    def job_s(self) -> float | None:
        """90th percentile of the recent jobs' wall times: jobs vary in size, and a queued item waits
        for the jobs ahead as they come, so a mean would promise too short a wait."""
        if not self._jobs:
            return None
        ordered = sorted(self._jobs)
        return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe_items(self, items: int, seconds: float) -> None:
        """Model seconds for ``items`` scored items (what a GPU-seconds budget pays for)."""
        if items > 0:
            self.item_s = self._avg(self.item_s, seconds / items)

    def observe_job(self, seconds: float) -> None:
        """Wall time of one whole job, RQ's bookkeeping included (what a queued job waits per job ahead)."""
        self._jobs.append(seconds)

    def write(self, client: redis.Redis, keys: Keys, worker: str) -> None:
        if self.item_s is None:
            return
        job_s = self.job_s if self.job_s is not None else self.item_s
        body = json.dumps({"item_s": self.item_s, "job_s": job_s, "at": time.time()})
        client.hset(keys.cloud_service(), worker, body)


def read_service(client: redis.Redis, keys: Keys, default_s: float, ttl_s: float) -> ServiceEstimate:
    """Average of the fresh reports; ``default_s`` per item (and per job) when there is none."""
    now, items, jobs = time.time(), [], []
    for raw in client.hvals(keys.cloud_service()):
        try:
            rep = json.loads(raw)
            if now - float(rep["at"]) <= ttl_s:
                items.append(float(rep["item_s"]))
                jobs.append(float(rep["job_s"]))
        except (ValueError, KeyError, TypeError):
            continue
    if not items:
        return ServiceEstimate(default_s, default_s, 1, False)
    return ServiceEstimate(sum(items) / len(items), sum(jobs) / len(jobs), len(items), True)

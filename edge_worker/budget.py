"""Which offloads an edge worker sends to the cloud, in what order, and which it keeps.

- ``target_rate``: the agreement threshold follows a running quantile of recent scores, clamped
  to bounds, so the offload share holds when the scene changes (:class:`RateTracker`).
- ranking: an item the edge calls "no fall" (a fall may be missed) goes before one it calls
  "fall" (a false alarm may be sent), lower agreement first; the rank picks the RQ queue.
- backpressure: an item the cloud would answer only after its deadline is kept (``edge_shed``).
- ``hard``: the ranked items spend the site's shared token bucket; what does not fit is kept
  (``edge_budget``). If the bucket cannot be reached, the worker spends only its share from a
  local one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import redis
import structlog

from fallwatch.budget import Grant, LocalBucket, ServiceEstimate, TokenBucket, read_service
from fallwatch.keys import Keys
from fallwatch.schemas import Decider, EdgeVerdict
from fallwatch.settings import BudgetSettings, Settings

log = structlog.get_logger(__name__)

SHARE_REFRESH_S = 10.0  # how often the fallback share re-counts live edge workers


class RateTracker:
    """Recent agreement scores and the threshold that offloads ``target`` of them."""

    def __init__(self, cfg: BudgetSettings, target: float, clock=time.monotonic):
        self.cfg, self.target, self.clock = cfg, target, clock
        self._scores: deque[tuple[float, float]] = deque(maxlen=cfg.window_items)

    def observe(self, scores: Sequence[float]) -> None:
        now = self.clock()
        self._scores.extend((now, float(s)) for s in scores)
        while self._scores and now - self._scores[0][0] > self.cfg.window_s:
            self._scores.popleft()

    def threshold(self) -> float | None:
        """Offload below this; None while the window holds fewer than ``min_items`` scores."""
        if len(self._scores) < self.cfg.min_items:
            return None
        q = float(np.quantile([s for _, s in self._scores], self.target))
        return min(self.cfg.threshold_max, max(self.cfg.threshold_min, q))


def rank_of(v: EdgeVerdict) -> int:
    return 1 if v.is_fall else 0


def ranked(verdicts: Sequence[EdgeVerdict]) -> list[int]:
    """Indices of ``verdicts`` in offload priority: rank, then lower agreement first."""
    return sorted(range(len(verdicts)), key=lambda i: (rank_of(verdicts[i]), verdicts[i].agreement or 0.0))


@dataclass
class Plan:
    """The outcome for one batch of would-be offloads (indices into it)."""

    send: list[int] = field(default_factory=list)
    ranks: dict[int, int] = field(default_factory=dict)
    cost_s: float = 0.0  # GPU seconds debited per sent item (gpu_s mode), for the cloud to settle
    kept: dict[int, Decider] = field(default_factory=dict)


class Router:
    """Plans one edge batch's offloads; shared state lives in Redis."""

    def __init__(self, settings: Settings, client: redis.Redis, keys: Keys, queue_keys: Sequence[str],
                 target: float | None = None):
        self.settings, self.cfg, self.client, self.keys = settings, settings.cloud.budget, client, keys
        self.queue_keys = list(queue_keys)
        self._share_at = -SHARE_REFRESH_S
        self.rate = RateTracker(self.cfg, target) if self.cfg.mode == "target_rate" and target else None
        if self.cfg.mode == "target_rate" and not target:
            log.warning("budget_target_unknown", detail="target_rate mode without cloud.budget.target_rate or a "
                        "calibrated offload share in the switcher checkpoint: the fixed threshold is used")
        self.bucket = TokenBucket.for_site(client, keys, self.cfg)
        self._share = self.cfg.fallback_share or 1.0
        self.local = LocalBucket(self.bucket.capacity * self._share, self.bucket.rate * self._share)

    # --- target_rate ------------------------------------------------------------------------
    def threshold(self, agreement: Sequence[float] | None) -> float | None:
        """target_rate mode: the threshold for this batch (its own scores included), else None."""
        if self.rate is None or agreement is None:
            return None
        self.rate.observe(agreement)
        return self.rate.threshold()

    # --- planning ---------------------------------------------------------------------------
    def plan(self, verdicts: Sequence[EdgeVerdict], deadline: Sequence[float]) -> Plan:
        order = ranked(verdicts)
        plan = Plan(ranks={i: rank_of(verdicts[i]) for i in order})
        service = self._service()
        if self.cfg.backpressure:
            order = self._shed(order, plan, service, deadline)
        if self.cfg.mode == "hard" and order:
            order = self._spend(order, plan, service)
        plan.send = order
        return plan

    def _service(self) -> ServiceEstimate:
        return read_service(self.client, self.keys, self.cfg.default_service_s, self.cfg.service_ttl_s)

    def wait_s(self, service: ServiceEstimate, depths: Sequence[int], rank: int) -> float:
        """Predicted time until a job sent now to the queue of ``rank`` is answered."""
        ahead = sum(depths[:rank + 1])
        return (ahead / service.workers + 1) * service.job_s

    def _shed(self, order: list[int], plan: Plan, service: ServiceEstimate, deadline: Sequence[float]) -> list[int]:
        if not service.measured:
            return order
        pipe = self.client.pipeline(transaction=False)
        for q in self.queue_keys:
            pipe.llen(q)
        depths = pipe.execute()
        now = time.time()
        keep = []
        for i in order:
            if now + self.wait_s(service, depths, plan.ranks[i]) > deadline[i]:
                plan.kept[i] = Decider.EDGE_SHED
            else:
                keep.append(i)
        return keep

    def _spend(self, order: list[int], plan: Plan, service: ServiceEstimate) -> list[int]:
        cost = service.item_s if self.cfg.hard_unit == "gpu_s" else 1.0
        floors = [0.0 if plan.ranks[i] == 0 else self.cfg.reserve for i in order]
        grant = self._take([(cost, f) for f in floors])
        for i in order[grant.granted:]:
            plan.kept[i] = Decider.EDGE_BUDGET
        plan.cost_s = cost if self.cfg.hard_unit == "gpu_s" else 0.0
        return order[:grant.granted]

    def _take(self, items: list[tuple[float, float]]) -> Grant:
        try:
            grant = self.bucket.take(items)
            self._refresh_share()
            return grant
        except redis.RedisError as exc:
            grant = self.local.take(items)
            log.warning("budget_unreachable", error=str(exc), granted=grant.granted, asked=len(items),
                        share=round(self._share, 3))
            return grant

    def _refresh_share(self) -> None:
        """1 / live edge workers (from their heartbeats), unless a share is configured."""
        if self.cfg.fallback_share is not None or time.monotonic() - self._share_at < SHARE_REFRESH_S:
            return
        self._share_at = time.monotonic()
        live = sum(1 for _ in self.client.scan_iter(match=self.keys.heartbeat_pattern("edge"), count=1000))
        share = 1.0 / max(1, live)
        if share != self._share:
            self._share = share
            self.local.resize(self.bucket.capacity * share, self.bucket.rate * share)

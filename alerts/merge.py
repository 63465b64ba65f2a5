"""Merge edge and cloud verdicts into exactly one final verdict per frame.

Rules:

- a confident edge verdict is final at once (decided by ``edge``, or by ``edge_budget`` /
  ``edge_shed`` when the switcher wanted the cloud but the budget or backpressure kept the item);
- an offloaded frame (edge ``confident=False``) waits for its cloud verdict: a usable cloud
  verdict is final (``cloud``); a failed one makes the edge verdict final (``edge_cloud_failed``);
  none by ``captured_at + alerts.cloud_timeout_s`` makes the edge verdict final (``edge_timeout``);
- a cloud verdict read before its edge verdict: a usable one is final at once (the decision does
  not need the edge); a failed one is parked in ``keys.pending_cloud`` until the edge verdict
  comes (or the deadline passes with no edge verdict at all, which is dead-lettered).

State for waiting frames lives in Redis (``keys.pending_verdicts()`` scored by deadline plus
``keys.pending_edge``), so another or a restarted alerts process carries on. The final write is
one Lua call: ``SET keys.final_done NX`` + XADD to the final stream + clean-up + statistics, so
however often an input is redelivered or two processes race, a frame gets one final verdict.
A race between two processes on the two halves of one frame can only delay its verdict to the
timeout fallback, never drop or duplicate it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import redis
import structlog

from alerts.stats import final_increments
from fallwatch.defaults import FINAL_MAXLEN, PENDING_TTL_S
from fallwatch.keys import Keys, text
from fallwatch.schemas import CloudVerdict, Decider, EdgeVerdict, FinalVerdict, encode
from fallwatch.settings import AlertsSettings
from fallwatch.streams import write_dead_letter

log = structlog.get_logger(__name__)

# Final on the edge without an offload: confident, or kept by the cloud budget or backpressure.
KEPT_ON_EDGE = frozenset({Decider.EDGE, Decider.EDGE_BUDGET, Decider.EDGE_SHED})

_FINALIZE = """
if not redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', ARGV[3]) then return false end
local n = tonumber(ARGV[5])
local xargs = {KEYS[2], 'MAXLEN', '~', ARGV[4], '*'}
for i = 6, 5 + n do xargs[#xargs + 1] = ARGV[i] end
local id = redis.call('XADD', unpack(xargs))
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4], KEYS[5])
for i = 6 + n, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[6], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[7], ARGV[i], ARGV[i + 1])
end
return id
"""

# A frame finalised before its ground truth was known (cloud verdict read before the edge
# verdict) is scored when the edge verdict arrives; the marker 'u<is_fall>' becomes 's'.
_SCORE_LATE = """
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 1) ~= 'u' then return false end
local fall = string.sub(v, 2, 2) == '1'
local f
if ARGV[1] == '1' then f = fall and 'tp' or 'fn' else f = fall and 'fp' or 'tn' end
for i = 2, #KEYS do
  redis.call('HINCRBY', KEYS[i], f, 1)
  redis.call('HINCRBY', KEYS[i], 'scored', 1)
end
redis.call('SET', KEYS[1], 's', 'KEEPTTL')
return f
"""


class MergeOutcome(StrEnum):
    FINAL = "final"          # a final verdict was written
    DUPLICATE = "duplicate"  # the frame already had its final verdict
    WAITING = "waiting"      # parked until the other half or the deadline
    DEAD = "dead"            # nothing usable arrived by the deadline (dead-lettered)


@dataclass(frozen=True)
class MergeResult:
    outcome: MergeOutcome
    frame_id: str
    final: FinalVerdict | None = None


def cloud_usable(c: CloudVerdict) -> bool:
    return c.ok and (c.is_fall is not None or c.p_fall is not None)


def cloud_decision(c: CloudVerdict) -> tuple[bool, float]:
    """(is_fall, p_fall) of a usable cloud verdict; either field may be missing."""
    is_fall = c.is_fall if c.is_fall is not None else bool(c.p_fall is not None and c.p_fall >= 0.5)
    p_fall = c.p_fall if c.p_fall is not None else (1.0 if is_fall else 0.0)
    return is_fall, p_fall


class VerdictMerger:
    """Turns EdgeVerdict / CloudVerdict messages into FinalVerdicts on ``keys.final_stream()``."""

    def __init__(self, client: redis.Redis, keys: Keys, cfg: AlertsSettings,
                 clock: Callable[[], float] = time.time, worker: str = ""):
        self.client, self.keys, self.cfg, self.clock, self.worker = client, keys, cfg, clock, worker
        self.done_ttl_s = int(max(3600, 4 * cfg.cloud_timeout_s))
        self._finalize = client.register_script(_FINALIZE)
        self._score_late = client.register_script(_SCORE_LATE)

    # --- inputs ----------------------------------------------------------------------------
    def handle(self, msg: EdgeVerdict | CloudVerdict) -> MergeResult:
        if isinstance(msg, EdgeVerdict):
            return self.on_edge(msg)
        return self.on_cloud(msg)

    def on_edge(self, v: EdgeVerdict) -> MergeResult:
        if v.confident:  # decided_by: edge_budget / edge_shed when the budget or backpressure kept it
            return self.finalize(self._from_edge(v, v.decided_by or Decider.EDGE))
        if self.client.exists(self.keys.final_done(v.frame_id)):
            self._score_if_late(v)
            return MergeResult(MergeOutcome.DUPLICATE, v.frame_id)
        parked = self.client.get(self.keys.pending_cloud(v.frame_id))
        if parked is not None:
            cloud = CloudVerdict.model_validate_json(parked)
            if cloud_usable(cloud):
                return self.finalize(self._from_cloud(cloud, v))
            return self.finalize(self._from_edge(v, Decider.EDGE_CLOUD_FAILED))
        self._park(self.keys.pending_edge(v.frame_id), v.to_json(), v.frame_id, v.captured_at)
        return MergeResult(MergeOutcome.WAITING, v.frame_id)

    def on_cloud(self, c: CloudVerdict) -> MergeResult:
        if self.client.exists(self.keys.final_done(c.frame_id)):
            log.info("late_cloud_verdict", frame=c.frame_id, ok=c.ok)
            self.client.delete(self.keys.pending_cloud(c.frame_id))
            return MergeResult(MergeOutcome.DUPLICATE, c.frame_id)
        raw = self.client.get(self.keys.pending_edge(c.frame_id))
        edge = EdgeVerdict.model_validate_json(raw) if raw is not None else None
        if cloud_usable(c):
            return self.finalize(self._from_cloud(c, edge))
        log.warning("cloud_failed", frame=c.frame_id, error=c.error or "no decision in the cloud verdict")
        if edge is not None:
            return self.finalize(self._from_edge(edge, Decider.EDGE_CLOUD_FAILED))
        self._park(self.keys.pending_cloud(c.frame_id), c.to_json(), c.frame_id, c.captured_at)
        return MergeResult(MergeOutcome.WAITING, c.frame_id)

    # --- deadlines -------------------------------------------------------------------------
    def expire(self, limit: int = 100) -> list[MergeResult]:
        """Finalise frames whose cloud deadline has passed with their edge verdict."""
        due = self.client.zrangebyscore(self.keys.pending_verdicts(), "-inf", self.clock(), start=0, num=limit)
        return [self._expire_one(text(fid)) for fid in due]

    def _expire_one(self, frame_id: str) -> MergeResult:
        raw = self.client.get(self.keys.pending_edge(frame_id))
        if raw is not None:
            edge = EdgeVerdict.model_validate_json(raw)
            log.warning("cloud_timeout", frame=frame_id, camera=edge.camera_id)
            return self.finalize(self._from_edge(edge, Decider.EDGE_TIMEOUT))
        if not self.client.zrem(self.keys.pending_verdicts(), frame_id):
            return MergeResult(MergeOutcome.DUPLICATE, frame_id)  # another process took it
        self.client.delete(self.keys.pending_cloud(frame_id))
        if self.client.exists(self.keys.final_done(frame_id)):
            return MergeResult(MergeOutcome.DUPLICATE, frame_id)
        write_dead_letter(self.client, self.keys.dead_letter_stream(), self.keys.pending_verdicts(), frame_id,
                          "no_edge_verdict", "the cloud job failed and no edge verdict arrived by the deadline",
                          self.worker)
        log.error("no_verdict_for_frame", frame=frame_id)
        return MergeResult(MergeOutcome.DEAD, frame_id)

    # --- writing ---------------------------------------------------------------------------
    def finalize(self, final: FinalVerdict) -> MergeResult:
        """Write the final verdict unless the frame already has one."""
        fid = final.frame_id
        fields = [x for kv in encode(final).items() for x in kv]
        incs = [x for kv in final_increments(final).items() for x in kv]
        marker = "s" if final.gt_fall is not None else f"u{int(final.is_fall)}"
        k = self.keys
        entry_id = self._finalize(
            keys=[k.final_done(fid), k.final_stream(), k.pending_verdicts(), k.pending_edge(fid),
                  k.pending_cloud(fid), k.stats(), k.camera_stats(final.camera_id)],
            args=[fid, marker, self.done_ttl_s, FINAL_MAXLEN, len(fields), *fields, *incs],
        )
        if entry_id is None:
            self.client.zrem(k.pending_verdicts(), fid)
            self.client.delete(k.pending_edge(fid), k.pending_cloud(fid))
            return MergeResult(MergeOutcome.DUPLICATE, fid)
        log.info("final_verdict", frame=fid, camera=final.camera_id, is_fall=final.is_fall,
                 p_fall=round(final.p_fall, 4), decided_by=final.decided_by.value,
                 latency_ms=round(final.latency_ms, 1))
        return MergeResult(MergeOutcome.FINAL, fid, final)

    def _park(self, key: str, body: bytes, frame_id: str, captured_at: float) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(key, body, ex=PENDING_TTL_S)
            pipe.zadd(self.keys.pending_verdicts(), {frame_id: captured_at + self.cfg.cloud_timeout_s})
            pipe.execute()

    def _score_if_late(self, v: EdgeVerdict) -> None:
        if v.gt_fall is not None:
            self._score_late(keys=[self.keys.final_done(v.frame_id), self.keys.stats(),
                                   self.keys.camera_stats(v.camera_id)], args=[int(v.gt_fall)])

    # --- building final verdicts -------------------------------------------------------------
    def _latency_ms(self, captured_at: float, now: float) -> float:
        return max(0.0, now - captured_at) * 1000.0

    def _from_edge(self, v: EdgeVerdict, by: Decider) -> FinalVerdict:
        now = self.clock()
        return FinalVerdict(
            frame_id=v.frame_id, camera_id=v.camera_id, captured_at=v.captured_at, is_fall=v.is_fall,
            p_fall=v.p_fall, decided_by=by, offloaded=by not in KEPT_ON_EDGE,
            latency_ms=self._latency_ms(v.captured_at, now), decided_at=now, gt_fall=v.gt_fall,
        )

    def _from_cloud(self, c: CloudVerdict, edge: EdgeVerdict | None) -> FinalVerdict:
        now = self.clock()
        is_fall, p_fall = cloud_decision(c)
        return FinalVerdict(
            frame_id=c.frame_id, camera_id=c.camera_id, captured_at=c.captured_at, is_fall=is_fall,
            p_fall=p_fall, decided_by=Decider.CLOUD, offloaded=True,
            latency_ms=self._latency_ms(c.captured_at, now), decided_at=now,
            gt_fall=edge.gt_fall if edge is not None else None, description=c.description,
        )

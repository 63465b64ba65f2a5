"""The edge worker: frames stream → ViLT + switcher → verdicts stream, or the RQ cloud queue.

Delivery is at-least-once. Entries are read through the ``edge`` consumer group and XACKed only
after their outputs (verdicts, kept pixels, offload job) are written; a worker that dies leaves
its entries pending, and another worker claims them with XAUTOCLAIM. Outputs carry the frame id,
so the alerts service removes duplicates.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import redis
import structlog

from edge_worker import trimmed
from edge_worker.audit import LiveDmd
from edge_worker.budget import Router
from edge_worker.decode import DecodedFrame, decode_entry
from fallwatch.images import PoisonInput
from fallwatch.keys import Keys, text
from fallwatch.metrics import EdgeMetrics
from fallwatch.offload import enqueue_offload
from fallwatch.role import RoleLoop
from fallwatch.runtime import Heartbeat, worker_name
from fallwatch.schemas import EdgeVerdict, OffloadRequest, encode
from fallwatch.settings import Settings
from fallwatch.streams import ensure_group, job_queue, read_own_pending, write_dead_letter
from switcher.publish import SwitcherWatcher

log = structlog.get_logger(__name__)

class Scorer(Protocol):
    model_id: str

    def score(self, images: Sequence[Any]) -> Any: ...


class AgreementModel(Protocol):
    threshold: float | None

    def agreement(self, features: np.ndarray) -> np.ndarray: ...


@dataclass
class EdgeStepReport:
    read: int = 0
    scored: int = 0
    confident: int = 0
    offloaded: int = 0
    kept: dict[str, int] = field(default_factory=dict)  # would-be offloads kept: edge_budget / edge_shed
    dead_lettered: int = 0
    claimed: int = 0
    edge_ms: float = 0.0
    entry_ids: list[str] = field(default_factory=list)
    audited: int = 0


class EdgeWorker(RoleLoop):
    """One consumer of the edge group. Drive it with :meth:`run` or, in tests, :meth:`step`."""

    log_name = "edge_worker"
    outage_errors = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError)
    _own_first = False  # after an outage: this worker's own pending entries before new ones

    def __init__(self, settings: Settings, client: redis.Redis, keys: Keys, model: Scorer,
                 switcher: AgreementModel | None = None, name: str | None = None,
                 metrics: EdgeMetrics | None = None):
        self.settings = settings
        self.cfg = settings.edge
        self.client = client
        self.keys = keys
        self.model = model
        self.switcher = switcher
        self.name = name or worker_name("edge")
        self.queues = [job_queue(client, q) for q in keys.offload_queues(settings.cloud.queue)]
        self.queue = self.queues[0]
        self.router = Router(settings, client, keys, [q.key for q in self.queues], default_target(settings, switcher))
        self._last_claim = 0.0
        self.metrics = metrics or EdgeMetrics.create()
        self.beat = Heartbeat(client, keys, "edge", self.name, settings.metrics)
        self._thresholds = {c.id: c.agreement_threshold for c in settings.cameras if c.agreement_threshold is not None}
        self.live = LiveDmd(settings, client, keys, model)
        self.switcher_version = getattr(switcher, "version", None)
        self.watcher = SwitcherWatcher(client, keys, self.live.edge_model_id, self.live.questions,
                                       settings.dmd.reload_check_s)

    # --- set-up ------------------------------------------------------------------------
    def ensure_group(self) -> None:
        ensure_group(self.client, self.keys.frames_stream(), self.keys.edge_group())

    def threshold_for(self, camera_id: str) -> float | None:
        if camera_id in self._thresholds:
            return self._thresholds[camera_id]
        if self.settings.switcher.threshold is not None:
            return self.settings.switcher.threshold
        return self.switcher.threshold if self.switcher is not None else None

    # --- reading -----------------------------------------------------------------------
    def read(self, block_ms: int | None = None) -> list[tuple[str, dict]]:
        """New entries for this consumer (at most batch_size)."""
        block = self.cfg.block_ms if block_ms is None else block_ms
        resp = self.client.xreadgroup(self.keys.edge_group(), self.name, {self.keys.frames_stream(): ">"},
                                      count=self.cfg.batch_size, block=block or None)
        return [(text(eid), fields) for _stream, entries in (resp or []) for eid, fields in entries]

    def claim(self) -> list[tuple[str, dict]]:
        """Entries left pending by dead consumers for longer than claim_idle_ms."""
        resp = trimmed.claim(self.client, self.keys, self.name, self.cfg.claim_idle_ms, self.cfg.batch_size)
        entries = [(text(e[0]), _fields(e[1])) for e in resp[1] or [] if e and e[1]]
        if len(entries) < len(resp[1] or []):  # Redis < 7 claims trimmed entries as nil
            live = {eid for eid, _fields in entries}  # claimed with their data: scored below, even if trimmed since
            self._drop_trimmed([d for d in self._trimmed_own_pending() if text(d) not in live])
        return entries

    def _drop_trimmed(self, deleted: list) -> None:
        """Acknowledge and count entries trimmed by MAXLEN while pending: nothing left to score."""
        trimmed.drop(self.client, self.keys, deleted)

    def own_pending(self) -> list[tuple[str, dict]]:
        """After an outage: the entries this worker read but whose outputs never got written (a
        failover, Redis out of memory), scored at once rather than after ``claim_idle_ms``."""
        entries = read_own_pending(self.client, self.keys.edge_group(), self.name, self.keys.frames_stream(),
                                   self.cfg.batch_size)
        self._own_first = bool(entries)
        self._drop_trimmed([e.id for e in entries if e.fields is None])
        return [(e.id, e.fields) for e in entries if e.fields is not None]

    def _trimmed_own_pending(self) -> list[bytes]:
        """Ids pending for this consumer whose entries are gone. Redis 6.2's XAUTOCLAIM hands them over
        without their ids; left pending, they would fill every later claim and hide live entries."""
        stream = self.keys.frames_stream()
        pending = self.client.xpending_range(stream, self.keys.edge_group(), "-", "+", 10 * self.cfg.batch_size,
                                             consumername=self.name)
        pipe = self.client.pipeline(transaction=False)
        for p in pending:
            pipe.xrange(stream, p["message_id"], p["message_id"])
        return [p["message_id"] for p, found in zip(pending, pipe.execute()) if not found]

    # --- processing --------------------------------------------------------------------
    def step(self, block_ms: int | None = None) -> EdgeStepReport:
        """Claim stale entries when due, else read new ones; process one batch."""
        self.reload_switcher()
        now = time.monotonic()
        claimed = []
        if now - self._last_claim >= self.cfg.claim_idle_ms / 2000:
            self._last_claim = now
            claimed = self.claim()
        if self._own_first and not claimed:
            claimed = self.own_pending()
        entries = claimed or self.read(block_ms)
        result = self.process(entries)
        result.claimed = len(claimed)
        self.heartbeat()
        return result

    def reload_switcher(self) -> None:
        """Between batches: swap in a newly published switcher version."""
        swapped = self.watcher.poll(self.switcher_version)
        if swapped is not None:
            self.switcher, self.switcher_version = swapped, swapped.version

    def process(self, entries: list[tuple[str, dict]]) -> EdgeStepReport:
        result = EdgeStepReport(read=len(entries), entry_ids=[e for e, _ in entries])
        if not entries:
            return result
        frames = self._decode_all(entries, result)
        if frames:
            self._score_and_publish(frames, result)
        else:
            self.client.xack(self.keys.frames_stream(), self.keys.edge_group(), *result.entry_ids)
        return result

    def _decode_all(self, entries: list[tuple[str, dict]], result: EdgeStepReport) -> list[DecodedFrame]:
        frames = []
        for entry_id, fields in entries:
            try:
                frames.append(decode_entry(entry_id, fields, self.cfg.max_image_bytes, self.cfg.max_image_pixels))
            except PoisonInput as exc:
                self.dead_letter(entry_id, exc.reason, str(exc))
                result.dead_lettered += 1
        return frames

    def dead_letter(self, entry_id: str, reason: str, error: str) -> None:
        write_dead_letter(self.client, self.keys.dead_letter_stream(), self.keys.frames_stream(), entry_id, reason,
                          error, self.name)
        self.metrics.dead_letter(reason)

    def _score_and_publish(self, frames: list[DecodedFrame], result: EdgeStepReport) -> None:
        scores = self.model.score([f.image for f in frames])
        agreement = self.switcher.agreement(scores.features) if self.switcher is not None else None
        per_item_ms = scores.wall_s * 1000 / len(frames)
        held = self.router.threshold(agreement)
        verdicts = [self._verdict(f, scores.p_fall[i], None if agreement is None else agreement[i], per_item_ms, held)
                    for i, f in enumerate(frames)]
        offloads = self._plan(frames, verdicts, result)
        self.live.stash_offloads(verdicts, scores.features)
        self._write(verdicts, offloads, result.entry_ids)
        result.audited = self.live.audit(frames, verdicts, scores.features, self._offload_request)
        result.scored = len(frames)
        result.offloaded = len(offloads)
        result.confident = len(frames) - len(offloads) - sum(result.kept.values())
        result.edge_ms = scores.wall_s * 1000
        self.metrics.observe_batch(len(frames), scores.wall_s)
        self.metrics.observe_decisions(result.confident, result.offloaded)

    def _plan(self, frames: list[DecodedFrame], verdicts: list[EdgeVerdict], result: EdgeStepReport):
        """Rank the would-be offloads, keep on the edge what the budget or backpressure refuses;
        the rest as (frame, verdict, rank, debited GPU seconds), highest priority first."""
        wanted = [i for i, v in enumerate(verdicts) if not v.confident]
        if not wanted:
            return []
        plan = self.router.plan([verdicts[i] for i in wanted],
                                [frames[i].msg.captured_at + self.settings.alerts.cloud_timeout_s for i in wanted])
        for j, by in plan.kept.items():
            i = wanted[j]
            verdicts[i] = verdicts[i].model_copy(update={"confident": True, "decided_by": by})
            result.kept[by.value] = result.kept.get(by.value, 0) + 1
        if plan.kept:
            self._count_kept(result.kept)
        return [(frames[wanted[j]], verdicts[wanted[j]], plan.ranks[j], plan.cost_s) for j in plan.send]

    def _count_kept(self, kept: dict[str, int]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for by, n in kept.items():
            pipe.incrby(self.keys.counter(f"offloads_{by}"), n)
            self.metrics.kept(by, n)
        pipe.execute()
        log.info("offloads_kept_on_edge", worker=self.name, **kept)

    def _verdict(self, frame: DecodedFrame, p_fall: float, agreement: float | None, edge_ms: float,
                 held: float | None = None) -> EdgeVerdict:
        msg = frame.msg
        threshold = held if held is not None else self.threshold_for(msg.camera_id)
        if self.settings.switcher.offload_all:
            confident = False
        elif agreement is None or threshold is None:
            confident = True
        else:
            confident = bool(agreement >= threshold)
        return EdgeVerdict(
            frame_id=msg.frame_id, camera_id=msg.camera_id, captured_at=msg.captured_at, p_fall=float(p_fall),
            is_fall=bool(p_fall >= 0.5), agreement=None if agreement is None else float(agreement),
            threshold=threshold, confident=confident, edge_ms=edge_ms, gt_fall=msg.gt_fall, worker=self.name,
            switcher_version=self.switcher_version,
        )

    def _write(self, verdicts: list[EdgeVerdict], offloads: list[tuple[DecodedFrame, EdgeVerdict, int, float]],
               entry_ids: list[str]) -> None:
        """Pixels, verdicts, offload jobs and the acknowledgement in one transaction: an entry still pending
        has no outputs, so one trimmed while pending was dropped, never also delivered."""
        pipe = self.client.pipeline(transaction=True)
        pipe.multi()  # RQ queues its job in the same MULTI
        ttl = self.settings.ingest.pixels_ttl_s
        for frame, *_ in offloads:
            key = self.keys.pixels(frame.msg.frame_id)
            pipe.hset(key, mapping={b"p%d" % i: img for i, img in enumerate(frame.jpegs)})
            pipe.expire(key, ttl)
        for v in verdicts:
            pipe.xadd(self.keys.verdicts_stream(), encode(v))
        if offloads:
            self.enqueue([self._offload_request(f, v, rank, cost) for f, v, rank, cost in offloads], pipe)
        pipe.xack(self.keys.frames_stream(), self.keys.edge_group(), *entry_ids)
        if pipe.execute()[-1] < len(entry_ids):  # some were counted as trimmed meanwhile: delivered after all
            trimmed.uncount(self.client, self.keys, entry_ids)

    def _offload_request(self, frame: DecodedFrame, verdict: EdgeVerdict, rank: int = 0,
                         cost_s: float = 0.0) -> OffloadRequest:
        msg = frame.msg
        return OffloadRequest(
            frame_id=msg.frame_id, camera_id=msg.camera_id, captured_at=msg.captured_at, kind=msg.kind,
            n_images=msg.n_images, pixels_key=self.keys.pixels(msg.frame_id), edge_p_fall=verdict.p_fall,
            agreement=verdict.agreement, deadline=msg.captured_at + self.settings.alerts.cloud_timeout_s,
            gt_fall=msg.gt_fall, features_key=self.keys.edge_features(msg.frame_id),
            switcher_version=verdict.switcher_version, rank=rank, budget_cost_s=cost_s,
        )

    def enqueue(self, requests: list[OffloadRequest], pipeline: Any = None) -> None:
        """Micro-batched offload: one RQ job per cloud batch, JSON-serialised, on the queue of its rank
        (queued on ``pipeline`` if given)."""
        for rank, queue in enumerate(self.queues):
            self._enqueue_on(queue, [r for r in requests if min(r.rank, len(self.queues) - 1) == rank], pipeline)

    def _enqueue_on(self, queue: Any, requests: list[OffloadRequest], pipeline: Any = None) -> None:
        size = self.settings.cloud.batch_size
        for start in range(0, len(requests), size):
            enqueue_offload(queue, requests[start:start + size], self.settings, pipeline)

    # --- liveness ----------------------------------------------------------------------
    def heartbeat(self, force: bool = False) -> None:
        if self.beat.beat(force):
            for queue in self.queues:
                self.metrics.set_queue_depth(queue.name, queue.count)

    # --- the role loop (fallwatch.role.RoleLoop.run) ----------------------------------
    def on_start(self) -> None:
        self.ensure_group()
        self.heartbeat(force=True)

    def started_fields(self) -> dict[str, Any]:
        return {"model": self.model.model_id, "switcher": self.switcher is not None, "batch_size": self.cfg.batch_size}

    def on_outage(self, exc: BaseException) -> None:
        self._own_first = True

    def run_once(self) -> EdgeStepReport | None:
        try:
            return self.step()
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()  # the server lost its data (e.g. restarted without AOF)
            return None

    def on_stop(self) -> None:
        try:
            self.beat.clear()
        except redis.RedisError as exc:  # stopped during an outage: the heartbeat key expires by itself
            log.warning("heartbeat_not_cleared", worker=self.name, error=str(exc))


def _fields(flat: list) -> dict:
    """An entry's field/value list as a script returns it, as a dict."""
    return dict(zip(flat[::2], flat[1::2]))


def default_target(settings: Settings, switcher: AgreementModel | None) -> float | None:
    """target_rate mode's target: the configured one, else the switcher checkpoint's calibrated share."""
    if settings.cloud.budget.target_rate is not None:
        return settings.cloud.budget.target_rate
    calibration = (getattr(switcher, "card", None) or {}).get("calibration") or {}
    fraction = calibration.get("offload_fraction")
    return float(fraction) if fraction else None

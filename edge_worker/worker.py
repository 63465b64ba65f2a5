"""The edge worker: frames stream → ViLT + switcher → verdicts stream, or the RQ cloud queue.

Delivery is at-least-once. Entries are read through the ``edge`` consumer group and XACKed only
after their outputs (verdicts, kept pixels, offload job) are written; a worker that dies leaves
its entries pending, and another worker claims them with XAUTOCLAIM. Outputs carry the frame id,
so the alerts service removes duplicates.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import redis
import structlog
from rq import Queue, Retry
from rq.callbacks import Callback
from rq.serializers import JSONSerializer

from edge_worker.decode import DecodedFrame, decode_entry
from fallwatch.images import PoisonInput
from fallwatch.keys import Keys
from fallwatch.metrics import EdgeMetrics
from fallwatch.runtime import Heartbeat, worker_name
from fallwatch.schemas import DeadLetter, EdgeVerdict, OffloadRequest, encode, to_dict
from fallwatch.settings import Settings

log = structlog.get_logger(__name__)

# The cloud worker's job functions, named by string: the edge never imports cloud code.
OFFLOAD_JOB = "cloud_worker.jobs.score_offloads"
OFFLOAD_FAILED = "cloud_worker.jobs.on_offload_failure"


class Scorer(Protocol):
    model_id: str

    def score(self, images: Sequence[Any]) -> Any: ...


class AgreementModel(Protocol):
    threshold: float | None

    def agreement(self, features: np.ndarray) -> np.ndarray: ...


@dataclass
class StepResult:
    read: int = 0
    scored: int = 0
    confident: int = 0
    offloaded: int = 0
    dead_lettered: int = 0
    claimed: int = 0
    edge_ms: float = 0.0
    entry_ids: list[str] = field(default_factory=list)


class EdgeWorker:
    """One consumer of the edge group. Drive it with :meth:`run` or, in tests, :meth:`step`."""

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
        self.queue = Queue(keys.cloud_queue(settings.cloud.queue), connection=client, serializer=JSONSerializer)
        self._last_claim = 0.0
        self.metrics = metrics or EdgeMetrics.create()
        self.beat = Heartbeat(client, keys, "edge", self.name, settings.metrics)
        self._thresholds = {c.id: c.agreement_threshold for c in settings.cameras if c.agreement_threshold is not None}

    # --- set-up ------------------------------------------------------------------------
    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.keys.frames_stream(), self.keys.edge_group(), id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

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
        return [(_s(eid), fields) for _stream, entries in (resp or []) for eid, fields in entries]

    def claim(self) -> list[tuple[str, dict]]:
        """Entries left pending by dead consumers for longer than claim_idle_ms."""
        resp = self.client.xautoclaim(self.keys.frames_stream(), self.keys.edge_group(), self.name,
                                      min_idle_time=self.cfg.claim_idle_ms, start_id="0-0", count=self.cfg.batch_size)
        entries = resp[1]
        deleted = list(resp[2]) if len(resp) > 2 else []
        if any(fields is None for _eid, fields in entries):  # Redis < 7 claims trimmed entries as nil
            live = {_s(eid) for eid, fields in entries if fields}  # claimed with their data: scored below,
            deleted += [d for d in self._trimmed_own_pending() if _s(d) not in live]  # even if trimmed since
        if deleted:  # trimmed by MAXLEN while pending: nothing left to score
            self.client.xack(self.keys.frames_stream(), self.keys.edge_group(), *deleted)
            self.client.incrby(self.keys.counter("frames_trimmed_pending"), len(deleted))
        return [(_s(eid), fields) for eid, fields in entries if fields]

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
    def step(self, block_ms: int | None = None) -> StepResult:
        """Claim stale entries when due, else read new ones; process one batch."""
        now = time.monotonic()
        claimed = []
        if now - self._last_claim >= self.cfg.claim_idle_ms / 2000:
            self._last_claim = now
            claimed = self.claim()
        entries = claimed or self.read(block_ms)
        result = self.process(entries)
        result.claimed = len(claimed)
        self.heartbeat()
        return result

    def process(self, entries: list[tuple[str, dict]]) -> StepResult:
        result = StepResult(read=len(entries), entry_ids=[e for e, _ in entries])
        if not entries:
            return result
        frames = self._decode_all(entries, result)
        if frames:
            self._score_and_publish(frames, result)
        else:
            self.client.xack(self.keys.frames_stream(), self.keys.edge_group(), *result.entry_ids)
        return result

    def _decode_all(self, entries: list[tuple[str, dict]], result: StepResult) -> list[DecodedFrame]:
        frames = []
        for entry_id, fields in entries:
            try:
                frames.append(decode_entry(entry_id, fields, self.cfg.max_image_bytes, self.cfg.max_image_pixels))
            except PoisonInput as exc:
                self.dead_letter(entry_id, exc.reason, str(exc))
                result.dead_lettered += 1
        return frames

    def dead_letter(self, entry_id: str, reason: str, error: str) -> None:
        letter = DeadLetter(source=self.keys.frames_stream(), entry_id=entry_id, reason=reason, error=error,
                            worker=self.name)
        self.client.xadd(self.keys.dead_letter_stream(), encode(letter), maxlen=100_000, approximate=True)
        self.metrics.dead_letter(reason)
        log.warning("frame_dead_lettered", entry_id=entry_id, reason=reason, error=error)

    def _score_and_publish(self, frames: list[DecodedFrame], result: StepResult) -> None:
        scores = self.model.score([f.image for f in frames])
        agreement = self.switcher.agreement(scores.features) if self.switcher is not None else None
        per_item_ms = scores.wall_s * 1000 / len(frames)
        verdicts = [self._verdict(f, scores.p_fall[i], None if agreement is None else agreement[i], per_item_ms)
                    for i, f in enumerate(frames)]
        offloads = [(f, v) for f, v in zip(frames, verdicts) if not v.confident]
        self._write(verdicts, offloads, result.entry_ids)
        result.scored = len(frames)
        result.offloaded = len(offloads)
        result.confident = len(frames) - len(offloads)
        result.edge_ms = scores.wall_s * 1000
        self.metrics.observe_batch(len(frames), scores.wall_s)
        self.metrics.observe_decisions(result.confident, result.offloaded)

    def _verdict(self, frame: DecodedFrame, p_fall: float, agreement: float | None, edge_ms: float) -> EdgeVerdict:
        msg = frame.msg
        threshold = self.threshold_for(msg.camera_id)
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
        )

    def _write(self, verdicts: list[EdgeVerdict], offloads: list[tuple[DecodedFrame, EdgeVerdict]],
               entry_ids: list[str]) -> None:
        """Pixels, verdicts, offload jobs and the acknowledgement in one transaction: an entry still pending
        has no outputs, so one trimmed while pending was dropped, never also delivered."""
        pipe = self.client.pipeline(transaction=True)
        pipe.multi()  # RQ queues its job in the same MULTI
        ttl = self.settings.ingest.pixels_ttl_s
        for frame, _ in offloads:
            key = self.keys.pixels(frame.msg.frame_id)
            pipe.hset(key, mapping={b"p%d" % i: img for i, img in enumerate(frame.jpegs)})
            pipe.expire(key, ttl)
        for v in verdicts:
            pipe.xadd(self.keys.verdicts_stream(), encode(v))
        if offloads:
            self.enqueue([self._offload_request(f, v) for f, v in offloads], pipe)
        pipe.xack(self.keys.frames_stream(), self.keys.edge_group(), *entry_ids)
        pipe.execute()

    def _offload_request(self, frame: DecodedFrame, verdict: EdgeVerdict) -> OffloadRequest:
        msg = frame.msg
        return OffloadRequest(
            frame_id=msg.frame_id, camera_id=msg.camera_id, captured_at=msg.captured_at, kind=msg.kind,
            n_images=msg.n_images, pixels_key=self.keys.pixels(msg.frame_id), edge_p_fall=verdict.p_fall,
            agreement=verdict.agreement, deadline=msg.captured_at + self.settings.alerts.cloud_timeout_s,
            gt_fall=msg.gt_fall,
        )

    def enqueue(self, requests: list[OffloadRequest], pipeline: redis.client.Pipeline | None = None) -> None:
        """Micro-batched offload: one RQ job per cloud batch, JSON-serialised (queued on ``pipeline`` if given)."""
        size = self.settings.cloud.batch_size
        for start in range(0, len(requests), size):
            chunk = [to_dict(r) for r in requests[start:start + size]]
            retry = Retry(max=self.settings.cloud.retries) if self.settings.cloud.retries else None
            self.queue.enqueue(
                OFFLOAD_JOB, chunk, job_timeout=self.settings.cloud.job_timeout_s, retry=retry,
                on_failure=Callback(OFFLOAD_FAILED), result_ttl=300, failure_ttl=86400,
                ttl=int(self.settings.alerts.cloud_timeout_s) + 60, pipeline=pipeline,
            )

    # --- liveness ----------------------------------------------------------------------
    def heartbeat(self, force: bool = False) -> None:
        if self.beat.beat(force):
            self.metrics.set_queue_depth(self.queue.name, self.queue.count)

    def run(self, stop: threading.Event) -> None:
        """Process batches until ``stop`` is set. Redis outages are retried, never fatal."""
        self.ensure_group()
        self.heartbeat(force=True)
        log.info("edge_worker_started", worker=self.name, model=self.model.model_id,
                 switcher=self.switcher is not None, batch_size=self.cfg.batch_size)
        backoff = self.settings.redis.retry_base_s
        while not stop.is_set():
            try:
                self.step()
                backoff = self.settings.redis.retry_base_s
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("redis_unavailable", worker=self.name, error=str(exc), retry_in_s=backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.settings.redis.retry_cap_s)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self.ensure_group()  # the server lost its data (e.g. restarted without AOF)
        try:
            self.beat.clear()
        except redis.RedisError as exc:  # stopped during an outage: the heartbeat key expires by itself
            log.warning("heartbeat_not_cleared", worker=self.name, error=str(exc))
        log.info("edge_worker_stopped", worker=self.name)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

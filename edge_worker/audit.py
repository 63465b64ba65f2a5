"""Live DMD on the edge: audit sampling and the edge features the cloud side records.

An audit is an item the edge decided on its own (its verdict is final at once) that is also
sent to the cloud, so its cloud verdict becomes a DMD label and a check of the edge. The choice
is a hash of the frame id and ``switcher.audit_seed`` against ``switcher.audit_fraction``: the
same frames are audited on every replay, and the inclusion probability of every audited item is
exactly the audit fraction. Audits go to their own RQ queue (``keys.audit_queue``) that cloud
workers serve after the offload queues, with the offload deadline, no retries and no failure
callback: an audit never delays nor changes a verdict.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from fallwatch.dmd_store import EdgeContext, stash_features
from fallwatch.keys import Keys
from fallwatch.schemas import EdgeVerdict, OffloadRequest, to_dict
from fallwatch.settings import Settings

AUDIT_JOB = "cloud_worker.jobs.score_offloads"  # the offload job: the request's route tells them apart


def audit_draw(frame_id: str, seed: str) -> float:
    """A uniform number in [0, 1) fixed by the frame id and the site seed."""
    digest = hashlib.blake2b(f"{seed}\x00{frame_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def chosen_for_audit(frame_id: str, fraction: float, seed: str) -> bool:
    return fraction > 0 and audit_draw(frame_id, seed) < fraction


class LiveDmd:
    """The edge worker's part of live DMD: keeps features for the cloud side and sends audits."""

    def __init__(self, settings: Settings, client: redis.Redis, keys: Keys, model: Any):
        self.settings, self.client, self.keys = settings, client, keys
        self.fraction, self.seed = settings.switcher.audit_fraction, settings.switcher.audit_seed
        self.queue = Queue(keys.audit_queue(settings.cloud.queue), connection=client, serializer=JSONSerializer)
        questions = tuple(getattr(model, "questions", None) or settings.edge.questions)
        self.edge_model_id, self.questions = str(model.model_id), questions

    def context(self, switcher_version: str | None) -> EdgeContext:
        return EdgeContext(self.edge_model_id, self.questions, switcher_version)

    def stash_offloads(self, verdicts: Sequence[EdgeVerdict], features: np.ndarray) -> None:
        """Features of the offloaded items, written before their job is enqueued."""
        todo = [(i, v) for i, v in enumerate(verdicts) if not v.confident]
        if not todo:
            return
        pipe = self.client.pipeline(transaction=False)
        for i, v in todo:
            stash_features(pipe, self.keys, v.frame_id, features[i], self.context(v.switcher_version),
                           self.settings.dmd.features_ttl_s)
        pipe.execute()

    def pick(self, verdicts: Sequence[EdgeVerdict]) -> list[int]:
        """Positions of the edge-decided items chosen for audit."""
        return [i for i, v in enumerate(verdicts) if v.confident and chosen_for_audit(v.frame_id, self.fraction, self.seed)]

    def audit(self, frames: Sequence[Any], verdicts: Sequence[EdgeVerdict], features: np.ndarray,
              request: Any) -> int:
        """Keep pixels and features of the chosen items and enqueue one audit job; returns how many.
        ``request(frame, verdict)`` builds the item's OffloadRequest as for an offload."""
        chosen = self.pick(verdicts)
        if not chosen:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for i in chosen:
            self._keep(pipe, frames[i], verdicts[i], features[i])
        pipe.execute()
        reqs = [self._audit_request(request(frames[i], verdicts[i])) for i in chosen]
        self.enqueue(reqs)
        return len(reqs)

    def _keep(self, pipe: Any, frame: Any, verdict: EdgeVerdict, features: np.ndarray) -> None:
        key = self.keys.pixels(verdict.frame_id)
        pipe.hset(key, mapping={b"p%d" % i: img for i, img in enumerate(frame.jpegs)})
        pipe.expire(key, self.settings.ingest.pixels_ttl_s)
        stash_features(pipe, self.keys, verdict.frame_id, features, self.context(verdict.switcher_version),
                       self.settings.dmd.features_ttl_s)

    def _audit_request(self, req: OffloadRequest) -> OffloadRequest:
        return OffloadRequest.model_validate({**req.model_dump(), "route": "audit", "inclusion": self.fraction,
                                              "features_key": self.keys.edge_features(req.frame_id)})

    def enqueue(self, requests: list[OffloadRequest]) -> None:
        size = self.settings.cloud.batch_size
        for start in range(0, len(requests), size):
            self.queue.enqueue(
                AUDIT_JOB, [to_dict(r) for r in requests[start:start + size]],
                job_timeout=self.settings.cloud.job_timeout_s, result_ttl=300, failure_ttl=86400,
                ttl=int(self.settings.alerts.cloud_timeout_s) + 60,
            )

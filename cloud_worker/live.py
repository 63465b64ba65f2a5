"""Live DMD on the cloud side: every scored item with edge features becomes a store record.

The edge left the item's features under ``OffloadRequest.features_key`` (with a TTL); once the
cloud verdict exists, the record (both fall probabilities, agreement, route, inclusion
probability, edge model, questions, switcher version) is queued on the same pipeline that
publishes the verdicts, and the features key is deleted with the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

from fallwatch import dmd_store
from fallwatch.dmd_store import EdgeContext
from fallwatch.schemas import CloudVerdict, DmdRecord, OffloadRequest

log = structlog.get_logger(__name__)


def load_stashed(client: Any, reqs: Sequence[OffloadRequest]) -> list[dict | None]:
    """The stashed features hash of each request (None without a key or once it expired)."""
    pipe = client.pipeline(transaction=False)
    for r in reqs:
        if r.features_key:
            pipe.hgetall(r.features_key)
    found = iter(pipe.execute())
    return [(next(found) or None) if r.features_key else None for r in reqs]


def make_record(req: OffloadRequest, verdict: CloudVerdict, stashed: dict,
                cloud_model_id: str = "") -> tuple[DmdRecord, bytes]:
    ctx = EdgeContext.from_json(stashed[dmd_store.META_FIELD])
    raw = stashed[dmd_store.FEATURES_FIELD]
    cloud_p = float(verdict.p_fall if verdict.p_fall is not None else float(bool(verdict.is_fall)))
    record = DmdRecord(
        frame_id=req.frame_id, camera_id=req.camera_id, captured_at=req.captured_at, edge_p_fall=req.edge_p_fall,
        cloud_p_fall=cloud_p, agree=(req.edge_p_fall >= 0.5) == (cloud_p >= 0.5), route=req.route,
        inclusion=req.inclusion, edge_model_id=ctx.edge_model_id, questions=list(ctx.questions),
        feature_dim=len(raw) // dmd_store.FEATURE_DTYPE.itemsize, switcher_version=ctx.switcher_version,
        gt_fall=req.gt_fall, kind=req.kind, cloud_model_id=cloud_model_id,
    )
    return record, raw


def queue_records(rt: Any, pipe: Any, reqs: Sequence[OffloadRequest], verdicts: Sequence[CloudVerdict]) -> int:
    """Queue the store records of the scored requests on ``pipe``; returns how many."""
    pairs = [(r, v) for r, v in zip(reqs, verdicts) if v.ok and r.features_key]
    written = 0
    for (req, verdict), stashed in zip(pairs, load_stashed(rt.client, [r for r, _ in pairs])):
        if stashed is None:
            log.info("dmd_features_expired", frame=req.frame_id)
            continue
        record, raw = make_record(req, verdict, stashed, str(getattr(rt.model, "model_id", "")))
        dmd_store.append(pipe, rt.keys, rt.settings.dmd, record, raw)
        written += 1
    return written


def feature_keys(reqs: Sequence[OffloadRequest]) -> list[str]:
    return [r.features_key for r in reqs if r.features_key]

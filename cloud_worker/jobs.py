"""RQ job functions run by cloud workers. They are named by string by the edge worker
(``cloud_worker.jobs.score_offloads``), and their arguments are JSON (RQ's JSONSerializer).

The model stays resident: :class:`CloudRuntime` is installed once per process by the worker
(``fallwatch cloud``) and every job uses it; nothing is loaded per job.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import redis
import structlog

from cloud_worker import live
from fallwatch.budget import ServiceReporter, TokenBucket
from fallwatch.images import PoisonInput, decode_rgb_array
from fallwatch.keys import Keys
from fallwatch.metrics import CloudMetrics
from fallwatch.offload import parse_requests
from fallwatch.schemas import CloudVerdict, ItemKind, OffloadRequest, encode
from fallwatch.settings import Settings
from fallwatch.streams import write_dead_letter

log = structlog.get_logger(__name__)


class CloudScores(Protocol):
    """What a cloud scorer returns for a batch (``cloud_worker.model.CloudScores`` has these)."""

    p_fall: Sequence[float] | np.ndarray  # one probability per item, in order
    wall_s: float
    energy_j: float | None  # energy of the batch where measured


class CloudScorer(Protocol):
    """A cloud model as the jobs use it: one batch of images (HxWx3) and clips (TxHxWx3) scored at once.
    ``cloud_worker.model.CloudModel`` is one; docs/extending.md shows how to add another architecture."""

    def score(self, items: Sequence[np.ndarray]) -> CloudScores: ...


class CloudDescriber(Protocol):
    """A cloud scorer that can also put a scene into words (needed by ``cloud.describe``)."""

    def describe(self, item: np.ndarray, max_new_tokens: int) -> str: ...


@dataclass
class CloudRuntime:
    settings: Settings
    client: redis.Redis
    keys: Keys
    model: CloudScorer
    name: str
    metrics: CloudMetrics = field(default_factory=CloudMetrics.create)
    service: ServiceReporter = field(default_factory=ServiceReporter)


_runtime: CloudRuntime | None = None


def install(runtime: CloudRuntime | None) -> None:
    """Make ``runtime`` the one every job in this process uses (None uninstalls)."""
    global _runtime
    _runtime = runtime


def runtime() -> CloudRuntime:
    if _runtime is None:
        raise RuntimeError("no cloud runtime in this process: run jobs with `fallwatch cloud`, which loads the model once")
    return _runtime


def score_offloads(requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Score a micro-batch of offloaded frames in one forward pass and publish CloudVerdicts.

    Requests past their deadline are not scored: the alerts service has used (or is about to use)
    the edge verdict, so a cloud verdict would be ignored. Skipping them lets a backlogged worker
    catch up with the fresh frames instead of spending the GPU on stale ones.
    """
    rt = runtime()
    try:
        reqs = parse_requests(requests)
    except PoisonInput as exc:
        _dead_letter(rt, exc)
        return {"scored": 0, "dead_lettered": 1}
    now = time.time()
    expired = [r for r in reqs if r.deadline < now]
    if expired:
        log.info("cloud_requests_expired", worker=rt.name, count=len(expired))
    items, ready, missing = _load_items(rt, [r for r in reqs if r.deadline >= now])
    verdicts = [_failure(r, rt.name, reason) for r, reason in missing]
    started = time.perf_counter()
    if ready:
        verdicts += _score(rt, ready, items)
    seconds = time.perf_counter() - started
    rt.metrics.observe_batch(len(reqs), seconds, failed=len(missing))
    _account(rt, reqs, len(ready), seconds if ready else 0.0)
    late = sum(v.decided_at > r.deadline for v, r in zip(verdicts[len(missing):], ready))
    if late:
        rt.metrics.deadline_missed(late)
    pipe = rt.client.pipeline(transaction=False)
    for v in verdicts:
        pipe.xadd(rt.keys.verdicts_stream(), encode(v))
    live.queue_records(rt, pipe, ready, verdicts[len(missing):])
    pipe.delete(*[r.pixels_key for r in reqs], *live.feature_keys(reqs))
    pipe.execute()
    return {"scored": len(ready), "failed": len(missing), "expired": len(expired)}


def _account(rt: CloudRuntime, reqs: list[OffloadRequest], scored: int, seconds: float) -> None:
    """Measure the model seconds per item (the worker reports them with the job's wall time), and
    settle a hard GPU-seconds budget: the edge debited an estimate per item; the bucket is charged
    what the job really took (nothing for items not scored)."""
    rt.service.observe_items(scored, seconds)
    debited = sum(r.budget_cost_s for r in reqs)
    if debited > 0:
        TokenBucket.for_site(rt.client, rt.keys, rt.settings.cloud.budget).settle(seconds - debited)


def _load_items(rt: CloudRuntime, reqs: list[OffloadRequest]):
    """Decoded items for the requests whose pixels are still there and sound."""
    pipe = rt.client.pipeline(transaction=False)
    for r in reqs:
        pipe.hgetall(r.pixels_key)
    stored = pipe.execute()
    items, ready, missing = [], [], []
    limits = (rt.settings.edge.max_image_bytes, rt.settings.edge.max_image_pixels)
    for req, fields in zip(reqs, stored):
        if not fields:
            missing.append((req, "pixels expired or missing"))
            continue
        try:
            frames = [decode_rgb_array(fields[b"p%d" % i], *limits) for i in range(req.n_images)]
        except (PoisonInput, KeyError) as exc:
            missing.append((req, f"bad pixels: {exc}"))
            continue
        items.append(np.stack(frames) if req.kind == ItemKind.CLIP else frames[0])
        ready.append(req)
    return items, ready, missing


def _score(rt: CloudRuntime, reqs: list[OffloadRequest], items: list[np.ndarray]) -> list[CloudVerdict]:
    scores = rt.model.score(items)
    per_item_ms = scores.wall_s * 1000 / len(items)
    energy = None if scores.energy_j is None else scores.energy_j / len(items)
    log.info("cloud_batch_scored", worker=rt.name, items=len(items), ms=round(scores.wall_s * 1000, 1))
    verdicts = [
        CloudVerdict(frame_id=r.frame_id, camera_id=r.camera_id, captured_at=r.captured_at, ok=True,
                     p_fall=float(p), is_fall=bool(p >= 0.5), cloud_ms=per_item_ms, energy_j=energy, worker=rt.name,
                     route=r.route, edge_p_fall=r.edge_p_fall, switcher_version=r.switcher_version)
        for r, p in zip(reqs, scores.p_fall)
    ]
    return _described(rt, verdicts, items) if rt.settings.cloud.describe else verdicts


def _described(rt: CloudRuntime, verdicts: list[CloudVerdict], items: list[np.ndarray]) -> list[CloudVerdict]:
    """Offloaded falls with the model's description of the scene; a failed description is left out."""
    return [_describe(rt, v, item) if v.is_fall and v.route == "offload" else v for v, item in zip(verdicts, items)]


def _describe(rt: CloudRuntime, verdict: CloudVerdict, item: np.ndarray) -> CloudVerdict:
    describer: CloudDescriber = rt.model  # type: ignore[assignment]
    try:
        text = describer.describe(item, max_new_tokens=rt.settings.cloud.describe_tokens)
    except Exception as exc:  # noqa: BLE001 - the verdict matters more than its words
        log.warning("cloud_describe_failed", worker=rt.name, frame=verdict.frame_id, error=str(exc)[:200])
        return verdict
    return verdict.model_copy(update={"description": text[:2000] or None})


def _failure(req: OffloadRequest, worker: str, error: str) -> CloudVerdict:
    return CloudVerdict(frame_id=req.frame_id, camera_id=req.camera_id, captured_at=req.captured_at, ok=False,
                        error=error[:2000], worker=worker, route=req.route, edge_p_fall=req.edge_p_fall,
                        switcher_version=req.switcher_version)


def _dead_letter(rt: CloudRuntime, exc: PoisonInput, job_id: str = "") -> None:
    write_dead_letter(rt.client, rt.keys.dead_letter_stream(), rt.keys.cloud_queue(rt.settings.cloud.queue), job_id,
                      exc.reason, str(exc), rt.name)


def on_offload_failure(job: Any, connection: redis.Redis, exc_type: type, exc_value: BaseException, tb: Any) -> None:
    """RQ failure callback: when no retry is left, publish failure verdicts so alerts fall back at once."""
    if job.retries_left:
        log.warning("cloud_job_retrying", job=job.id, retries_left=job.retries_left, error=str(exc_value))
        return
    try:
        reqs = parse_requests(job.args[0] if job.args else None)
    except PoisonInput:
        return
    rt = runtime()
    pipe = connection.pipeline(transaction=False)
    for r in reqs:
        pipe.xadd(rt.keys.verdicts_stream(), encode(_failure(r, rt.name, f"{exc_type.__name__}: {exc_value}")))
    pipe.execute()
    rt.metrics.observe_batch(len(reqs), 0.0, failed=len(reqs))
    log.error("cloud_job_failed", job=job.id, frames=len(reqs), error=str(exc_value), at=time.time())


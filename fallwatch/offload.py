"""The offload job: the contract between the edge, which enqueues it, and the cloud, which runs it.

The edge names the cloud's job function and failure callback by string, so it never imports cloud
code, and a cloud worker runs only jobs that name exactly these. The job's one argument is a list
of :class:`~fallwatch.schemas.OffloadRequest` as JSON dicts (RQ's JSON serializer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from rq import Queue, Retry
from rq.callbacks import Callback
from rq.job import Job

from fallwatch.defaults import JOB_FAILURE_TTL_S, JOB_RESULT_TTL_S, JOB_TTL_MARGIN_S
from fallwatch.images import PoisonInput
from fallwatch.schemas import OffloadRequest, to_dict
from fallwatch.settings import Settings

OFFLOAD_JOB = "cloud_worker.jobs.score_offloads"
OFFLOAD_FAILED = "cloud_worker.jobs.on_offload_failure"


def enqueue_offload(queue: Queue, requests: Sequence[OffloadRequest], settings: Settings,
                    pipeline: Any = None) -> Job:
    """One offload job for a micro-batch of requests, with the cloud section's timeout and retries
    (queued on ``pipeline``, e.g. inside the edge's MULTI, if given)."""
    retry = Retry(max=settings.cloud.retries) if settings.cloud.retries else None
    return queue.enqueue(
        OFFLOAD_JOB, [to_dict(r) for r in requests], job_timeout=settings.cloud.job_timeout_s, retry=retry,
        on_failure=Callback(OFFLOAD_FAILED), result_ttl=JOB_RESULT_TTL_S, failure_ttl=JOB_FAILURE_TTL_S,
        ttl=int(settings.alerts.cloud_timeout_s) + JOB_TTL_MARGIN_S, pipeline=pipeline,
    )


def parse_requests(requests: Any) -> list[OffloadRequest]:
    """The offload job's argument back as requests; PoisonInput ("bad_job") when it is not one."""
    if not isinstance(requests, list) or not requests:
        raise PoisonInput("bad_job", f"expected a non-empty list of offload requests, got {type(requests).__name__}")
    try:
        return [OffloadRequest.model_validate(r) for r in requests]
    except ValidationError as exc:
        raise PoisonInput("bad_job", f"invalid offload request: {exc.errors()[0]['msg']}") from None

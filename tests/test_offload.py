"""The offload job contract (fallwatch/offload.py) names the cloud's real job function and callback."""

from __future__ import annotations

import json

import pytest

from cloud_worker import jobs
from cloud_worker.worker import ALLOWED_CALLBACKS, ALLOWED_JOBS
from fallwatch.images import PoisonInput
from fallwatch.offload import OFFLOAD_FAILED, OFFLOAD_JOB, enqueue_offload, parse_requests
from fallwatch.schemas import OffloadRequest
from fallwatch.streams import job_queue


def _dotted(func) -> str:
    return f"{func.__module__}.{func.__qualname__}"


def test_the_contract_names_the_cloud_job_and_callback() -> None:
    assert OFFLOAD_JOB == _dotted(jobs.score_offloads) and OFFLOAD_FAILED == _dotted(jobs.on_offload_failure)
    assert ALLOWED_JOBS == {OFFLOAD_JOB} and ALLOWED_CALLBACKS == {OFFLOAD_FAILED}


def test_an_enqueued_offload_parses_back_into_its_requests(settings, r, keys) -> None:
    reqs = [OffloadRequest(frame_id=f"cam1:{i}", camera_id="cam1", captured_at=1e9, pixels_key=keys.pixels(f"cam1:{i}"),
                           edge_p_fall=0.4, deadline=1e9 + 30) for i in range(3)]
    job = enqueue_offload(job_queue(r, keys.cloud_queue(settings.cloud.queue)), reqs, settings)
    stored = job_queue(r, keys.cloud_queue(settings.cloud.queue)).fetch_job(job.id)
    assert stored.func_name == OFFLOAD_JOB and stored._failure_callback_name == OFFLOAD_FAILED
    assert parse_requests(stored.args[0]) == reqs
    assert stored.result_ttl == 300 and stored.failure_ttl == 86400
    assert stored.ttl == int(settings.alerts.cloud_timeout_s) + 60
    json.dumps(stored.args)  # JSON all the way


@pytest.mark.parametrize("bad", [None, [], {"a": 1}, [{"frame_id": ""}]])
def test_anything_else_is_a_bad_job(bad) -> None:
    with pytest.raises(PoisonInput) as err:
        parse_requests(bad)
    assert err.value.reason == "bad_job"

"""``cloud.describe``: the cloud model's words about a fall it decided, on the verdict, the event and the
notification; nothing generated when it is off, for verdicts that are not falls, or for audits."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from alerts.service import AlertsService
from cloud_worker.model import CloudModel
from cloud_worker.worker import build_worker, run
from fallwatch.errors import UserError
from fallwatch.images import decode_rgb_array
from fallwatch.offload import OFFLOAD_JOB
from fallwatch.schemas import AlertEvent, CloudVerdict, Delivery, EventType, decode
from fallwatch.settings import CloudSettings, Settings
from fallwatch.streams import job_queue
from tests.frames import jpeg
from tests.helpers import FakeClock, cloud_verdict, edge_verdict, plant, read_all
from tests.test_cloud_worker import offload


class Decided:
    """The tiny cloud model's descriptions with fall probabilities chosen per item (first: fall, then not)."""

    def __init__(self, model: CloudModel, p_fall: list[float]):
        self.model, self.p_fall, self.described = model, p_fall, 0

    def score(self, items):
        return type("Scores", (), {"p_fall": np.array(self.p_fall[:len(items)]), "wall_s": 0.01, "energy_j": None})()

    def describe(self, item, max_new_tokens):
        self.described += 1
        return self.model.describe(item, max_new_tokens=max_new_tokens)


@pytest.fixture(scope="module")
def tiny_cloud() -> CloudModel:
    return CloudModel.load(CloudSettings(model="tiny", device="cpu", dtype="fp32"))


def serve(settings: Settings, r, keys, scorer, audit: bool = False) -> dict[str, CloudVerdict]:
    reqs = [offload(r, keys, "cam1:1"), offload(r, keys, "cam1:2")]
    if audit:
        reqs = [{**q, "route": "audit"} for q in reqs]
    job_queue(r, keys.cloud_queue(settings.cloud.queue)).enqueue(OFFLOAD_JOB, reqs)
    assert run(build_worker(settings, r, keys, scorer, name="cloud-d"), threading.Event(), burst=True) == 1
    return {v.frame_id: v for v in (decode(f, CloudVerdict)[0] for _, f in r.xrange(keys.verdicts_stream()))}


def with_describe(settings: Settings, on: bool = True) -> Settings:
    return settings.model_copy(update={"cloud": settings.cloud.model_copy(update={"describe": on,
                                                                                  "describe_tokens": 5})})


def test_a_fall_the_cloud_decides_carries_the_models_description(settings, r, keys, tiny_cloud) -> None:
    scorer = Decided(tiny_cloud, [0.9, 0.1])
    got = serve(with_describe(settings), r, keys, scorer)
    expected = tiny_cloud.describe(decode_rgb_array(jpeg(64, 48, seed=0), 10**7, 10**8), max_new_tokens=5)
    assert expected and got["cam1:1"].is_fall and got["cam1:1"].description == expected
    assert not got["cam1:2"].is_fall and got["cam1:2"].description is None
    assert scorer.described == 1


@pytest.mark.parametrize("on,audit", [(False, False), (True, True)])
def test_nothing_is_generated_when_off_or_for_audits(settings, r, keys, tiny_cloud, on, audit) -> None:
    scorer = Decided(tiny_cloud, [0.9, 0.9])
    got = serve(with_describe(settings, on), r, keys, scorer, audit=audit)
    assert all(v.is_fall and v.description is None for v in got.values()) and scorer.described == 0


def test_a_model_that_cannot_describe_is_refused_at_start(settings, r, keys) -> None:
    class ScoresOnly:
        def score(self, items):
            raise AssertionError("never called")

    with pytest.raises(UserError, match="cannot describe"):
        build_worker(with_describe(settings), r, keys, ScoresOnly(), name="cloud-d")


def test_the_description_reaches_the_event_and_its_notification(redis_url, r, keys) -> None:
    cfg = Settings(redis={"url": redis_url}, alerts={"cloud_timeout_s": 5.0, "debounce_k": 1, "debounce_n": 1},
                   notifications={"urls": ["json://127.0.0.1:9/hook"]})
    clock = FakeClock()
    svc = AlertsService(cfg, r, keys, name="a1", clock=clock)
    plant(r, keys.verdicts_stream(), edge_verdict("cam1:1", clock.t, 0.4, confident=False))
    svc.step()
    words = cloud_verdict("cam1:1", clock.t, p_fall=0.93).model_copy(update={"description": "a person lies on a rug"})
    plant(r, keys.verdicts_stream(), words)
    svc.step()
    [start] = [m for m in read_all(r, keys.alerts_stream()) if isinstance(m, AlertEvent) and m.type is EventType.START]
    assert start.description == "a person lies on a rug"
    [owed] = [m for m in read_all(r, keys.notify_outbox_stream()) if isinstance(m, Delivery)]
    assert "decided by the cloud model" in owed.body and "The model saw: a person lies on a rug" in owed.body

"""Audit sampling: a deterministic share of edge-decided items is also checked by the cloud,
on its own queue served after the offloads; a fall the edge missed still raises an event."""

from __future__ import annotations

import threading
import time

import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from alerts.notify import Delivery
from alerts.service import AlertsService
from cloud_worker.worker import build_worker, run
from edge_worker.audit import AUDIT_JOB, audit_draw, chosen_for_audit
from edge_worker.worker import EdgeWorker
from fallwatch.offload import OFFLOAD_JOB
from fallwatch.schemas import AlertEvent, CloudVerdict, Decider, EdgeVerdict, EventType, OffloadRequest, decode, to_dict
from fallwatch.settings import Settings
from tests.frames import jpeg, push_frames
from tests.helpers import edge_verdict, plant, read_all


def with_audits(settings: Settings, fraction: float, seed: str = "site") -> Settings:
    return settings.model_copy(update={"switcher": settings.switcher.model_copy(
        update={"audit_fraction": fraction, "audit_seed": seed})})


def drain(worker: EdgeWorker) -> int:
    audited = 0
    for _ in range(50):
        res = worker.step(block_ms=0)
        audited += res.audited
        if res.read == 0:
            return audited
    raise AssertionError("edge worker did not drain the stream")


def audit_queue(settings: Settings, r, keys) -> Queue:
    return Queue(keys.audit_queue(settings.cloud.queue), connection=r, serializer=JSONSerializer)


def test_audit_queue_name(keys) -> None:
    assert keys.audit_queue("cloud") == keys.cloud_queue("cloud-audit") == "fallwatch-cloud-audit"


def test_audit_choice_is_a_fixed_hash_of_frame_and_seed() -> None:
    ids = [f"cam{c}:{s}" for c in range(4) for s in range(5000)]
    picks = [chosen_for_audit(i, 0.02, "site-a") for i in ids]
    assert picks == [chosen_for_audit(i, 0.02, "site-a") for i in ids]  # same answer every time
    assert 0.015 < sum(picks) / len(ids) < 0.025
    other = [chosen_for_audit(i, 0.02, "site-b") for i in ids]
    assert other != picks  # another site seed audits other frames
    assert not any(chosen_for_audit(i, 0.0, "site-a") for i in ids)  # 0 turns audits off
    assert all(0.0 <= audit_draw(i, "s") < 1.0 for i in ids[:100])


def test_edge_audits_the_chosen_frames_and_a_replay_chooses_the_same(settings, r, keys, tiny_edge) -> None:
    settings = with_audits(settings, 0.3)
    ids = push_frames(r, keys, 40)
    worker = EdgeWorker(settings, r, keys, tiny_edge, name="w1")
    worker.ensure_group()
    audited = drain(worker)
    expected = [i for i in ids if chosen_for_audit(i, 0.3, "site")]
    assert 0 < audited == len(expected) < len(ids)
    verdicts = [decode(f)[0] for _, f in r.xrange(keys.verdicts_stream())]
    assert all(isinstance(v, EdgeVerdict) and v.confident for v in verdicts)  # the edge verdicts stay final
    jobs = audit_queue(settings, r, keys).jobs
    requests = [OffloadRequest.model_validate(q) for j in jobs for q in j.args[0]]
    assert all(j.func_name == AUDIT_JOB for j in jobs)
    assert [q.frame_id for q in requests] == expected
    assert all(q.route == "audit" and q.inclusion == 0.3 for q in requests)
    for q in requests:
        assert r.exists(q.pixels_key) and 0 < r.ttl(q.features_key) <= settings.dmd.features_ttl_s
    assert Queue(keys.cloud_queue(settings.cloud.queue), connection=r, serializer=JSONSerializer).count == 0
    r.flushall()  # replay the same frames on a fresh server: the same frames are audited
    push_frames(r, keys, 40)
    again = EdgeWorker(settings, r, keys, tiny_edge, name="w2")
    again.ensure_group()
    drain(again)
    replayed = [q["frame_id"] for j in audit_queue(settings, r, keys).jobs for q in j.args[0]]
    assert replayed == expected


def _request(r, keys, frame_id: str, route: str) -> dict:
    key = keys.pixels(frame_id)
    r.hset(key, mapping={"p0": jpeg(64, 48, seed=len(frame_id))})
    now = time.time()
    return to_dict(OffloadRequest(frame_id=frame_id, camera_id="cam1", captured_at=now, pixels_key=key,
                                  edge_p_fall=0.2, deadline=now + 60, route=route))


def test_cloud_workers_serve_audits_only_after_the_offload_queue(settings, r, keys, tiny_cloud) -> None:
    audits, offloads = audit_queue(settings, r, keys), Queue(keys.cloud_queue(settings.cloud.queue), connection=r,
                                                            serializer=JSONSerializer)
    for n in range(3):  # audits enqueued first ...
        audits.enqueue(AUDIT_JOB, [_request(r, keys, f"cam1:a{n}", "audit")])
    for n in range(3):  # ... offloads later, and still served first
        offloads.enqueue(OFFLOAD_JOB, [_request(r, keys, f"cam1:o{n}", "offload")])
    worker = build_worker(settings, r, keys, tiny_cloud, name="c1")
    assert run(worker, threading.Event(), burst=True) == 6
    got = [decode(f, expect=CloudVerdict)[0] for _, f in r.xrange(keys.verdicts_stream())]
    assert [v.frame_id for v in got] == [f"cam1:o{n}" for n in range(3)] + [f"cam1:a{n}" for n in range(3)]
    assert [v.route for v in got] == ["offload"] * 3 + ["audit"] * 3
    assert all(v.edge_p_fall == 0.2 for v in got)


def _audit_verdict(frame_id: str, at: float, cloud_p: float, edge_p: float) -> CloudVerdict:
    return CloudVerdict(frame_id=frame_id, camera_id=frame_id.split(":")[0], captured_at=at, p_fall=cloud_p,
                        is_fall=cloud_p >= 0.5, route="audit", edge_p_fall=edge_p)


def test_a_fall_seen_only_by_an_audit_raises_an_event(redis_url, r, keys) -> None:
    settings = Settings(redis={"url": redis_url}, notifications={"urls": ["json://127.0.0.1:9/x"]})
    svc = AlertsService(settings, r, keys, name="a1")
    now = time.time()
    plant(r, keys.verdicts_stream(), edge_verdict("cam3:0", now, 0.1), _audit_verdict("cam3:0", now, 0.93, 0.1))
    plant(r, keys.verdicts_stream(), edge_verdict("cam4:0", now, 0.8), _audit_verdict("cam4:0", now, 0.1, 0.8))
    report = svc.step()
    starts = [e for e in report.events if e.type is EventType.START]
    assert [(e.camera_id, e.decided_by) for e in starts] == [("cam3", Decider.CLOUD_AUDIT)]
    assert starts[0].frame_ids == ["cam3:0"] and starts[0].confidence == pytest.approx(0.93)
    finals = read_all(r, keys.final_stream())
    assert sorted((f.frame_id, f.decided_by) for f in finals) == [("cam3:0", Decider.EDGE), ("cam4:0", Decider.EDGE)]
    outbox = [decode(f, expect=Delivery)[0] for _, f in r.xrange(keys.notify_outbox_stream())]
    assert len(outbox) == 1 and "auditing" in outbox[0].body
    # a redelivered audit verdict changes nothing
    plant(r, keys.verdicts_stream(), _audit_verdict("cam3:0", now, 0.93, 0.1))
    assert not svc.step().events
    alerts = [m for m in read_all(r, keys.alerts_stream()) if isinstance(m, AlertEvent)]
    assert len(alerts) == 1

"""The cloud budget: target_rate, the shared hard bucket (two workers, restarts, fallback), ranking,
backpressure shedding, the edge_budget / edge_shed markers and the cloud's service-time reports."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from alerts.merge import VerdictMerger
from alerts.service import AlertsService
from alerts.notify import compose
from bench.planted import PlantedScorer, PlantedSwitcher, SleepyCloud, push_planted
from cloud_worker.worker import build_worker, run
from edge_worker.budget import RateTracker, Router, ranked
from edge_worker.worker import EdgeWorker
from fallwatch.budget import ServiceReporter, TokenBucket, read_service
from fallwatch.keys import Keys
from fallwatch.metrics import AlertsMetrics, EdgeMetrics, build_metrics
from fallwatch.redis import EmbeddedRedis
from fallwatch.schemas import AlertEvent, CloudVerdict, Decider, EdgeVerdict, EventKind, EventType, decode
from fallwatch.settings import BudgetSettings, Settings
from fallwatch.status import gather
from tests.helpers import edge_verdict, wait_for

LOW, HIGH = 0.05, 0.95  # planted agreement: below / above the fixed threshold 0.5


def with_budget(settings: Settings, **budget) -> Settings:
    cloud = settings.cloud.model_copy(update={"budget": BudgetSettings(**budget)})
    return settings.model_copy(update={"cloud": cloud})


def edge(settings: Settings, client: redis.Redis, keys: Keys, name: str = "e1", threshold: float = 0.5,
         fraction: float | None = None) -> EdgeWorker:
    worker = EdgeWorker(settings, client, keys, PlantedScorer(), PlantedSwitcher(threshold, fraction), name=name,
                        metrics=EdgeMetrics.create(build_metrics()))
    worker.ensure_group()
    return worker


def edge_verdicts(r: redis.Redis, keys: Keys) -> dict[str, EdgeVerdict]:
    got = [decode(f)[0] for _, f in r.xrange(keys.verdicts_stream())]
    return {v.frame_id: v for v in got if isinstance(v, EdgeVerdict)}


def sent_requests(r: redis.Redis, keys: Keys, settings: Settings) -> list[dict]:
    queues = [Queue(q, connection=r, serializer=JSONSerializer) for q in keys.offload_queues(settings.cloud.queue)]
    return [req for q in queues for job in q.jobs for req in job.args[0]]


def drain(worker: EdgeWorker) -> None:
    while worker.step(block_ms=0).read:
        pass


# --- the shared bucket -------------------------------------------------------------------------


def test_bucket_grants_a_ranked_prefix_and_keeps_a_reserve_for_rank_0(r, keys) -> None:
    bucket = TokenBucket(r, keys, capacity=10, rate_per_s=1e-6)
    assert bucket.take([(1, 0.0)] * 4).granted == 4
    # 6 left, rank-1 items may not go below the reserve (40% = 4 tokens): two of them fit
    assert bucket.take([(1, 0.4)] * 5).granted == 2
    # the reserve is rank 0's; and a refused item stops the spend, so nothing after it is granted
    assert bucket.take([(1, 0.0), (1, 0.0), (3, 0.0), (1, 0.0)]).granted == 2
    assert bucket.level() == pytest.approx(2, abs=1e-3)


def test_two_workers_never_overspend_the_shared_bucket(r, redis_url, keys) -> None:
    clients = [redis.Redis.from_url(redis_url) for _ in range(2)]
    buckets = [TokenBucket(c, keys, capacity=51, rate_per_s=1e-6) for c in clients]
    granted = [0, 0]
    together = threading.Barrier(2)

    def spend(i: int) -> None:
        for _ in range(40):  # 40 rounds of the two taking at the same moment; the 51st token is raced for
            together.wait()
            granted[i] += buckets[i].take([(1, 0.0)]).granted

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 51 and min(granted) >= 25  # both spent; together exactly the bucket


def test_bucket_refills_by_time_and_settles_measured_seconds(r, keys) -> None:
    bucket = TokenBucket(r, keys, capacity=2.0, rate_per_s=4.0)
    assert bucket.take([(2.0, 0.0)]).granted == 1
    assert wait_for(lambda: bucket.level() >= 1.0, 10)
    before = bucket.settle(0.0)
    assert bucket.settle(5.0) < before - 4.0  # the job took 5 s more than debited: the bucket owes it
    assert bucket.take([(0.1, 0.0)]).granted == 0


def test_a_redis_restart_does_not_refill_a_hard_budget(tmp_path) -> None:
    keys = Keys("fw")
    server = EmbeddedRedis(tmp_path / "r", appendonly=True).start()
    try:
        client = redis.Redis.from_url(server.url)
        bucket = TokenBucket(client, keys, capacity=100, rate_per_s=100 / 3600)  # 100 per hour
        assert bucket.take([(1, 0.0)] * 95).granted == 95
        server.stop()
        server.start()
        assert wait_for(lambda: _ping(client), 20)
        restored = TokenBucket(client, keys, capacity=100, rate_per_s=100 / 3600)
        assert restored.level() < 10  # 5 left plus a few seconds of refill, not a fresh 100
        assert restored.take([(1, 0.0)] * 20).granted < 10
    finally:
        server.stop()


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_a_worker_that_cannot_reach_the_bucket_spends_only_its_share(settings, r, keys) -> None:
    settings = with_budget(settings, mode="hard", hard_unit="offloads", hard_per_hour=3600, burst_s=40,
                           fallback_share=0.25, reserve=0.0)
    router = Router(settings, r, keys, [])
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    router.bucket = TokenBucket(dead, keys, router.bucket.capacity, router.bucket.rate)
    grant = router._take([(1.0, 0.0)] * 40)
    assert not grant.shared and grant.granted == 10  # a quarter of the 40-token bucket
    assert router._take([(1.0, 0.0)] * 40).granted <= 1  # and then only its share of the refill


# --- ranking and target_rate ---------------------------------------------------------------------


def test_ranking_puts_a_possible_missed_fall_first_then_lower_agreement() -> None:
    vs = [edge_verdict(f"c:{i}", 1e9, p) for i, p in enumerate([0.9, 0.1, 0.9, 0.1])]
    vs = [v.model_copy(update={"agreement": a}) for v, a in zip(vs, [0.1, 0.3, 0.05, 0.2])]
    assert ranked(vs) == [3, 1, 2, 0]  # no-fall (0.2, 0.3), then fall (0.05, 0.1)


def test_rate_tracker_holds_the_share_when_low_agreement_doubles() -> None:
    cfg = BudgetSettings(mode="target_rate", window_items=300, min_items=8)
    tracker = RateTracker(cfg, target=0.2)
    rng = np.random.default_rng(0)

    def share(low: float) -> float:
        offloaded = 0
        for _ in range(200):
            batch = np.where(rng.random(8) < low, rng.uniform(0, 0.3, 8), rng.uniform(0.3, 1, 8))
            tracker.observe(batch)
            offloaded += int((batch < tracker.threshold()).sum())
        return offloaded / 1600

    share(0.15)
    assert share(0.15) == pytest.approx(0.2, rel=0.1)
    share(0.30)  # the quantile window catches up with the new scene
    assert share(0.30) == pytest.approx(0.2, rel=0.1)


def test_target_rate_clamps_the_threshold_to_its_bounds() -> None:
    tracker = RateTracker(BudgetSettings(mode="target_rate", min_items=10, threshold_max=0.3), target=0.5)
    assert tracker.threshold() is None  # too few scores: the fixed threshold
    tracker.observe([0.9] * 20)
    assert tracker.threshold() == 0.3


def test_edge_worker_in_target_rate_mode_follows_the_scene(settings, r, keys) -> None:
    settings = with_budget(settings, mode="target_rate", window_items=100, min_items=20)
    worker = edge(settings, r, keys, fraction=0.25)  # the checkpoint's calibrated share is the default target
    rng = np.random.default_rng(1)
    push_planted(r, keys, "cam1", [(float(a), False) for a in rng.uniform(0.6, 1.0, 200)])  # all above 0.5
    drain(worker)
    vs = list(edge_verdicts(r, keys).values())[100:]
    share = sum(not v.confident for v in vs) / len(vs)
    assert share == pytest.approx(0.25, abs=0.08)  # a fixed 0.5 threshold would offload none
    assert all(v.threshold is not None and 0.6 < v.threshold < 1.0 for v in vs)


# --- the edge worker under a hard budget -----------------------------------------------------------


def test_hard_budget_keeps_the_lowest_ranked_and_marks_them(settings, r, keys) -> None:
    settings = with_budget(settings, mode="hard", hard_unit="offloads", hard_per_hour=1, burst_s=3600 * 3,
                           reserve=0.0, backpressure=False)
    worker = edge(settings, r, keys)
    items = [(0.30, True), (0.10, False), (0.40, False), (0.05, True), (0.20, False), (HIGH, False)]
    ids = push_planted(r, keys, "cam1", items)
    res = worker.step(block_ms=0)
    assert (res.offloaded, res.kept, res.confident) == (3, {"edge_budget": 2}, 1)
    sent = {q["frame_id"]: q for q in sent_requests(r, keys, settings)}
    assert set(sent) == {ids[1], ids[4], ids[2]}  # the three "no fall" items, lowest agreement first
    assert all(q["rank"] == 0 for q in sent.values())
    vs = edge_verdicts(r, keys)
    assert {vs[i].decided_by for i in (ids[0], ids[3])} == {Decider.EDGE_BUDGET}
    assert all(vs[i].confident for i in (ids[0], ids[3])) and vs[ids[5]].decided_by is None
    assert int(r.get(keys.counter("offloads_edge_budget"))) == 2
    assert worker.metrics.offloads_kept.labels("edge_budget")._value.get() == 2
    snap = gather(r, settings)
    assert snap.budget.kept_budget == 2 and snap.budget.tokens < 1


def test_two_edge_workers_share_one_hard_budget(settings, r, redis_url, keys) -> None:
    settings = with_budget(settings, mode="hard", hard_unit="offloads", hard_per_hour=2, burst_s=3600 * 15,
                           reserve=0.0, backpressure=False)
    workers = [edge(settings, redis.Redis.from_url(redis_url), keys, name=f"e{i}") for i in range(2)]
    push_planted(r, keys, "cam1", [(LOW, False)] * 80)
    steps = [0, 0]
    while True:
        res = [w.step(block_ms=0) for w in workers]
        for i, x in enumerate(res):
            steps[i] += x.read > 0
        if not any(x.read for x in res):
            break
    assert min(steps) > 0  # both workers took batches
    assert len(sent_requests(r, keys, settings)) == 30
    kept = [v for v in edge_verdicts(r, keys).values() if v.decided_by == Decider.EDGE_BUDGET]
    assert len(kept) == 50


def test_a_budget_marker_reaches_the_final_verdict_the_event_and_the_notification(settings, r, keys) -> None:
    settings = with_budget(settings, mode="hard", hard_unit="offloads", hard_per_hour=1, burst_s=1,
                           backpressure=False)
    worker = edge(settings, r, keys)
    push_planted(r, keys, "cam1", [(LOW, True)] * 3)
    worker.step(block_ms=0)
    service = AlertsService(settings, r, keys, name="a1", metrics=AlertsMetrics.create(build_metrics()))
    assert wait_for(lambda: service.step() is not None and r.xlen(keys.final_stream()) >= 3
                    and r.xlen(keys.alerts_stream()) > 0, 20)
    finals = [decode(f)[0] for _, f in r.xrange(keys.final_stream())]
    assert len(finals) == 3 and all(f.decided_by == Decider.EDGE_BUDGET and not f.offloaded and f.is_fall for f in finals)
    event = decode(r.xrange(keys.alerts_stream())[0][1], expect=AlertEvent)[0]
    assert event.type == EventType.START and event.decided_by == Decider.EDGE_BUDGET
    _title, body = compose(event)
    assert "cloud budget was spent" in body
    by = gather(r, settings).scoring.by_decider
    assert by.get("edge_budget") == 3


# --- backpressure -------------------------------------------------------------------------------------


def report_service(r: redis.Redis, keys: Keys, item_s: float, job_s: float) -> None:
    r.hset(keys.cloud_service(), "c1", json.dumps({"item_s": item_s, "job_s": job_s, "at": time.time()}))


def test_an_item_the_cloud_would_answer_too_late_is_shed_at_once(settings, r, keys) -> None:
    settings = settings.model_copy(update={"alerts": settings.alerts.model_copy(update={"cloud_timeout_s": 10})})
    worker = edge(settings, r, keys)
    report_service(r, keys, item_s=1.0, job_s=4.0)
    Queue(keys.offload_queues()[0], connection=r, serializer=JSONSerializer).enqueue("json.dumps", [1])
    ids = push_planted(r, keys, "cam1", [(LOW, False), (LOW, True)])
    res = worker.step(block_ms=0)
    # one job ahead of either rank -> (1 + 1) * 4 s = 8 s < 10 s: both sent
    assert res.offloaded == 2 and not res.kept
    for _ in range(2):
        Queue(keys.offload_queues()[0], connection=r, serializer=JSONSerializer).enqueue("json.dumps", [1])
    ids = push_planted(r, keys, "cam1", [(LOW, False), (LOW, True)], start=10)
    res = worker.step(block_ms=0)
    assert res.offloaded == 0 and res.kept == {"edge_shed": 2}
    vs = edge_verdicts(r, keys)
    assert all(vs[i].decided_by == Decider.EDGE_SHED and vs[i].confident for i in ids)
    assert int(r.get(keys.counter("offloads_edge_shed"))) == 2
    final = VerdictMerger(r, keys, settings.alerts).handle(vs[ids[0]]).final
    assert final.decided_by == Decider.EDGE_SHED and final.latency_ms < 5000
    event = AlertEvent(type=EventType.START, kind=EventKind.FALL, camera_id="cam1", started_at=1e9,
                       decided_by=Decider.EDGE_SHED)
    assert "too busy to answer in time" in compose(event)[1]


def test_without_a_cloud_report_nothing_is_shed(settings, r, keys) -> None:
    worker = edge(settings, r, keys)
    push_planted(r, keys, "cam1", [(LOW, False)] * 4)
    assert worker.step(block_ms=0).offloaded == 4


# --- the cloud side -------------------------------------------------------------------------------


def cloud_verdict_ids(r: redis.Redis, keys: Keys) -> list[str]:
    got = [decode(f)[0] for _, f in r.xrange(keys.verdicts_stream())]
    return [v.frame_id for v in got if isinstance(v, CloudVerdict)]


def test_cloud_worker_serves_rank_0_first_reports_service_time_and_settles(settings, r, keys) -> None:
    settings = with_budget(settings, mode="hard", hard_unit="gpu_s", hard_per_hour=36, burst_s=10_000,
                           backpressure=False, default_service_s=2.0)
    worker = edge(settings, r, keys)
    fall = push_planted(r, keys, "cam1", [(LOW, True)] * 2)
    worker.step(block_ms=0)  # rank 1, enqueued first
    miss = push_planted(r, keys, "cam1", [(LOW, False)] * 2, start=10)
    worker.step(block_ms=0)  # rank 0
    reqs = {q["frame_id"]: q for q in sent_requests(r, keys, settings)}
    assert {reqs[f]["rank"] for f in fall} == {1} and {reqs[f]["rank"] for f in miss} == {0}
    assert all(q["budget_cost_s"] == 2.0 for q in reqs.values())  # no report yet: the default estimate
    bucket = TokenBucket.for_site(r, keys, settings.cloud.budget)
    assert bucket.level() == pytest.approx(92, abs=0.5)
    cloud = build_worker(settings, r, keys, SleepyCloud(0.05), name="c1")
    assert run(cloud, threading.Event(), burst=True) == 2
    assert cloud_verdict_ids(r, keys) == miss + fall  # the possible missed falls were served first
    service = read_service(r, keys, default_s=9.0, ttl_s=60)
    assert service.measured and service.workers == 1 and 0.04 <= service.item_s < 1.0
    assert service.job_s >= 2 * service.item_s  # a job's wall time: two items and RQ's bookkeeping
    assert bucket.level() > 99  # settled: 8 s debited, about 0.2 s measured


def test_service_reporter_averages_and_read_service_ignores_stale_reports(r, keys) -> None:
    rep = ServiceReporter(alpha=0.5)
    rep.write(r, keys, "c1")  # nothing measured yet: nothing written
    assert not r.exists(keys.cloud_service())
    rep.observe_items(4, 2.0)
    rep.observe_items(2, 2.0)
    for seconds in [1.0] * 8 + [3.0, 9.0]:
        rep.observe_job(seconds)
    assert rep.item_s == pytest.approx(0.75) and rep.job_s == 9.0  # the slow jobs count, not the mean
    rep.write(r, keys, "c1")
    r.hset(keys.cloud_service(), "old", json.dumps({"item_s": 50, "job_s": 50, "at": time.time() - 1000}))
    est = read_service(r, keys, default_s=3.0, ttl_s=60)
    assert (est.item_s, est.workers, est.measured) == (pytest.approx(0.75), 1, True)

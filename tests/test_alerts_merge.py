"""Verdict merging through the real streams: finals, cloud waits, fallbacks, duplicates, dead letters."""

from __future__ import annotations

import time

import pytest
import redis

from alerts.service import AlertsService
from alerts.stats import read_stats
from tests.helpers import FakeClock, cloud_verdict, edge_verdict, plant, read_all
from fallwatch.keys import Keys
from fallwatch.schemas import (CameraState, CameraStatus, Decider, DeadLetter, FinalVerdict, SchemaError,
                               decode, encode)
from fallwatch.settings import Settings


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cfg(redis_url: str, r: redis.Redis) -> Settings:
    return Settings(redis={"url": redis_url}, alerts={"cloud_timeout_s": 5.0})


def service(cfg: Settings, r: redis.Redis, keys: Keys, clock: FakeClock, name: str = "a1", **kw) -> AlertsService:
    return AlertsService(cfg, r, keys, name=name, clock=clock, **kw)


def finals(r: redis.Redis, keys: Keys) -> list[FinalVerdict]:
    return [m for m in read_all(r, keys.final_stream()) if isinstance(m, FinalVerdict)]


def unacked(r: redis.Redis, keys: Keys) -> int:
    return int(r.xpending(keys.verdicts_stream(), keys.alerts_group())["pending"])


def test_confident_edge_verdict_is_final_at_once(cfg, r, keys, clock) -> None:
    svc = service(cfg, r, keys, clock)
    plant(r, keys.verdicts_stream(), edge_verdict("cam1:1", clock.t - 0.2, 0.93, confident=True, gt_fall=True))
    rep = svc.step()
    [final] = finals(r, keys)
    assert (final.frame_id, final.decided_by, final.is_fall, final.offloaded) == ("cam1:1", Decider.EDGE, True, False)
    assert final.p_fall == pytest.approx(0.93) and final.gt_fall is True
    assert final.latency_ms == pytest.approx(200, abs=1)
    assert rep.finals == 1 and rep.verdicts == 1
    assert unacked(r, keys) == 0
    assert r.zcard(keys.pending_verdicts()) == 0


def test_offloaded_frame_waits_for_and_takes_the_cloud_verdict(cfg, r, keys, clock) -> None:
    svc = service(cfg, r, keys, clock)
    plant(r, keys.verdicts_stream(), edge_verdict("cam1:2", clock.t, 0.3, confident=False, gt_fall=True))
    assert svc.step().waiting == 1
    assert finals(r, keys) == []
    assert r.zscore(keys.pending_verdicts(), "cam1:2") == pytest.approx(clock.t + 5.0)
    assert r.exists(keys.pending_edge("cam1:2"))
    clock.advance(2.0)
    plant(r, keys.verdicts_stream(), cloud_verdict("cam1:2", clock.t - 2.0, p_fall=0.88))
    svc.step()
    [final] = finals(r, keys)
    assert (final.decided_by, final.is_fall, final.offloaded, final.gt_fall) == (Decider.CLOUD, True, True, True)
    assert final.p_fall == pytest.approx(0.88)
    assert final.latency_ms == pytest.approx(2000, abs=1)
    assert r.zcard(keys.pending_verdicts()) == 0 and not r.exists(keys.pending_edge("cam1:2"))
    assert unacked(r, keys) == 0


def test_no_cloud_verdict_falls_back_to_edge_after_the_timeout(cfg, r, keys, clock) -> None:
    svc = service(cfg, r, keys, clock)
    plant(r, keys.verdicts_stream(), edge_verdict("cam1:3", clock.t, 0.7, confident=False))
    svc.step()
    clock.advance(4.9)
    assert svc.step().finals == 0 and finals(r, keys) == []
    clock.advance(0.2)
    rep = svc.step()
    assert rep.timeouts == 1
    [final] = finals(r, keys)
    assert (final.decided_by, final.is_fall, final.offloaded) == (Decider.EDGE_TIMEOUT, True, True)
    assert final.p_fall == pytest.approx(0.7)
    # the cloud answers late: ignored, still one final verdict
    plant(r, keys.verdicts_stream(), cloud_verdict("cam1:3", clock.t - 5.1, p_fall=0.1))
    assert svc.step().duplicates == 1
    assert len(finals(r, keys)) == 1


def test_cloud_failure_falls_back_to_the_edge_verdict(cfg, r, keys, clock) -> None:
    svc = service(cfg, r, keys, clock)
    plant(r, keys.verdicts_stream(), edge_verdict("cam1:4", clock.t, 0.64, confident=False),
          cloud_verdict("cam1:4", clock.t, ok=False))
    svc.step()
    [final] = finals(r, keys)
    assert (final.decided_by, final.is_fall, final.p_fall) == (Decider.EDGE_CLOUD_FAILED, True, pytest.approx(0.64))
    assert r.zcard(keys.pending_verdicts()) == 0


def test_duplicates_and_cloud_before_edge_give_one_final_per_frame(cfg, r, keys, clock) -> None:
    svc = service(cfg, r, keys, clock)
    t = clock.t
    plant(r, keys.verdicts_stream(),
          edge_verdict("cam1:5", t, 0.9), edge_verdict("cam1:5", t, 0.9),           # same verdict twice
          cloud_verdict("cam1:6", t, p_fall=0.8),                                    # cloud first, usable
          edge_verdict("cam1:6", t, 0.4, confident=False, gt_fall=False),
          cloud_verdict("cam1:7", t, ok=False),                                      # cloud first, failed
          edge_verdict("cam1:7", t, 0.2, confident=False),
          edge_verdict("cam1:8", t, 0.55, confident=False),                           # cloud twice
          cloud_verdict("cam1:8", t, p_fall=0.1), cloud_verdict("cam1:8", t, p_fall=0.1))
    svc.step()
    by_frame = {f.frame_id: f for f in finals(r, keys)}
    assert len(finals(r, keys)) == 4
    assert by_frame["cam1:5"].decided_by is Decider.EDGE
    assert (by_frame["cam1:6"].decided_by, by_frame["cam1:6"].is_fall) == (Decider.CLOUD, True)
    assert (by_frame["cam1:7"].decided_by, by_frame["cam1:7"].is_fall) == (Decider.EDGE_CLOUD_FAILED, False)
    assert (by_frame["cam1:8"].decided_by, by_frame["cam1:8"].is_fall) == (Decider.CLOUD, False)
    # the same inputs delivered again much later change nothing
    clock.advance(60)
    plant(r, keys.verdicts_stream(), edge_verdict("cam1:5", t, 0.9), cloud_verdict("cam1:6", t, p_fall=0.8))
    svc.step()
    assert len(finals(r, keys)) == 4
    assert r.zcard(keys.pending_verdicts()) == 0 and not r.keys(keys.pending_cloud("*"))
    # cam1:6 was decided before its ground truth arrived; it is scored once, as a false positive
    st = read_stats(r, keys)
    assert (st.finals, st.scored, st.fp) == (4, 1, 1)


def test_waiting_state_lives_in_redis_and_another_process_carries_on(cfg, r, keys, clock) -> None:
    first = service(cfg, r, keys, clock, name="first")
    plant(r, keys.verdicts_stream(), edge_verdict("cam2:1", clock.t, 0.45, confident=False))
    first.step()
    del first  # the process is gone; a new one takes over from the state in Redis
    second = service(cfg, r, keys, clock, name="second")
    plant(r, keys.verdicts_stream(), cloud_verdict("cam2:1", clock.t, p_fall=0.97))
    second.step()
    [final] = finals(r, keys)
    assert (final.decided_by, final.is_fall) == (Decider.CLOUD, True)


def test_entries_of_a_dead_consumer_are_reclaimed(cfg, r, keys, clock) -> None:
    svc = service(cfg, r, keys, clock, name="alive", claim_idle_ms=100, claim_every_s=0.0)
    svc.setup()
    plant(r, keys.verdicts_stream(), edge_verdict("cam3:1", clock.t, 0.9))
    # a consumer reads the entry and dies before acknowledging it
    r.xreadgroup(keys.alerts_group(), "dead", {keys.verdicts_stream(): ">"}, count=10)
    assert unacked(r, keys) == 1
    assert svc.step().finals == 0  # not idle long enough yet
    time.sleep(0.15)
    rep = svc.step()
    assert rep.claimed >= 1 and rep.finals == 1
    assert len(finals(r, keys)) == 1 and unacked(r, keys) == 0


def test_garbage_entries_are_dead_lettered_and_the_service_carries_on(cfg, r, keys, clock) -> None:
    svc = service(cfg, r, keys, clock)
    vs = keys.verdicts_stream()
    r.xadd(vs, {"junk": "1"})
    r.xadd(vs, {"t": "edge", "v": "1", "m": "{not json"})
    r.xadd(vs, {"t": "edge", "v": "9", "m": "{}"})
    r.xadd(vs, encode(CameraStatus(camera_id="cam1", state=CameraState.OFFLINE)))  # wrong stream
    r.xadd(keys.camera_status_stream(), {"t": "camera_status", "v": "1", "m": '{"camera_id": 5}'})
    plant(r, vs, edge_verdict("cam4:1", clock.t, 0.1))
    rep = svc.step()
    assert rep.dead_letters == 5 and rep.finals == 1
    letters = [m for m in read_all(r, keys.dead_letter_stream()) if isinstance(m, DeadLetter)]
    assert [d.reason for d in letters] == ["schema_error"] * 5
    assert "not a fallwatch message" in letters[0].error
    assert "unsupported schema version 9" in letters[2].error
    assert "expected an edge or cloud verdict" in letters[3].error
    assert {d.source for d in letters} == {vs, keys.camera_status_stream()}
    assert all(d.entry_id for d in letters)
    assert unacked(r, keys) == 0
    assert r.xpending(keys.camera_status_stream(), keys.status_group())["pending"] == 0


def test_final_stream_entries_decode(cfg, r, keys, clock) -> None:
    svc = service(cfg, r, keys, clock)
    plant(r, keys.verdicts_stream(), edge_verdict("cam5:1", clock.t, 0.2))
    svc.step()
    [(_, fields)] = r.xrange(keys.final_stream())
    msg, images = decode(fields, expect=FinalVerdict)
    assert msg.frame_id == "cam5:1" and images == []
    with pytest.raises(SchemaError):
        decode(fields, expect=DeadLetter)


def test_consumed_verdicts_are_trimmed_but_pending_ones_kept(cfg, r, keys, clock) -> None:
    svc = service(cfg, r, keys, clock, claim_every_s=0.0, claim_idle_ms=60_000)
    svc.setup()
    vs = keys.verdicts_stream()
    plant(r, vs, edge_verdict("cam6:0", clock.t, 0.1))
    [[_, [(first_id, _)]]] = r.xreadgroup(keys.alerts_group(), "slow", {vs: ">"}, count=1)
    plant(r, vs, *(edge_verdict(f"cam6:{i}", clock.t + i, 0.1) for i in range(1, 301)))
    while svc.step().verdicts:
        pass
    assert len(finals(r, keys)) == 300
    svc.step()
    assert r.xlen(vs) == 301  # the oldest unacknowledged entry holds the trim back
    r.xack(vs, keys.alerts_group(), first_id)
    svc.step()
    assert r.xlen(vs) < 150

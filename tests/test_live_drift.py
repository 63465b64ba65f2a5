"""The drift monitor: live agreement of edge-decided items from audits, with a Wilson interval,
against the checkpoint's calibration; a switcher_drift event for the site operator that starts on
a planted drop and ends on recovery."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry

from alerts.drift import SITE, wilson
from alerts.notify import Delivery, channel_id
from alerts.service import AlertsService
from fallwatch.metrics import AlertsMetrics, build_metrics
from fallwatch.schemas import CloudVerdict, EventKind, EventType, decode
from fallwatch.settings import Settings
from fallwatch.status import gather, render
from switcher.publish import publish
from tests.helpers import edge_verdict, plant
from tests.live_helpers import make_checkpoint

OPERATOR, CAREGIVER = "json://127.0.0.1:9/operator", "json://127.0.0.1:9/caregiver"


def test_wilson_interval() -> None:
    low, high = wilson(81, 100)
    assert low == pytest.approx(0.7222, abs=1e-3) and high == pytest.approx(0.8749, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(50, 50)[1] == 1.0 and wilson(50, 50)[0] > 0.9


def _audit(n: int, agree: bool, version: str, at: float) -> CloudVerdict:
    return CloudVerdict(frame_id=f"cam1:{n}", camera_id="cam1", captured_at=at, p_fall=0.1 if agree else 0.9,
                        is_fall=not agree, route="audit", edge_p_fall=0.2, switcher_version=version)


def test_drift_event_starts_on_a_planted_drop_and_ends_on_recovery(redis_url, r, keys, tmp_path) -> None:
    settings = Settings(redis={"url": redis_url}, notifications={"urls": [CAREGIVER]},
                        dmd={"drift_window": 100, "drift_min_audits": 30, "drift_notify": [OPERATOR]})
    ckpt = make_checkpoint(tmp_path / "ckpt", "edge", ["q"], 8, 0,
                           calibration={"expected_agreement": 0.95, "offload_fraction": 0.2})
    version = publish(r, keys, ckpt)
    metrics = AlertsMetrics.create(build_metrics(CollectorRegistry()))
    svc = AlertsService(settings, r, keys, name="d1", metrics=metrics)
    now, n, seen_at = time.time(), 0, []  # seen_at: audits fed when each drift event came

    def feed(count: int, agree_of) -> list:
        nonlocal n
        got = []
        for _ in range(count):
            # the edge verdicts around the audit: 1 in 5 offloaded
            plant(r, keys.verdicts_stream(), edge_verdict(f"cam1:e{n}", now, 0.2, confident=n % 5 != 0),
                  _audit(n, agree_of(n), version, now))
            n += 1
            got += [e for e in svc.step().events if e.kind is EventKind.SWITCHER_DRIFT]
            seen_at.extend([n] * (len(got) - len(seen_at)))
        return got

    assert feed(100, lambda i: i % 50 != 0) == []  # 98% agreement: as calibrated
    change = n
    started = feed(100, lambda i: i % 10 < 7)  # traffic changes: 70% agreement
    assert [(e.type, e.camera_id) for e in started] == [(EventType.START, "cam1"), (EventType.START, SITE)]
    start = started[0]
    assert "expected 95.0%" in start.description and version in start.description
    assert 30 <= seen_at[0] - change < 100  # not before enough audits, well within one window of the change
    state = {row.scope: row for row in gather(r, settings).drift}
    assert state["cam1"].drifting and state["cam1"].high < 0.95 and state["cam1"].audits == 100
    assert state[SITE].offload_rate == pytest.approx(0.2, abs=0.01) and state[SITE].offload_expected == 0.2
    render(gather(r, settings))  # the status table renders the drift rows
    gauge = metrics.switcher_drift.labels("cam1", "agreement_high")._value.get()
    assert gauge == pytest.approx(state["cam1"].high)
    outbox = [decode(f, expect=Delivery)[0] for _, f in r.xrange(keys.notify_outbox_stream())]
    drift_notes = [d for d in outbox if d.kind is EventKind.SWITCHER_DRIFT]
    assert {d.channel for d in drift_notes} == {channel_id(OPERATOR)}  # the operator, never the caregivers
    assert len(drift_notes) == 2
    assert feed(30, lambda i: True) == []  # recovering: not yet above the expectation
    ended = feed(200, lambda i: True)
    assert [(e.type, e.camera_id) for e in ended] == [(EventType.END, "cam1"), (EventType.END, SITE)]
    assert ended[0].event_id == start.event_id
    assert not any(row.drifting for row in gather(r, settings).drift)

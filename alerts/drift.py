"""The drift monitor: is the switcher still right about this traffic?

Audits are a uniform sample of the items the edge decided alone, so among them the share where
edge and cloud agree estimates the live agreement rate of edge-decided items. Per camera and
for the whole site (scope ``*``) the monitor keeps the latest ``dmd.drift_window`` audit
outcomes of the running switcher version and computes that rate with a Wilson interval
(``dmd.drift_z``). The checkpoint's calibration says what to expect
(``calibration.expected_agreement``: the agreement rate of the items it keeps on the edge) and
how much it should offload (``calibration.offload_fraction``); the live offload rate comes from
the latest ``dmd.offload_window`` edge decisions.

When, after at least ``dmd.drift_min_audits`` audits, the interval's upper bound falls below the
expectation, a ``switcher_drift`` event starts (notified only to ``dmd.drift_notify``, whoever
runs the site, never to caregivers); it ends once the upper bound is back at or above it.
A newly promoted version starts a fresh window. Figures go to Prometheus
(``fallwatch_switcher_drift{scope, figure}``) and to ``keys.drift_state()`` for ``fallwatch status``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
import structlog

from alerts.merge import cloud_decision
from alerts.notify import Delivery, channel_id, compose
from alerts.store import write_event
from fallwatch.keys import Keys
from fallwatch.metrics import AlertsMetrics
from fallwatch.schemas import AlertEvent, CloudVerdict, EdgeVerdict, EventKind, EventType, encode
from fallwatch.settings import Settings

log = structlog.get_logger(__name__)

SITE = "*"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Figures:
    scope: str
    version: str | None
    audits: int
    agreement: float | None
    low: float
    high: float
    expected: float | None
    offload_rate: float | None
    offload_expected: float | None
    event_id: str | None = None
    at: float = 0.0
    since: float | None = None  # start of the open drift event

    @property
    def drifting(self) -> bool:
        return self.expected is not None and self.high < self.expected

    def gauges(self) -> dict[str, float | None]:
        return {"agreement": self.agreement, "agreement_low": self.low, "agreement_high": self.high,
                "agreement_expected": self.expected, "offload_rate": self.offload_rate,
                "offload_expected": self.offload_expected, "audits": float(self.audits),
                "drifting": float(self.event_id is not None)}


def describe(f: Figures, z: float) -> str:
    conf = round(100 * (math.erf(z / math.sqrt(2))))
    off = "" if f.offload_rate is None else f"; offload {100 * f.offload_rate:.1f}%" + (
        "" if f.offload_expected is None else f" (calibrated {100 * f.offload_expected:.1f}%)")
    return (f"edge/cloud agreement {100 * (f.agreement or 0):.1f}% ({conf}% interval {100 * f.low:.1f}-{100 * f.high:.1f}%) "
            f"over the last {f.audits} audits, expected {100 * (f.expected or 0):.1f}% for switcher {f.version}{off}")


def card_expectation(card: dict[str, Any]) -> tuple[float | None, float | None]:
    cal = card.get("calibration") or {}
    return cal.get("expected_agreement"), cal.get("offload_fraction")


class DriftMonitor:
    """Fed by the alerts service: every edge verdict (offload rate) and every usable audit verdict."""

    def __init__(self, client: redis.Redis, keys: Keys, settings: Settings, metrics: AlertsMetrics | None = None,
                 clock: Callable[[], float] = time.time):
        self.client, self.keys, self.settings, self.clock = client, keys, settings, clock
        self.cfg = settings.dmd
        self.metrics = metrics or AlertsMetrics.create()
        self._expected: dict[str | None, tuple[float | None, float | None]] = {}

    # --- inputs ----------------------------------------------------------------------------
    def on_edge(self, v: EdgeVerdict) -> None:
        pipe = self.client.pipeline(transaction=False)
        for scope in (v.camera_id, SITE):
            pipe.lpush(self.keys.offload_rate(scope), "0" if v.confident else "1")
            pipe.ltrim(self.keys.offload_rate(scope), 0, self.cfg.offload_window - 1)
        pipe.execute()

    def on_audit(self, c: CloudVerdict) -> list[AlertEvent]:
        assert c.edge_p_fall is not None
        agree = (c.edge_p_fall >= 0.5) == cloud_decision(c)[0]
        scopes = (c.camera_id, SITE)
        pipe = self.client.pipeline(transaction=False)
        for scope in scopes:
            key = self.keys.drift_window(scope, c.switcher_version)
            pipe.lpush(key, "1" if agree else "0")
            pipe.ltrim(key, 0, self.cfg.drift_window - 1)
            pipe.expire(key, int(self.cfg.store_max_age_s))
            pipe.lrange(key, 0, -1)
            pipe.lrange(self.keys.offload_rate(scope), 0, -1)
        out = pipe.execute()
        events = []
        for n, scope in enumerate(scopes):
            window, offloads = out[5 * n + 3], out[5 * n + 4]
            events += self.update(self.figures(scope, c.switcher_version, window, offloads))
        return events

    # --- figures ---------------------------------------------------------------------------
    def figures(self, scope: str, version: str | None, window: list[bytes], offloads: list[bytes]) -> Figures:
        k, n = sum(x == b"1" for x in window), len(window)
        low, high = wilson(k, n, self.cfg.drift_z)
        expected, offload_expected = self.expectation(version)
        offload = sum(x == b"1" for x in offloads) / len(offloads) if offloads else None
        return Figures(scope, version, n, k / n if n else None, low, high, expected, offload, offload_expected,
                       at=self.clock())

    def expectation(self, version: str | None) -> tuple[float | None, float | None]:
        """(expected agreement, calibrated offload fraction) of a switcher version, from its card."""
        if version not in self._expected:
            self._expected[version] = card_expectation(self._card(version))
        return self._expected[version]

    def _card(self, version: str | None) -> dict[str, Any]:
        if version is not None:
            raw = self.client.hget(self.keys.switcher_checkpoint(version), "card")
            if raw is not None:
                return json.loads(raw)
        path = self.settings.switcher.checkpoint
        if path is not None and (Path(path) / "switcher.json").is_file():
            return json.loads((Path(path) / "switcher.json").read_text())
        return {}

    # --- events ----------------------------------------------------------------------------
    def update(self, fig: Figures) -> list[AlertEvent]:
        """Record the figures; start or end the scope's drift event. One transaction per scope."""
        key = self.keys.drift_state()
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    before = self._open_event(pipe, fig.scope)
                    fig, events = self._transition(fig, before)
                    pipe.multi()
                    pipe.hset(key, fig.scope, json.dumps(asdict(fig)))
                    for ev in events:
                        self._queue_event(pipe, ev)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        self.metrics.drift(fig.scope, fig.gauges())
        for ev in events:
            log.warning("switcher_drift", type=ev.type.value, scope=fig.scope, description=ev.description)
        return events

    def _open_event(self, pipe: Any, scope: str) -> tuple[str | None, float | None]:
        raw = pipe.hget(self.keys.drift_state(), scope)
        if raw is None:
            return None, None
        data = json.loads(raw)
        return data.get("event_id"), data.get("since")

    def _transition(self, fig: Figures, before: tuple[str | None, float | None]) -> tuple[Figures, list[AlertEvent]]:
        event_id, since = before
        enough = fig.audits >= self.cfg.drift_min_audits
        if event_id is None and enough and fig.drifting:
            ev = self._event(EventType.START, fig, None, fig.at)
            return Figures(**{**asdict(fig), "event_id": ev.event_id, "since": fig.at}), [ev]
        if event_id is not None and enough and not fig.drifting:
            return fig, [self._event(EventType.END, fig, event_id, since or fig.at)]
        return Figures(**{**asdict(fig), "event_id": event_id, "since": since}), []

    def _event(self, type_: EventType, fig: Figures, event_id: str | None, started_at: float) -> AlertEvent:
        kw = {} if event_id is None else {"event_id": event_id}
        return AlertEvent(type=type_, kind=EventKind.SWITCHER_DRIFT, camera_id=fig.scope,
                          camera_name="whole site" if fig.scope == SITE else fig.scope, started_at=started_at,
                          at=fig.at, confidence=fig.agreement, description=describe(fig, self.cfg.drift_z), **kw)

    def _queue_event(self, pipe: Any, ev: AlertEvent) -> None:
        write_event(pipe, self.keys, ev, active=ev.type is not EventType.END, maxlen=self.settings.alerts.stream_maxlen)
        if ev.type is EventType.START:
            title, body = compose(ev, self.settings)
            for url in self.cfg.drift_notify:
                note = Delivery(event_id=ev.event_id, channel=channel_id(url.get_secret_value()), camera_id=ev.camera_id,
                                kind=ev.kind, title=title, body=body, frame_id=None)
                pipe.xadd(self.keys.notify_outbox_stream(), encode(note))

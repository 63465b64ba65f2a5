"""The alerts service: verdicts in, final verdicts and alert events out.

One :meth:`AlertsService.step` reads a batch from the verdicts and final streams (group
``keys.alerts_group()``) and the camera-status stream (group ``keys.status_group()``), merges
verdicts into final verdicts (``alerts.merge``), finalises frames whose cloud deadline passed,
applies the final verdicts and status changes to the camera state machines (``alerts.store``)
and ends quiet events. Every entry is acknowledged only after what it caused is written, and a
bad entry is dead-lettered and acknowledged so the service carries on. Final verdicts go through
their own stream so the event stage is at-least-once too: a crash between writing a final
verdict and applying it to the camera leaves the final-stream entry pending, to be reclaimed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
import structlog

from alerts.audit import AuditHandler, is_audit
from alerts.drift import DriftMonitor
from alerts.merge import MergeOutcome, MergeResult, VerdictMerger
from alerts.store import EventStore
from fallwatch.streams import (Entry, ack, dead_letter, ensure_group, read_group, read_own_pending, reclaim,
                               trim_consumed)
from fallwatch.keys import Keys
from fallwatch.logging import redact_text
from fallwatch.metrics import AlertsMetrics
from fallwatch.role import RoleLoop
from fallwatch.runtime import Heartbeat, worker_name
from fallwatch.schemas import AlertEvent, CameraStatus, CloudVerdict, EdgeVerdict, FinalVerdict, SchemaError, decode
from fallwatch.settings import Settings

log = structlog.get_logger(__name__)

ROLE = "alerts"


@dataclass(frozen=True)
class AlertsStepReport:
    """What one :meth:`AlertsService.step` did."""

    verdicts: int = 0
    statuses: int = 0
    finals: int = 0
    duplicates: int = 0
    waiting: int = 0
    timeouts: int = 0
    dead_letters: int = 0
    claimed: int = 0
    events: tuple[AlertEvent, ...] = field(default_factory=tuple)


class AlertsService(RoleLoop):
    """Run with :meth:`run` in a thread (stop with the event) or drive :meth:`step` directly."""

    log_name = "alerts"

    def __init__(self, settings: Settings, client: redis.Redis, keys: Keys, name: str | None = None,
                 clock: Callable[[], float] = time.time, batch: int = 100, block_ms: int = 500,
                 claim_idle_ms: int | None = None, claim_every_s: float = 15.0,
                 metrics: AlertsMetrics | None = None):
        self.settings, self.client, self.keys = settings, client, keys
        self.name = name or worker_name(ROLE)
        self.metrics = metrics or AlertsMetrics.create()
        self.beat = Heartbeat(client, keys, ROLE, self.name, settings.metrics)
        self.clock, self.batch, self.block_ms = clock, batch, block_ms
        self.claim_idle_ms = claim_idle_ms if claim_idle_ms is not None else settings.edge.claim_idle_ms
        self.claim_every_s = claim_every_s
        self.merger = VerdictMerger(client, keys, settings.alerts, clock, worker=self.name)
        self.store = EventStore(client, keys, settings, clock)
        self.drift = DriftMonitor(client, keys, settings, self.metrics, clock) if settings.switcher.audit_fraction else None
        self.audits = AuditHandler(client, keys, self.store, self.drift)
        self.group, self.status_group = keys.alerts_group(), keys.status_group()
        self.verdicts, self.finals = keys.verdicts_stream(), keys.final_stream()
        self.status = keys.camera_status_stream()
        self._last_claim: float | None = None
        self._ready = False

    def setup(self) -> None:
        ensure_group(self.client, self.verdicts, self.group)
        ensure_group(self.client, self.finals, self.group)
        ensure_group(self.client, self.status, self.status_group)

    # --- one batch -------------------------------------------------------------------------------
    def step(self, block_ms: int | None = None) -> AlertsStepReport:
        """Process one batch. ``block_ms`` None: do not wait for new entries."""
        if not self._ready:
            self.setup()
            self._ready = True
        tally: Counter[str] = Counter()
        events: list[AlertEvent] = []
        if self._claim_due():
            self._reclaim(tally, events)
            trim_consumed(self.client, self.verdicts)
        for entry in read_group(self.client, self.group, self.name, [self.verdicts, self.finals], self.batch, block_ms):
            self._dispatch(entry, tally, events)
        for entry in read_group(self.client, self.status_group, self.name, [self.status], self.batch):
            self._dispatch(entry, tally, events)
        for result in self.merger.expire(self.batch):
            self._count_merge(result, tally, timeout=True)
        for entry in read_group(self.client, self.group, self.name, [self.finals], self.batch):
            self._dispatch(entry, tally, events)
        events += self.store.tick()
        for ev in events:
            self.metrics.event(ev.kind.value, ev.type.value)
        return AlertsStepReport(events=tuple(events), **tally)

    def _claim_due(self) -> bool:
        now = time.monotonic()
        if self._last_claim is None or now - self._last_claim >= self.claim_every_s:
            self._last_claim = now
            return True
        return False

    def _reclaim(self, tally: Counter[str], events: list[AlertEvent]) -> None:
        """Own pending entries (same consumer name restarted) and idle ones of dead consumers."""
        sources = [(self.verdicts, self.group), (self.finals, self.group), (self.status, self.status_group)]
        for stream, group in sources:
            entries = read_own_pending(self.client, group, self.name, stream, self.batch)
            entries += reclaim(self.client, stream, group, self.name, self.claim_idle_ms, self.batch)
            tally["claimed"] += len(entries)
            for entry in entries:
                self._dispatch(entry, tally, events)

    # --- entries ---------------------------------------------------------------------------------
    def _dispatch(self, entry: Entry, tally: Counter[str], events: list[AlertEvent]) -> None:
        group = self.status_group if entry.stream == self.status else self.group
        if entry.fields is None:  # deleted (trimmed) before it was claimed
            ack(self.client, group, entry)
            return
        try:
            self._process(entry, tally, events)
        except SchemaError as exc:
            self._dead(entry, group, "schema_error", str(exc), tally)
            return
        except redis.RedisError:
            raise  # not acknowledged: retried after reconnecting
        except Exception as exc:  # a poison entry must not stop the service
            log.exception("entry_failed", stream=entry.stream, entry_id=entry.id)
            self._dead(entry, group, "processing_error", redact_text(f"{type(exc).__name__}: {exc}"), tally)
            return
        ack(self.client, group, entry)

    def _process(self, entry: Entry, tally: Counter[str], events: list[AlertEvent]) -> None:
        assert entry.fields is not None
        msg, _ = decode(entry.fields)
        if entry.stream == self.verdicts:
            if not isinstance(msg, (EdgeVerdict, CloudVerdict)):
                raise SchemaError(f"expected an edge or cloud verdict on the verdicts stream, got {msg.type_name!r}")
            tally["verdicts"] += 1
            if is_audit(msg):
                events += self.audits.handle(msg)
            else:
                if self.drift is not None and isinstance(msg, EdgeVerdict):
                    self.drift.on_edge(msg)
                self._count_merge(self.merger.handle(msg), tally)
        elif entry.stream == self.finals:
            if not isinstance(msg, FinalVerdict):
                raise SchemaError(f"expected a final verdict on the final stream, got {msg.type_name!r}")
            events += self.store.apply_final(msg)
        else:
            if not isinstance(msg, CameraStatus):
                raise SchemaError(f"expected a camera status, got {msg.type_name!r}")
            tally["statuses"] += 1
            events += self.store.apply_status(msg)

    def _count_merge(self, result: MergeResult, tally: Counter[str], timeout: bool = False) -> None:
        if result.outcome is MergeOutcome.FINAL:
            tally["finals"] += 1
            if result.final is not None:
                self.metrics.final(result.final.decided_by.value, result.final.latency_ms / 1000)
            tally["timeouts"] += int(timeout)
        elif result.outcome is MergeOutcome.DUPLICATE:
            tally["duplicates"] += 1
        elif result.outcome is MergeOutcome.WAITING:
            tally["waiting"] += 1
        else:
            tally["dead_letters"] += 1

    def _dead(self, entry: Entry, group: str, reason: str, error: str, tally: Counter[str]) -> None:
        self.metrics.dead_letter(reason)
        dead_letter(self.client, self.keys.dead_letter_stream(), entry, reason, error, self.name)
        ack(self.client, group, entry)
        tally["dead_letters"] += 1

    # --- loop ------------------------------------------------------------------------------------
    # --- the role loop (fallwatch.role.RoleLoop.run) ----------------------------------------
    def run_once(self) -> AlertsStepReport:
        return self.step(self.block_ms)

    def on_outage(self, exc: BaseException) -> None:
        self._ready = False  # a restarted server may have lost the groups

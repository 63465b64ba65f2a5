"""``fallwatch status``: one read-only snapshot of a running deployment, and its rendering.

:func:`gather` reads Redis only (no writes, no RQ registry clean-up) and returns a
:class:`StatusSnapshot`; :func:`render` turns one into rich tables. Nothing here imports a
component package: the snapshot is built from the keys and streams every role writes.

Consumer-group lag comes from ``XINFO GROUPS`` (``lag``, Redis 7+). On Redis 6.2 the server does
not report it: a group that has read up to the stream's last entry shows 0, any other shows
unknown (None).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field
from rq import Worker

from fallwatch.budget import read_service
from fallwatch.keys import Keys, text
from fallwatch.schemas import AlertEvent, CameraInfo, SchemaError, StatsCounts, decode
from fallwatch.settings import IngestSettings, Settings
from fallwatch.streams import job_queue

DEFAULT_EVENTS = 10


class Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class RedisInfo(Record):
    version: str
    used_memory_bytes: int
    connected_clients: int
    maxmemory_bytes: int = Field(0, description="Redis maxmemory (0: no limit).")
    maxmemory_policy: str = ""
    out_of_memory: bool = Field(False, description="maxmemory reached under noeviction: Redis refuses writes "
                                                   "that add data (ingest drops frames, other writes are retried).")


class CameraRow(Record):
    id: str
    name: str
    configured: bool = Field(description="Listed in this process's settings.")
    state: str = Field(description="online / offline as last reported by ingest; 'unknown' if never seen.")
    online: bool = Field(description="Reported online and its last frame is recent.")
    stale: bool = Field(description="Reported online but no frame for longer than expected.")
    fps: float | None = None
    sample_fps: float | None = None
    last_frame_at: float | None = None
    last_frame_age_s: float | None = None
    reason: str = ""
    dropped_oom: int = Field(0, description="Frames ingest dropped because Redis was out of memory (total).")


class GroupRow(Record):
    name: str
    consumers: int
    pending: int
    lag: int | None = Field(description="Entries not yet delivered to the group; None when unknown.")
    last_delivered_id: str


class StreamRow(Record):
    name: str
    key: str
    length: int
    groups: list[GroupRow]


class QueueRow(Record):
    name: str
    depth: int
    started: int
    failed: int
    workers: int


class WorkerRow(Record):
    role: str
    name: str
    last_beat_at: float | None
    ttl_s: float | None
    metrics: str | None = Field(None, description="host:port of its Prometheus endpoint, if advertised.")


class EventRow(Record):
    entry_id: str
    event_id: str
    type: str
    kind: str
    camera_id: str
    camera_name: str
    at: float
    confidence: float | None
    decided_by: str | None
    acknowledged: bool
    escalation_tier: int = Field(0, description="Fall events: last tier notified (0: none).")
    escalation_tiers: int = 0
    next_escalation_at: float | None = Field(None, description="When the next tier is due unless acknowledged.")
    still_seen: bool | None = Field(None, description="Fall events: do the models still see the fall?")
    outcome: str | None = Field(None, description="How a person resolved the event.")


class ScoringRow(Record):
    finals: int
    offloaded: int
    offload_rate: float | None
    by_decider: dict[str, int]


class BudgetRow(Record):
    mode: str
    tokens: float | None = Field(None, description="hard: tokens in the shared bucket now (refill included).")
    capacity: float | None = None
    unit: str | None = None
    kept_budget: int = Field(0, description="Would-be offloads kept on the edge: budget spent (edge_budget).")
    kept_shed: int = Field(0, description="Would-be offloads kept on the edge: too late to answer (edge_shed).")
    cloud_item_s: float | None = Field(None, description="Cloud's recent measured seconds per item.")


class StatusSnapshot(Record):
    at: float
    key_prefix: str
    redis: RedisInfo
    cameras: list[CameraRow]
    streams: list[StreamRow]
    queue: QueueRow
    workers: list[WorkerRow]
    events: list[EventRow]
    scoring: ScoringRow
    problems: list[str] = Field(default_factory=list, description="Entries that could not be read.")
    escalations_pending: int = Field(0, description="Open fall events waiting for their next escalation tier.")
    drift: list["DriftRow"] = Field(default_factory=list, description="Switcher drift figures per camera / site.")
    budget: BudgetRow | None = Field(None, description="The cloud budget: mode, hard bucket level, items kept.")
    down: list[str] = Field(default_factory=list, description="Roles expected here with no live worker.")


class DriftRow(Record):
    """The drift monitor's latest figures of one camera, or of the whole site (scope '*')."""

    scope: str
    version: str | None = None
    audits: int = 0
    agreement: float | None = None
    low: float = 0.0
    high: float = 1.0
    expected: float | None = None
    offload_rate: float | None = None
    offload_expected: float | None = None
    drifting: bool = False


def drift_rows(client: redis.Redis, keys: Keys) -> list[DriftRow]:
    rows = []
    for scope, raw in sorted(client.hgetall(keys.drift_state()).items()):
        data = json.loads(raw)
        fields = {k: v for k, v in data.items() if k in DriftRow.model_fields}
        rows.append(DriftRow(**fields, drifting=data.get("event_id") is not None))
    return rows


# --- gathering -----------------------------------------------------------------------------------


def _float(value: bytes | str | None) -> float | None:
    try:
        return float(text(value)) if text(value) else None
    except ValueError:
        return None


def redis_info(client: redis.Redis) -> RedisInfo:
    server, memory, clients = client.info("server"), client.info("memory"), client.info("clients")
    used, limit = int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))
    policy = str(memory.get("maxmemory_policy", ""))
    counted = used - int(memory.get("mem_not_counted_for_evict", 0))  # what Redis compares with maxmemory
    return RedisInfo(version=str(server.get("redis_version", "?")), used_memory_bytes=used,
                     connected_clients=int(clients.get("connected_clients", 0)), maxmemory_bytes=limit,
                     maxmemory_policy=policy, out_of_memory=bool(limit) and policy == "noeviction" and counted >= limit)


def memory_problem(info: RedisInfo, cameras: list["CameraRow"]) -> list[str]:
    """The line ``fallwatch status`` shows while Redis is out of memory."""
    if not info.out_of_memory:
        return []
    return [f"Redis out of memory: {info.used_memory_bytes / 2**20:.1f} MiB used of maxmemory "
            f"{info.maxmemory_bytes / 2**20:.1f} MiB (noeviction): ingest drops new frames "
            f"({sum(c.dropped_oom for c in cameras)} counted so far), other writes are retried"]


def camera_ids(client: redis.Redis, keys: Keys, settings: Settings) -> list[str]:
    """Configured cameras first, then any other camera ingest has reported on."""
    ids = [c.id for c in settings.cameras]
    seen = sorted(keys.camera_of_info(k) for k in client.scan_iter(match=keys.camera_info("*"), count=1000))
    return ids + [cid for cid in seen if cid not in ids]


def _stale_after_s(ing: IngestSettings) -> float:
    """How long an online camera may go without a frame (motion gating sends one per keepalive)."""
    return 2 * max(ing.read_timeout_s, ing.keepalive_s if ing.motion_gating else 0.0, 1 / ing.fps)


def camera_row(client: redis.Redis, keys: Keys, settings: Settings, camera_id: str, now: float) -> CameraRow:
    try:
        info = CameraInfo.from_hash(client.hgetall(keys.camera_info(camera_id)))
    except SchemaError:  # written by another version: shown as unknown
        info = CameraInfo()
    configured = {c.id: c for c in settings.cameras}
    cam = configured.get(camera_id)
    last = info.last_frame_at
    age = max(0.0, now - last) if last is not None else None
    state = info.state.value if info.state else "unknown"
    ing = settings.effective_ingest(cam) if cam else settings.ingest
    stale = state == "online" and (age is None or age > _stale_after_s(ing))
    return CameraRow(
        id=camera_id, name=info.name or (cam.display_name if cam else camera_id), configured=cam is not None,
        state=state, online=state == "online" and not stale, stale=stale, fps=info.fps,
        sample_fps=info.sample_fps, last_frame_at=last, last_frame_age_s=age, reason=info.reason,
        dropped_oom=int(client.get(keys.camera_counter(camera_id, "oom")) or 0),
    )


def stream_names(keys: Keys) -> dict[str, str]:
    """Display name -> stream key, in pipeline order."""
    return {
        "frames": keys.frames_stream(), "verdicts": keys.verdicts_stream(), "final": keys.final_stream(),
        "alerts": keys.alerts_stream(), "dead-letter": keys.dead_letter_stream(),
        "camera-status": keys.camera_status_stream(), "notify-outbox": keys.notify_outbox_stream(),
    }


def _group_lag(group: dict[Any, Any], last_generated: str) -> int | None:
    if "lag" in group:
        return None if group["lag"] is None else int(group["lag"])
    return 0 if text(group.get("last-delivered-id")) == last_generated else None


def stream_row(client: redis.Redis, name: str, key: str) -> StreamRow:
    try:
        info = client.xinfo_stream(key)
    except redis.ResponseError:  # no such stream yet
        return StreamRow(name=name, key=key, length=0, groups=[])
    last_generated = text(info.get("last-generated-id"))
    groups = [
        GroupRow(name=text(g["name"]), consumers=int(g["consumers"]), pending=int(g["pending"]),
                 lag=_group_lag(g, last_generated), last_delivered_id=text(g.get("last-delivered-id")))
        for g in client.xinfo_groups(key)
    ]
    return StreamRow(name=name, key=key, length=int(info["length"]), groups=groups)


def queue_row(client: redis.Redis, keys: Keys, settings: Settings) -> QueueRow:
    q = job_queue(client, keys.cloud_queue(settings.cloud.queue))
    return QueueRow(
        name=q.name, depth=q.count, started=q.started_job_registry.get_job_count(cleanup=False),
        failed=q.failed_job_registry.get_job_count(cleanup=False), workers=Worker.count(connection=client, queue=q),
    )


def worker_rows(client: redis.Redis, keys: Keys) -> list[WorkerRow]:
    rows = []
    for raw in sorted(client.scan_iter(match=keys.heartbeat_pattern(), count=1000)):
        key = text(raw)
        role, name = keys.heartbeat_of(key)
        pipe = client.pipeline(transaction=False)
        pipe.get(key).pttl(key).get(keys.metrics_endpoint(role, name))
        beat, pttl, endpoint = pipe.execute()
        if beat is None:  # expired between SCAN and GET
            continue
        rows.append(WorkerRow(role=role, name=name, last_beat_at=_float(beat),
                              ttl_s=pttl / 1000 if pttl and pttl > 0 else None, metrics=text(endpoint) or None))
    return rows


def recent_events(client: redis.Redis, keys: Keys, count: int, problems: list[str]) -> list[EventRow]:
    rows = []
    for entry_id, fields in client.xrevrange(keys.alerts_stream(), count=count):
        try:
            ev, _ = decode(fields, expect=AlertEvent)
        except SchemaError as exc:
            problems.append(f"alerts entry {text(entry_id)}: {exc}")
            continue
        rows.append(EventRow(
            entry_id=text(entry_id), event_id=ev.event_id, type=ev.type.value, kind=ev.kind.value,
            camera_id=ev.camera_id, camera_name=ev.camera_name or ev.camera_id, at=ev.at,
            confidence=ev.confidence, decided_by=ev.decided_by.value if ev.decided_by else None,
            acknowledged=ev.acknowledged, escalation_tier=ev.escalation_tier, escalation_tiers=ev.escalation_tiers,
            next_escalation_at=ev.next_escalation_at, still_seen=ev.still_seen,
            outcome=ev.outcome.value if ev.outcome else None,
        ))
    return rows


def scoring_row(client: redis.Redis, keys: Keys) -> ScoringRow:
    """Final-verdict counts from the alerts service's stats hash."""
    counts = StatsCounts.from_hash(client.hgetall(keys.stats()))
    finals, offloaded = counts.finals, counts.offloaded
    by = dict(sorted(counts.by_decider.items()))
    return ScoringRow(finals=finals, offloaded=offloaded, offload_rate=offloaded / finals if finals else None,
                      by_decider=by)


def budget_row(client: redis.Redis, keys: Keys, settings: Settings, now: float) -> BudgetRow:
    """Read-only: the bucket is refilled here on paper, never written."""
    cfg = settings.cloud.budget
    tokens, capacity, unit = None, None, None
    if cfg.mode == "hard":
        capacity, unit = cfg.hard_per_hour * cfg.burst_s / 3600, cfg.hard_unit
        level, ts = (_float(v) for v in client.hmget(keys.budget_bucket(), "tokens", "ts"))
        refill = 0.0 if ts is None else max(0.0, now - ts) * cfg.hard_per_hour / 3600
        tokens = capacity if level is None else min(capacity, level + refill)
    kept = client.mget(keys.counter("offloads_edge_budget"), keys.counter("offloads_edge_shed"))
    budget, shed = (int(_float(v) or 0) for v in kept)
    service = read_service(client, keys, cfg.default_service_s, cfg.service_ttl_s)
    return BudgetRow(mode=cfg.mode, tokens=tokens, capacity=capacity, unit=unit, kept_budget=budget, kept_shed=shed,
                     cloud_item_s=service.item_s if service.measured else None)
def broken_channels(client: redis.Redis, keys: Keys) -> list[str]:
    """Why the notifier cannot use a channel, one line each."""
    return [f"notifications: {text(v)}" for v in sorted(client.hvals(keys.notify_broken()))]


def down_roles(settings: Settings, workers: list[WorkerRow]) -> list[str]:
    """Roles with no live heartbeat (ingest only when a camera is enabled)."""
    expected = ["ingest"] if any(c.enabled for c in settings.cameras) else []
    live = {w.role for w in workers}
    return [r for r in (*expected, "edge", "cloud", "alerts") if r not in live]


def gather(client: redis.Redis, settings: Settings, events: int = DEFAULT_EVENTS,
           now: float | None = None) -> StatusSnapshot:
    """A read-only snapshot of cameras, streams, queue, workers, recent events and offload rate."""
    keys = Keys(settings.redis.key_prefix)
    now = time.time() if now is None else now
    info = redis_info(client)
    cameras = [camera_row(client, keys, settings, cid, now) for cid in camera_ids(client, keys, settings)]
    problems: list[str] = memory_problem(info, cameras) + broken_channels(client, keys)
    workers = worker_rows(client, keys)
    return StatusSnapshot(
        at=now, key_prefix=keys.prefix, redis=info, cameras=cameras,
        streams=[stream_row(client, name, key) for name, key in stream_names(keys).items()],
        queue=queue_row(client, keys, settings), workers=workers,
        events=recent_events(client, keys, events, problems), scoring=scoring_row(client, keys),
        problems=problems, escalations_pending=int(client.zcard(keys.escalations())), drift=drift_rows(client, keys),
        budget=budget_row(client, keys, settings, now), down=down_roles(settings, workers),
    )


# --- rendering -----------------------------------------------------------------------------------


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _num(value: float | int | None, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def _camera_table(snap: StatusSnapshot) -> Any:
    from rich.table import Table  # noqa: PLC0415 - rendering only

    t = Table(title="Cameras", title_justify="left", expand=True)
    for col in ("camera", "name", "state", "fps", "sample fps", "last frame", "reason"):
        t.add_column(col)
    for c in snap.cameras:
        style = "green" if c.online else "yellow" if c.stale else "red"
        state = "online (stale)" if c.stale else c.state
        t.add_row(c.id, c.name, f"[{style}]{state}[/]", _num(c.fps, "{:.1f}"), _num(c.sample_fps, "{:.1f}"),
                  _ago(c.last_frame_age_s), c.reason)
    return t


def _stream_table(snap: StatusSnapshot) -> Any:
    from rich.table import Table  # noqa: PLC0415

    t = Table(title="Streams", title_justify="left", expand=True)
    for col in ("stream", "length", "group", "consumers", "pending", "lag"):
        t.add_column(col)
    for s in snap.streams:
        if not s.groups:
            t.add_row(s.name, str(s.length), "-", "-", "-", "-")
        for i, g in enumerate(s.groups):
            t.add_row(s.name if i == 0 else "", str(s.length) if i == 0 else "", g.name, str(g.consumers),
                      str(g.pending), _num(g.lag))
    return t


def _workers_table(snap: StatusSnapshot) -> Any:
    from rich.table import Table  # noqa: PLC0415

    t = Table(title="Workers and queue", title_justify="left", expand=True)
    for col in ("role", "name", "last beat", "metrics"):
        t.add_column(col)
    for w in snap.workers:
        age = snap.at - w.last_beat_at if w.last_beat_at is not None else None
        t.add_row(w.role, w.name, _ago(age), w.metrics or "-")
    for role in snap.down:
        t.add_row(role, "[red]down[/] (no live worker)", "-", "-")
    q = snap.queue
    t.caption = (f"RQ queue {q.name}: {q.depth} waiting, {q.started} running, {q.failed} failed, "
                 f"{q.workers} RQ workers")
    return t


def _events_table(snap: StatusSnapshot) -> Any:
    from rich.table import Table  # noqa: PLC0415

    t = Table(title="Recent events", title_justify="left", expand=True)
    for col in ("when", "type", "kind", "camera", "confidence", "by", "ack", "tier", "seen", "outcome",
                "event (for alerts ack)"):
        t.add_column(col)
    for e in snap.events:
        t.add_row(_ago(snap.at - e.at), e.type, e.kind, e.camera_name, _num(e.confidence, "{:.0%}"),
                  e.decided_by or "-", "yes" if e.acknowledged else "", _tier(snap, e),
                  {True: "yes", False: "no longer"}.get(e.still_seen, "-"), e.outcome or "", e.event_id)
    sc = snap.scoring
    t.caption = (f"final verdicts {sc.finals}, offloaded {sc.offloaded} ({_num(sc.offload_rate, '{:.1%}')}); "
                 + ", ".join(f"{k} {v}" for k, v in sc.by_decider.items())
                 + f"; {snap.escalations_pending} escalations pending")
    return t


def _tier(snap: StatusSnapshot, e: EventRow) -> str:
    """'2/3, next in 3m' for a fall event that escalates; '-' otherwise."""
    if not e.escalation_tier:
        return "-"
    text = f"{e.escalation_tier}/{e.escalation_tiers}"
    if e.next_escalation_at is not None and not e.acknowledged and e.type != "end":
        wait = max(0.0, e.next_escalation_at - snap.at)
        text += f", next in {wait:.0f}s" if wait < 120 else f", next in {wait / 60:.0f}m"
    return text


def _drift_table(snap: StatusSnapshot) -> Any:
    from rich.table import Table  # noqa: PLC0415

    t = Table(title="Switcher drift (from audits)", title_justify="left", expand=True)
    for col in ("scope", "switcher", "audits", "agreement", "interval", "expected", "offload", "calibrated", "drift"):
        t.add_column(col)
    for d in snap.drift:
        t.add_row("site" if d.scope == "*" else d.scope, d.version or "-", str(d.audits), _num(d.agreement, "{:.1%}"),
                  f"{d.low:.1%}-{d.high:.1%}", _num(d.expected, "{:.1%}"), _num(d.offload_rate, "{:.1%}"),
                  _num(d.offload_expected, "{:.1%}"), "[red]yes[/]" if d.drifting else "no")
    return t


def _budget_line(b: BudgetRow) -> str:
    level = f", bucket {b.tokens:.1f} of {b.capacity:.1f} {b.unit}" if b.tokens is not None and b.capacity else ""
    return (f"cloud budget {b.mode}{level}; kept on the edge: edge_budget {b.kept_budget}, edge_shed {b.kept_shed}; "
            f"cloud {_num(b.cloud_item_s, '{:.2f}')} s per item")


def render(snap: StatusSnapshot) -> Any:
    """Rich renderable of a snapshot: cameras, streams, workers and queue, recent events."""
    from rich.console import Group  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    header = Text(f"fallwatch status   prefix {snap.key_prefix}   Redis {snap.redis.version}, "
                  f"{snap.redis.used_memory_bytes / 2**20:.1f} MiB used, {snap.redis.connected_clients} clients")
    parts: list[Any] = [header, _camera_table(snap), _stream_table(snap), _workers_table(snap), _events_table(snap)]
    if snap.drift:
        parts.append(_drift_table(snap))
    if snap.budget is not None:
        parts.append(Text(_budget_line(snap.budget)))
    parts += [Text(p, style="red") for p in snap.problems]
    return Group(*parts)

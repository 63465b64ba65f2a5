"""``fallwatch status``: one read-only snapshot of a running deployment, and its rendering.

:func:`gather` reads Redis only (no writes, no RQ registry clean-up) and returns a
:class:`StatusSnapshot`; :func:`render` turns one into rich tables. Nothing here imports a
component package: the snapshot is built from the keys and streams every role writes.

Consumer-group lag comes from ``XINFO GROUPS`` (``lag``, Redis 7+). On Redis 6.2 the server does
not report it: a group that has read up to the stream's last entry shows 0, any other shows
unknown (None).
"""

from __future__ import annotations

import time
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from fallwatch.keys import Keys
from fallwatch.schemas import AlertEvent, SchemaError, decode
from fallwatch.settings import IngestSettings, Settings

DEFAULT_EVENTS = 10


class Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class RedisInfo(Record):
    version: str
    used_memory_bytes: int
    connected_clients: int


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


class ScoringRow(Record):
    finals: int
    offloaded: int
    offload_rate: float | None
    by_decider: dict[str, int]


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
    down: list[str] = Field(default_factory=list, description="Roles expected here with no live worker.")


# --- gathering -----------------------------------------------------------------------------------


def _s(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _float(value: bytes | str | None) -> float | None:
    try:
        return float(_s(value)) if _s(value) else None
    except ValueError:
        return None


def _between(key: str, pattern: str) -> str:
    """The part of ``key`` matched by the single ``*`` of ``pattern``."""
    head, _, tail = pattern.partition("*")
    return key[len(head):len(key) - len(tail)] if tail else key[len(head):]


def redis_info(client: redis.Redis) -> RedisInfo:
    server, memory, clients = client.info("server"), client.info("memory"), client.info("clients")
    return RedisInfo(version=str(server.get("redis_version", "?")), used_memory_bytes=int(memory.get("used_memory", 0)),
                     connected_clients=int(clients.get("connected_clients", 0)))


def camera_ids(client: redis.Redis, keys: Keys, settings: Settings) -> list[str]:
    """Configured cameras first, then any other camera ingest has reported on."""
    ids = [c.id for c in settings.cameras]
    pattern = keys.camera_info("*")
    seen = sorted(_between(_s(k), pattern) for k in client.scan_iter(match=pattern, count=1000))
    return ids + [cid for cid in seen if cid not in ids]


def _stale_after_s(ing: IngestSettings) -> float:
    """How long an online camera may go without a frame (motion gating sends one per keepalive)."""
    return 2 * max(ing.read_timeout_s, ing.keepalive_s if ing.motion_gating else 0.0, 1 / ing.fps)


def camera_row(client: redis.Redis, keys: Keys, settings: Settings, camera_id: str, now: float) -> CameraRow:
    info = {_s(k): _s(v) for k, v in client.hgetall(keys.camera_info(camera_id)).items()}
    configured = {c.id: c for c in settings.cameras}
    cam = configured.get(camera_id)
    last = _float(info.get("last_frame_at"))
    age = max(0.0, now - last) if last is not None else None
    state = info.get("state") or "unknown"
    ing = settings.effective_ingest(cam) if cam else settings.ingest
    stale = state == "online" and (age is None or age > _stale_after_s(ing))
    return CameraRow(
        id=camera_id, name=info.get("name") or (cam.display_name if cam else camera_id), configured=cam is not None,
        state=state, online=state == "online" and not stale, stale=stale, fps=_float(info.get("fps")),
        sample_fps=_float(info.get("sample_fps")), last_frame_at=last, last_frame_age_s=age,
        reason=info.get("reason", ""),
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
    return 0 if _s(group.get("last-delivered-id")) == last_generated else None


def stream_row(client: redis.Redis, name: str, key: str) -> StreamRow:
    try:
        info = client.xinfo_stream(key)
    except redis.ResponseError:  # no such stream yet
        return StreamRow(name=name, key=key, length=0, groups=[])
    last_generated = _s(info.get("last-generated-id"))
    groups = [
        GroupRow(name=_s(g["name"]), consumers=int(g["consumers"]), pending=int(g["pending"]),
                 lag=_group_lag(g, last_generated), last_delivered_id=_s(g.get("last-delivered-id")))
        for g in client.xinfo_groups(key)
    ]
    return StreamRow(name=name, key=key, length=int(info["length"]), groups=groups)


def queue_row(client: redis.Redis, keys: Keys, settings: Settings) -> QueueRow:
    q = Queue(keys.cloud_queue(settings.cloud.queue), connection=client, serializer=JSONSerializer)
    return QueueRow(
        name=q.name, depth=q.count, started=q.started_job_registry.get_job_count(cleanup=False),
        failed=q.failed_job_registry.get_job_count(cleanup=False), workers=Worker.count(connection=client, queue=q),
    )


def worker_rows(client: redis.Redis, keys: Keys) -> list[WorkerRow]:
    pattern = keys.heartbeat_pattern()
    head = pattern.split("*", 1)[0]
    rows = []
    for raw in sorted(client.scan_iter(match=pattern, count=1000)):
        key = _s(raw)
        role, _, name = key[len(head):].partition(":")
        pipe = client.pipeline(transaction=False)
        pipe.get(key).pttl(key).get(keys.metrics_endpoint(role, name))
        beat, pttl, endpoint = pipe.execute()
        if beat is None:  # expired between SCAN and GET
            continue
        rows.append(WorkerRow(role=role, name=name, last_beat_at=_float(beat),
                              ttl_s=pttl / 1000 if pttl and pttl > 0 else None, metrics=_s(endpoint) or None))
    return rows


def recent_events(client: redis.Redis, keys: Keys, count: int, problems: list[str]) -> list[EventRow]:
    rows = []
    for entry_id, fields in client.xrevrange(keys.alerts_stream(), count=count):
        try:
            ev, _ = decode(fields, expect=AlertEvent)
        except SchemaError as exc:
            problems.append(f"alerts entry {_s(entry_id)}: {exc}")
            continue
        rows.append(EventRow(
            entry_id=_s(entry_id), event_id=ev.event_id, type=ev.type.value, kind=ev.kind.value,
            camera_id=ev.camera_id, camera_name=ev.camera_name or ev.camera_id, at=ev.at,
            confidence=ev.confidence, decided_by=ev.decided_by.value if ev.decided_by else None,
            acknowledged=ev.acknowledged,
        ))
    return rows


def scoring_row(client: redis.Redis, keys: Keys) -> ScoringRow:
    """Final-verdict counts from the alerts service's stats hash."""
    raw = {_s(k): _s(v) for k, v in client.hgetall(keys.stats()).items()}

    def count(name: str) -> int:
        try:
            return int(float(raw.get(name, 0)))
        except ValueError:
            return 0

    finals, offloaded = count("finals"), count("offloaded")
    by = {k.partition(":")[2]: count(k) for k in sorted(raw) if k.startswith("by:")}
    return ScoringRow(finals=finals, offloaded=offloaded, offload_rate=offloaded / finals if finals else None,
                      by_decider=by)


def broken_channels(client: redis.Redis, keys: Keys) -> list[str]:
    """Why the notifier cannot use a channel, one line each."""
    return [f"notifications: {_s(v)}" for v in sorted(client.hvals(keys.notify_broken()))]


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
    problems: list[str] = broken_channels(client, keys)
    workers = worker_rows(client, keys)
    return StatusSnapshot(
        at=now, key_prefix=keys.prefix, redis=redis_info(client),
        cameras=[camera_row(client, keys, settings, cid, now) for cid in camera_ids(client, keys, settings)],
        streams=[stream_row(client, name, key) for name, key in stream_names(keys).items()],
        queue=queue_row(client, keys, settings), workers=workers,
        events=recent_events(client, keys, events, problems), scoring=scoring_row(client, keys),
        problems=problems, down=down_roles(settings, workers),
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
    for col in ("when", "type", "kind", "camera", "confidence", "by", "ack", "event (for alerts ack)"):
        t.add_column(col)
    for e in snap.events:
        t.add_row(_ago(snap.at - e.at), e.type, e.kind, e.camera_name, _num(e.confidence, "{:.0%}"),
                  e.decided_by or "-", "yes" if e.acknowledged else "", e.event_id)
    sc = snap.scoring
    t.caption = (f"final verdicts {sc.finals}, offloaded {sc.offloaded} ({_num(sc.offload_rate, '{:.1%}')}); "
                 + ", ".join(f"{k} {v}" for k, v in sc.by_decider.items()))
    return t


def render(snap: StatusSnapshot) -> Any:
    """Rich renderable of a snapshot: cameras, streams, workers and queue, recent events."""
    from rich.console import Group  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    header = Text(f"fallwatch status   prefix {snap.key_prefix}   Redis {snap.redis.version}, "
                  f"{snap.redis.used_memory_bytes / 2**20:.1f} MiB used, {snap.redis.connected_clients} clients")
    parts: list[Any] = [header, _camera_table(snap), _stream_table(snap), _workers_table(snap), _events_table(snap)]
    parts += [Text(p, style="red") for p in snap.problems]
    return Group(*parts)

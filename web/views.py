"""What the API returns: events with their state in plain words, camera tiles, the admin status."""

from __future__ import annotations

import time
from typing import Any

import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from alerts.history import StoredEvent, open_events
from alerts.outcomes import precision_by_camera, read_outcomes
from fallwatch.keys import Keys
from fallwatch.schemas import EdgeVerdict, SchemaError, decode
from fallwatch.settings import Settings
from fallwatch.status import camera_ids, camera_row, gather

DECIDERS = {
    "edge": "edge model (confident, no cloud check needed)",
    "cloud": "checked by the cloud model",
    "edge_timeout": "edge only: the cloud did not answer in time",
    "edge_cloud_failed": "edge only: the cloud check failed",
    "edge_budget": "edge only: the cloud budget was used up",
    "edge_shed": "edge only: the cloud was too busy to answer in time",
    "cloud_audit": "found by the cloud model's audit (the edge missed it)",
}
TIMEOUT_DECIDERS = ("edge_timeout", "edge_cloud_failed", "edge_shed")


def decided_words(decider: str | None) -> str:
    if decider is None:
        return "not decided by a model"
    return DECIDERS.get(decider, decider)


def state_words(e: StoredEvent) -> str:
    ev = e.event
    if ev.outcome is not None:
        return f"resolved: {ev.outcome.value.replace('_', ' ')}"
    if ev.acknowledged:
        return f"{ev.acknowledged_by} is going" if e.active else f"ended, {ev.acknowledged_by} is going"
    return "new" if e.active else "ended, nobody has taken it"


def event_view(e: StoredEvent) -> dict[str, Any]:
    ev = e.event
    return {**ev.model_dump(mode="json"), "active": e.active, "open": e.open, "state": state_words(e),
            "decided_words": decided_words(ev.decided_by.value if ev.decided_by else None)}


def cameras_view(client: redis.Redis, keys: Keys, settings: Settings) -> list[dict[str, Any]]:
    now = time.time()
    open_by_camera: dict[str, dict[str, Any]] = {}
    for e in reversed(open_events(client, keys)):  # newest last: the newest open event wins
        open_by_camera[e.event.camera_id] = {"event_id": e.event.event_id, "kind": e.event.kind.value}
    rows = []
    for cid in camera_ids(client, keys, settings):
        row = camera_row(client, keys, settings, cid, now).model_dump(mode="json")
        rows.append({**row, "open_event": open_by_camera.get(cid)})
    return rows


def queue_age_s(client: redis.Redis, name: str) -> float | None:
    """Age of the oldest job waiting in an RQ queue."""
    q = Queue(name, connection=client, serializer=JSONSerializer)
    ids = q.get_job_ids(0, 0)
    if not ids:
        return None
    job = Job.fetch(ids[0], connection=client, serializer=JSONSerializer)
    return None if job.enqueued_at is None else max(0.0, time.time() - job.enqueued_at.timestamp())


def newest_edge_verdict(client: redis.Redis, keys: Keys) -> EdgeVerdict | None:
    for _, fields in client.xrevrange(keys.verdicts_stream(), count=50):
        try:
            msg, _ = decode(fields)
        except SchemaError:
            continue
        if isinstance(msg, EdgeVerdict):
            return msg
    return None


def switcher_view(client: redis.Redis, keys: Keys, settings: Settings, drift: list[Any]) -> dict[str, Any]:
    """The switcher in use: the version published to the edge workers (else the one the newest edge
    verdict names) and the site's drift state from the audits."""
    published = client.hget(keys.switcher_current(), "version")
    verdict = newest_edge_verdict(client, keys)
    version = published.decode() if published else getattr(verdict, "switcher_version", None)
    site = next((d for d in drift if d.scope == "*"), None)
    ckpt = settings.switcher.checkpoint
    return {"checkpoint": str(ckpt) if ckpt else None, "version": version,
            "drift": None if site is None else ("drifting" if site.drifting else "ok")}


def admin_view(client: redis.Redis, keys: Keys, settings: Settings) -> dict[str, Any]:
    snap = gather(client, settings, events=1)
    by = snap.scoring.by_decider
    return {
        **snap.model_dump(mode="json"),
        "queue_age_s": queue_age_s(client, snap.queue.name),
        "timeouts": {k: by.get(k, 0) for k in TIMEOUT_DECIDERS},
        "switcher": switcher_view(client, keys, settings, snap.drift),
        "precision": precision_by_camera(read_outcomes(client, keys)),
        "metrics_links": [f"http://{w.metrics}/metrics" for w in snap.workers if w.metrics],
    }

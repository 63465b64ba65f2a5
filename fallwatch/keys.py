"""Every Redis stream, key, channel, group and queue name fallwatch uses, built in one place.

All names live under a configurable prefix, so several deployments can share a server.
``tests/test_keys.py`` pins the formats: changing one is a wire-format change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

def text(value: object) -> str:
    """A Redis reply value (a key, field or member) as str: bytes decoded (bad UTF-8 replaced), None as ""."""
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


CameraCounter = Literal["items", "frames", "gated", "dropped", "oom", "trimmed", "seq"]
"""Per-camera ingest counters: stream entries, images in them, still frames skipped, frames dropped
by a full live buffer, frames dropped because Redis refused writes (out of memory), entries trimmed
unread by MAXLEN; ``seq`` allocates frame numbers."""


@dataclass(frozen=True)
class Keys:
    prefix: str = "fallwatch"

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # --- streams -----------------------------------------------------------------------
    def frames_stream(self) -> str:
        """Frames and clips from ingest, consumed by the edge group."""
        return self._k("stream", "frames")

    def verdicts_stream(self) -> str:
        """Edge and cloud verdicts, consumed by the alerts group."""
        return self._k("stream", "verdicts")

    def final_stream(self) -> str:
        """One FinalVerdict per frame, written by the alerts service."""
        return self._k("stream", "final")

    def alerts_stream(self) -> str:
        """Durable log of every AlertEvent (start/update/end)."""
        return self._k("stream", "alerts")

    def camera_status_stream(self) -> str:
        """CameraStatus changes from ingest."""
        return self._k("stream", "camera-status")

    def dead_letter_stream(self) -> str:
        """Inputs that could not be processed, with the reason."""
        return self._k("stream", "dead-letter")

    def notify_outbox_stream(self) -> str:
        """Notifications waiting for delivery (durable outbox)."""
        return self._k("stream", "notify-outbox")

    # --- consumer groups ---------------------------------------------------------------
    def edge_group(self) -> str:
        return "edge"

    def alerts_group(self) -> str:
        return "alerts"

    def status_group(self) -> str:
        return "alerts-status"

    def notify_group(self) -> str:
        return "notify"

    # --- pub/sub -----------------------------------------------------------------------
    def alerts_channel(self) -> str:
        """Live AlertEvents for subscribers (``fallwatch alerts tail``)."""
        return self._k("channel", "alerts")

    # --- keys --------------------------------------------------------------------------
    def pixels(self, frame_id: str) -> str:
        """Encoded images of an offloaded frame, kept with a TTL until the cloud verdict."""
        return self._k("pixels", frame_id)

    def pending_verdicts(self) -> str:
        """Sorted set of frames awaiting a cloud verdict, scored by deadline."""
        return self._k("pending")

    def pending_edge(self, frame_id: str) -> str:
        """The edge verdict of a frame awaiting the cloud."""
        return self._k("pending", frame_id)

    def pending_cloud(self, frame_id: str) -> str:
        """A failed cloud verdict that arrived before its frame's edge verdict."""
        return self._k("pending-cloud", frame_id)

    def final_done(self, frame_id: str) -> str:
        """Marker that a frame has its final verdict (deduplication)."""
        return self._k("final", frame_id)

    def camera_state(self, camera_id: str) -> str:
        """Hash: the alert state machine of one camera."""
        return self._k("camera", camera_id, "state")

    def alert_cameras(self) -> str:
        """Set: cameras with an active alert event (their quiet timers are checked)."""
        return self._k("alert-cameras")

    def camera_info(self, camera_id: str) -> str:
        """Hash: last status, fps and last frame time of one camera."""
        return self._k("camera", camera_id, "info")

    def event(self, event_id: str) -> str:
        """Hash: the current state of one alert event."""
        return self._k("event", event_id)

    def delivered(self, event_id: str, channel: str) -> str:
        """Marker that a notification of an event went out on a channel (exactly once)."""
        return self._k("delivered", event_id, channel)

    def notify_cooldown(self, channel: str, camera_id: str, kind: str) -> str:
        """Marker with a TTL: a channel is quiet about one camera and event kind until it expires."""
        return self._k("notify-cooldown", channel, camera_id, kind)

    def stats(self) -> str:
        """Hash: running online-scoring counters (tp/fp/fn/tn, offloads, latency)."""
        return self._k("stats")

    def heartbeat(self, role: str, name: str) -> str:
        """Worker heartbeat with a TTL."""
        return self._k("heartbeat", role, name)

    def heartbeat_pattern(self, role: str = "*") -> str:
        return self._k("heartbeat", role, "*")

    def metrics_endpoint(self, role: str, name: str) -> str:
        """Where a worker serves Prometheus metrics ("host:port"), with a TTL like its heartbeat."""
        return self._k("metrics", role, name)

    def counter(self, name: str) -> str:
        """A plain counter (e.g. frames dropped by MAXLEN)."""
        return self._k("count", name)

    # --- MQTT bridge ---------------------------------------------------------------------
    def mqtt_group(self) -> str:
        """Consumer group of the MQTT bridge on the alerts stream."""
        return "mqtt"

    def mqtt_state(self) -> str:
        """Hash: per camera, the fall event the MQTT bridge last published as open."""
        return self._k("mqtt", "state")

    def mqtt_event(self, event_id: str) -> str:
        """The event as last published on MQTT (the next message's ``before``), with a TTL."""
        return self._k("mqtt", "event", event_id)

    def mqtt_cameras(self) -> str:
        """Set: cameras whose Home Assistant discovery configs are published."""
        return self._k("mqtt", "cameras")

    def mqtt_lease(self) -> str:
        """Lease: the one alerts process whose MQTT bridge is connected (its client id)."""
        return self._k("mqtt", "lease")

    # --- escalation ----------------------------------------------------------------------
    def escalations(self) -> str:
        """Sorted set: fall events awaiting their next escalation tier, scored by due time."""
        return self._k("escalations")

    # --- web station -----------------------------------------------------------------------
    def events_index(self) -> str:
        """Sorted set of event ids scored by start time (the history pages read it)."""
        return self._k("events")

    def outcomes_stream(self) -> str:
        """Durable log of resolved fall events (OutcomeRecord): alert ground truth."""
        return self._k("stream", "outcomes")

    def web_session(self, session_id: str) -> str:
        """Hash with a TTL: one signed-in web session (user, role, CSRF token)."""
        return self._k("web", "session", session_id)

    def web_login_failures(self, scope: str, who: str) -> str:
        """Counter with a TTL: failed logins of one user name or client address."""
        return self._k("web", "login-failures", scope, who)

    def web_secret(self) -> str:
        """Cookie-signing key shared by every web process (when web.secret_key is not set)."""
        return self._k("web", "secret")

    def web_audit_stream(self) -> str:
        """Who viewed which snapshot, and other audited web actions."""
        return self._k("stream", "web-audit")

    # --- RQ ------------------------------------------------------------------------------
    def cloud_queue(self, name: str = "cloud") -> str:
        """Name of the RQ queue served by cloud workers (RQ adds its own 'rq:queue:' prefix)."""
        return f"{self.prefix}-{name}"

    # --- live DMD --------------------------------------------------------------------------
    def audit_queue(self, base: str = "cloud") -> str:
        """RQ queue of audits: served by cloud workers only when the offload queues are empty."""
        return self.cloud_queue(f"{base}-audit")

    def edge_features(self, frame_id: str) -> str:
        """Hash with a TTL: the edge features of an offloaded or audited frame, for the DMD store."""
        return self._k("features", frame_id)

    def dmd_store(self) -> str:
        """Stream of live DMD records (features, both verdicts, route, propensity; no pixels)."""
        return self._k("stream", "dmd")

    def switcher_current(self) -> str:
        """Hash: version and origin of the switcher the edge workers must run."""
        return self._k("switcher", "current")

    def switcher_checkpoint(self, version: str) -> str:
        """Hash: one published switcher checkpoint (card JSON + safetensors weights)."""
        return self._k("switcher", "checkpoint", version)

    def switcher_history(self) -> str:
        """List: versions promoted so far, newest first (rollback pops the head)."""
        return self._k("switcher", "history")

    def drift_window(self, scope: str, version: str | None = None) -> str:
        """List: the latest audit outcomes ('1' agree, '0' disagree) of a camera or of the site ('*'),
        under one switcher version."""
        return self._k("drift", scope, version or "-", "window")

    def drift_state(self) -> str:
        """Hash: per scope, the drift figures and the id of its open switcher_drift event."""
        return self._k("drift", "state")

    def offload_rate(self, scope: str) -> str:
        """List: the latest edge routing decisions ('1' offloaded) of a camera or of the site ('*')."""
        return self._k("drift", scope, "offload")

    def audit_done(self, frame_id: str) -> str:
        """Marker that an audit verdict of a frame was applied (a redelivery changes nothing)."""
        return self._k("audit", frame_id)

    # --- cloud budget and backpressure ---------------------------------------------------
    def offload_queues(self, base: str = "cloud") -> list[str]:
        """Offload queues in priority order (cloud workers listen in this order): rank 0 = the edge says
        no fall with low agreement (a fall may be missed), rank 1 = the edge says fall with low agreement."""
        return [self.cloud_queue(base), self.cloud_queue(f"{base}-r1")]

    # --- cloud budget and backpressure ---------------------------------------------------
    def budget_bucket(self) -> str:
        """Hash: the site's hard cloud budget (token bucket: tokens, refill time), shared by edge workers."""
        return self._k("budget", "bucket")

    def cloud_service(self) -> str:
        """Hash: per cloud worker, its recent measured seconds per item and per job (JSON), for the edge."""
        return self._k("cloud", "service")

    # --- typed counters ------------------------------------------------------------------
    def camera_counter(self, camera_id: str, name: CameraCounter) -> str:
        """One camera's ingest counter (see :data:`CameraCounter`)."""
        return self.counter(f"ingest:{camera_id}:{name}")

    def frames_trimmed_unread(self) -> str:
        """Frames MAXLEN trimmed from the frames stream before the edge group read them (all cameras)."""
        return self.counter("frames_trimmed_unread")

    def frames_trimmed_pending(self) -> str:
        """Frames trimmed while delivered but unacknowledged (found by an edge worker's XAUTOCLAIM)."""
        return self.counter("frames_trimmed_pending")

    def frames_trimmed_pending_ids(self) -> str:
        """Set of the frame entries counted in :meth:`frames_trimmed_pending`, so that a slow worker that
        still delivers one of them takes it back out of the count (expires a day after the last one)."""
        return self._k("frames", "trimmed-pending")

    def replica_barrier(self) -> str:
        """Integer bumped right before a WAIT for replicas (the write the WAIT is measured from)."""
        return self._k("replica", "barrier")

    # --- parsing keys back apart ----------------------------------------------------------
    def parse(self, key: bytes | str, pattern: str) -> tuple[str, ...]:
        """What the ``*`` of ``pattern`` (a key built here with ``*`` parts) stand for in ``key``.

        Every ``*`` but the last matches one colon-free part; the last matches the rest.
        ValueError when ``key`` does not fit the pattern.
        """
        name = text(key)
        parts = [re.escape(p) for p in pattern.split("*")]
        wild = ["([^:]+)"] * (len(parts) - 2) + ["(.+)"]
        found = re.fullmatch(parts[0] + "".join(w + p for w, p in zip(wild, parts[1:])), name)
        if found is None:
            raise ValueError(f"key {name!r} does not match {pattern!r}")
        return found.groups()

    def heartbeat_of(self, key: bytes | str) -> tuple[str, str]:
        """(role, worker name) of a heartbeat key."""
        role, name = self.parse(key, self.heartbeat_pattern())
        return role, name

    def camera_of_info(self, key: bytes | str) -> str:
        """The camera id of a :meth:`camera_info` key."""
        return self.parse(key, self.camera_info("*"))[0]
    # --- notification channels -------------------------------------------------------------
    def notify_broken(self) -> str:
        """Hash channel id -> why the notifier cannot use it (written when the notifier starts)."""
        return self._k("notify", "broken")

    def camera_stats(self, camera_id: str) -> str:
        """The online-scoring hash of one camera (or replay camera id), beside the total in stats()."""
        return self._k("stats", "camera", camera_id)

"""Every Redis stream, key, channel, group and queue name fallwatch uses, built in one place.

All names live under a configurable prefix, so several deployments can share a server.
``tests/test_keys.py`` pins the formats: changing one is a wire-format change.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    # --- RQ ------------------------------------------------------------------------------
    def cloud_queue(self, name: str = "cloud") -> str:
        """Name of the RQ queue served by cloud workers (RQ adds its own 'rq:queue:' prefix)."""
        return f"{self.prefix}-{name}"

    # --- notification channels -------------------------------------------------------------
    def notify_broken(self) -> str:
        """Hash channel id -> why the notifier cannot use it (written when the notifier starts)."""
        return self._k("notify", "broken")

    def camera_stats(self, camera_id: str) -> str:
        """The online-scoring hash of one camera (or replay camera id), beside the total in stats()."""
        return self._k("stats", "camera", camera_id)

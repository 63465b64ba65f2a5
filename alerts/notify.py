"""Caregiver notifications through a durable outbox.

When an event starts, the alerts service writes one :class:`Delivery` per channel to
``keys.notify_outbox_stream()`` in the same transaction as the event. The :class:`Notifier`
consumes the outbox with the ``keys.notify_group()`` consumer group:

- a delivered (or deliberately suppressed) entry is marked ``SET keys.delivered(event, channel)
  NX``, acknowledged and deleted, so the outbox holds only what is still owed;
- a failed delivery stays pending and is retried, by any notifier, once it has been idle for
  ``min(retry_cap_s, retry_base_s * 2**(attempts-1))`` (and never sooner than ``timeout_s``, so an
  attempt still in flight elsewhere is not duplicated); XPENDING's delivery count is the
  attempt count, so retries survive restarts;
- before sending, an existing ``delivered`` marker means the work is done (redelivery after a
  crash between sending and acknowledging).

Channels are one class hierarchy (:class:`NotificationChannel`, with a per-camera cooldown);
:class:`AppriseChannel` sends to one apprise URL. The notifier keeps cooldowns in Redis
(:class:`RedisCooldowns`), so they hold across notifier restarts and between several notifiers. A channel is named by a hash of its URL, so
outbox entries, markers and logs never contain the URL, which may hold credentials.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import redis
import structlog
from pydantic import SecretStr

from fallwatch.streams import Entry, ack, dead_letter, ensure_group, read_group, read_own_pending
from fallwatch.checks import url_problem
from fallwatch.defaults import DELIVERED_TTL_S
from fallwatch.keys import Keys, text
from fallwatch.redis import wait_replica
from fallwatch.metrics import AlertsMetrics
from fallwatch.registry import SchemeRegistry
from fallwatch.role import RoleLoop
from fallwatch.logging import redact_text
from fallwatch.schemas import AlertEvent, Decider, Delivery, EventKind, EventType, SchemaError, decode
from fallwatch.settings import CloudSettings, EdgeSettings, NotificationSettings, Settings

log = structlog.get_logger(__name__)


# {edge} and {cloud}: the configured models' names (``edge.model``, ``cloud.model``).
DECIDER_TEXT = {
    Decider.EDGE: "edge model ({edge})",
    Decider.CLOUD: "cloud model ({cloud})",
    Decider.EDGE_TIMEOUT: "edge model (the cloud did not answer in time)",
    Decider.EDGE_CLOUD_FAILED: "edge model (the cloud check failed)",
    Decider.CLOUD_AUDIT: "cloud model ({cloud}), auditing a no-fall edge verdict",
    Decider.EDGE_BUDGET: "edge model (not sent to the cloud: the cloud budget was spent)",
    Decider.EDGE_SHED: "edge model (not sent to the cloud: it was too busy to answer in time)",
}


# --- channels and their names --------------------------------------------------------------


def channel_id(url: str) -> str:
    """A stable, non-secret name for the channel of an apprise URL."""
    return "apprise-" + hashlib.sha256(url.encode()).hexdigest()[:12]


def _camera_urls(settings: Settings, camera_id: str) -> list[SecretStr]:
    urls = list(settings.notifications.urls)
    for cam in settings.cameras:
        if cam.id == camera_id:
            urls += cam.notify
    return urls


def channel_ids_for(settings: Settings, camera_id: str) -> list[str]:
    """Channels notified about a camera: the global URLs plus the camera's own, without repeats."""
    ids = [channel_id(u.get_secret_value()) for u in _camera_urls(settings, camera_id)]
    return list(dict.fromkeys(ids))


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def tier_text(event: AlertEvent) -> str:
    """Which escalation tier a fall notification is, and how long the fall has been open."""
    name = f" ({event.escalation_name})" if event.escalation_name else ""
    waiting = ", not acknowledged" if event.escalation_tier > 1 else ""
    return (f" Tier {event.escalation_tier} of {max(event.escalation_tiers, event.escalation_tier)}{name}: "
            f"open for {_duration(event.at - event.started_at)}{waiting}.")


def model_names(settings: Settings | None) -> dict[str, str]:
    """Short names of the edge and cloud models (the last part of the hub id or path)."""
    edge = settings.edge.model if settings else EdgeSettings.model_fields["model"].default
    cloud = settings.cloud.model if settings else CloudSettings.model_fields["model"].default
    return {"edge": PurePath(edge).name or edge, "cloud": PurePath(cloud).name or cloud}


def notifies(event: AlertEvent) -> bool:
    """An event's start is notified, and so is a camera coming back online."""
    return event.type is EventType.START or (event.type is EventType.END and event.kind is EventKind.CAMERA_OFFLINE)


def compose(event: AlertEvent, settings: Settings | None = None) -> tuple[str, str]:
    """Title and body of the notification of an event's start or of one of its escalation tiers
    (models named as ``settings`` has them)."""
    name = event.camera_name or event.camera_id
    if event.kind is EventKind.SWITCHER_DRIFT:
        return f"Switcher drift: {name}", f"DMD switcher drift on {name} since {_when(event.started_at)}: {event.description}"
    if event.kind is EventKind.CAMERA_OFFLINE and event.type is EventType.END:
        down = f" after {max(0.0, event.at - event.started_at):.0f} s offline" if event.started_at else ""
        return f"Camera back online: {name}", f"Camera {name} is back online at {_when(event.at)}{down}."
    if event.kind is EventKind.CAMERA_OFFLINE:
        reason = f" Reason: {event.description}." if event.description else ""
        return f"Camera offline: {name}", f"Camera {name} went offline at {_when(event.started_at)}.{reason}"
    conf = f"{100 * event.confidence:.0f}%" if event.confidence is not None else "unknown"
    by = DECIDER_TEXT.get(event.decided_by, "unknown model") if event.decided_by else "unknown model"
    by = by.format(**model_names(settings))
    body = (f"Possible fall on camera {name} at {_when(event.started_at)}. "
            f"Confidence {conf}, decided by the {by}. Event {event.event_id}.")
    if event.description:
        body += f" The model saw: {event.description}"
    if event.escalation_tier:
        body += tier_text(event)
    if event.escalation_tier > 1:
        return f"Fall not acknowledged (tier {event.escalation_tier}): {name}", body
    return f"Fall detected: {name}", body


def deliveries_for(event: AlertEvent, settings: Settings) -> list[Delivery]:
    """The outbox entries owed for an event (its start; a camera back online), one per channel."""
    if not notifies(event):
        return []
    title, body = compose(event, settings)
    frame = event.frame_ids[-1] if event.frame_ids else None
    step = "start" if event.type is EventType.START else "end"
    return [Delivery(event_id=event.event_id, channel=ch, camera_id=event.camera_id, kind=event.kind,
                     title=title, body=body, frame_id=frame, step=step)
            for ch in channel_ids_for(settings, event.camera_id)]


class DeliveryStatus(StrEnum):
    DELIVERED = "delivered"
    FAILED = "failed"
    SUPPRESSED = "suppressed"  # within the channel's cooldown for this camera


class Cooldowns(ABC):
    """Where a channel remembers that it is quiet about a camera and event kind."""

    @abstractmethod
    def active(self, channel: str, note: Delivery) -> bool:
        """True while the channel is quiet about ``note``'s camera and kind."""

    @abstractmethod
    def start(self, channel: str, note: Delivery, seconds: float) -> None:
        """The channel stays quiet about ``note``'s camera and kind for ``seconds`` from now."""


class MemoryCooldowns(Cooldowns):
    """Cooldowns in this process (a channel used on its own, outside a notifier)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._until: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()

    def active(self, channel: str, note: Delivery) -> bool:
        with self._lock:
            return self.clock() < self._until.get((channel, note.camera_id, note.kind.value), float("-inf"))

    def start(self, channel: str, note: Delivery, seconds: float) -> None:
        with self._lock:
            self._until[(channel, note.camera_id, note.kind.value)] = self.clock() + seconds


class RedisCooldowns(Cooldowns):
    """Cooldowns as keys with a TTL (``keys.notify_cooldown``): they survive a notifier restart and
    are shared by every notifier of the deployment."""

    def __init__(self, client: redis.Redis, keys: Keys):
        self.client, self.keys = client, keys

    def active(self, channel: str, note: Delivery) -> bool:
        return bool(self.client.exists(self.keys.notify_cooldown(channel, note.camera_id, note.kind.value)))

    def start(self, channel: str, note: Delivery, seconds: float) -> None:
        key = self.keys.notify_cooldown(channel, note.camera_id, note.kind.value)
        try:
            self.client.set(key, note.event_id, px=max(1, int(1000 * seconds)))
        except redis.RedisError as exc:  # the notification went out; only the quiet period is lost
            log.warning("cooldown_not_stored", channel=channel, camera=note.camera_id, error=redact_text(str(exc)))


class NotificationChannel(ABC):
    """A way to reach caregivers. Subclasses implement :meth:`deliver`; :meth:`send` adds the
    per-camera cooldown (a channel stays quiet about one camera and kind for ``cooldown_s``
    after a delivery) and turns exceptions into failures, so a broken channel never raises.
    Cooldowns live in :attr:`cooldowns`: in this process until a notifier binds them to Redis."""

    def __init__(self, name: str, cooldown_s: float = 0.0, clock: Callable[[], float] = time.time):
        self.name, self.cooldown_s = name, cooldown_s
        self.cooldowns: Cooldowns = MemoryCooldowns(clock)

    @abstractmethod
    def deliver(self, note: Delivery, attachment: Path | None = None) -> bool:
        """Send the notification now; True when the service accepted it."""

    def in_cooldown(self, note: Delivery) -> bool:
        """An escalation (tier 2 and up) of a fall nobody took, and a camera back online (it follows an
        offline notice), are never held back by the cooldown."""
        return self.cooldown_s > 0 and note.tier <= 1 and note.step == "start" and self.cooldowns.active(self.name, note)

    def send(self, note: Delivery, attachment: Path | None = None) -> DeliveryStatus:
        if self.in_cooldown(note):
            return DeliveryStatus.SUPPRESSED
        try:
            ok = self.deliver(note, attachment)
        except Exception as exc:  # noqa: BLE001 - a channel must never take the notifier down
            log.warning("notification_error", channel=self.name, error=_SECRETS.scrub(f"{type(exc).__name__}: {exc}"))
            ok = False
        if not ok:
            return DeliveryStatus.FAILED
        if self.cooldown_s > 0 and note.step == "start":
            self.cooldowns.start(self.name, note, self.cooldown_s)
        return DeliveryStatus.DELIVERED


class _SecretFilter(logging.Filter):
    """Removes configured secret fragments from records of third-party loggers (apprise, urllib3)."""

    def __init__(self) -> None:
        super().__init__()
        self.fragments: set[str] = set()

    def add_url(self, url: str) -> None:
        parts = urlsplit(url)
        candidates = [url, parts.netloc, parts.password or "", parts.username or "",
                      *parts.path.split("/"), *(v for _, v in parse_qsl(parts.query))]
        self.fragments |= {c for c in candidates if len(c) >= 4}

    def scrub(self, text: str) -> str:
        for frag in sorted(self.fragments, key=len, reverse=True):
            text = text.replace(frag, "***")
        return redact_text(text)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.fragments:
            record.msg, record.args = self.scrub(record.getMessage()), ()
        return True


_SECRETS = _SecretFilter()
for _name in ("apprise", "urllib3", "urllib3.connectionpool"):
    logging.getLogger(_name).addFilter(_SECRETS)


def _with_timeouts(url: str, timeout_s: float) -> str:
    """Add apprise's connect/read timeouts (cto/rto) unless the URL sets them."""
    query = dict(parse_qsl(urlsplit(url).query))
    extra = [f"{k}={timeout_s:g}" for k in ("cto", "rto") if k not in query]
    if not extra:
        return url
    return url + ("&" if "?" in url else "?") + "&".join(extra)


IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_FIELD = "idempotency_key"
_HTTP_PLUGINS = ("apprise.plugins.custom_json", "apprise.plugins.custom_form", "apprise.plugins.custom_xml")


def stamp_idempotency_key(plugin: Any, key: str) -> None:
    """Give an HTTP webhook (apprise's json://, form://, xml://) the delivery's idempotency key: as the
    ``Idempotency-Key`` header, and as the ``idempotency_key`` field of the body. A repeat
    after a crash between sending and the delivered marker carries the same key, so a receiver can
    drop it. Other channels (e-mail, chat services) have no such field: see docs/reliability.md."""
    if type(plugin).__module__ not in _HTTP_PLUGINS:
        return
    plugin.headers[IDEMPOTENCY_HEADER] = key
    plugin.payload_extras[IDEMPOTENCY_FIELD] = key


class AppriseChannel(NotificationChannel):
    """One apprise URL (``json://``, ``mailto://``, ``ntfy://`` ...)."""

    def __init__(self, url: SecretStr, timeout_s: float = 10.0, cooldown_s: float = 0.0,
                 clock: Callable[[], float] = time.time):
        import apprise  # noqa: PLC0415 - loads ~200 plugins; only the notifier needs it

        secret = url.get_secret_value()
        super().__init__(channel_id(secret), cooldown_s, clock)
        _SECRETS.add_url(secret)
        self.timeout_s = timeout_s
        self._apprise = apprise.Apprise()
        problem = url_problem(secret)
        if problem is not None or not self._apprise.add(_with_timeouts(secret, timeout_s)):
            raise ValueError(f"notification channel {self.name}: {problem or 'apprise does not accept this URL'}")

    def deliver(self, note: Delivery, attachment: Path | None = None) -> bool:
        for plugin in self._apprise:
            stamp_idempotency_key(plugin, note.idempotency_key)
        result = self._apprise.notify(body=note.body, title=note.title,
                                      attach=str(attachment) if attachment else None, timeout=self.timeout_s)
        return bool(result)


ChannelFactory = Callable[..., NotificationChannel]  # (url: SecretStr, *, timeout_s, cooldown_s)

# URL scheme -> channel class; apprise takes every scheme no other class claims. A class takes
# (url, *, timeout_s, cooldown_s) and names itself channel_id(url) (see docs/extending.md).
CHANNELS: SchemeRegistry[ChannelFactory] = SchemeRegistry("notification channel", fallback=AppriseChannel)


def build_channels(cfg: Settings, broken: dict[str, str] | None = None) -> dict[str, NotificationChannel]:
    """Every channel named in the settings (global and per-camera URLs), by name. A URL that cannot be
    used raises ValueError, or, given ``broken``, is left out and recorded there (name -> reason)."""
    n: NotificationSettings = cfg.notifications
    urls = list(n.urls) + [u for cam in cfg.cameras for u in cam.notify] + cfg.escalation_urls() + list(cfg.dmd.drift_notify)
    channels: dict[str, NotificationChannel] = {}
    for url in urls:
        name = channel_id(url.get_secret_value())
        if name in channels or (broken is not None and name in broken):
            continue
        try:
            channels[name] = CHANNELS.lookup(url.get_secret_value())(url, timeout_s=n.timeout_s, cooldown_s=n.cooldown_s)
        except ValueError as exc:
            if broken is None:
                raise
            broken[name] = str(exc)
    return channels


# --- the outbox consumer ---------------------------------------------------------------------


@dataclass(frozen=True)
class NotifierStepReport:
    """What one :meth:`Notifier.step` did."""

    delivered: int = 0
    failed: int = 0
    suppressed: int = 0
    skipped: int = 0      # already delivered earlier
    dead_letters: int = 0
    retried: int = 0      # of the attempts, how many were retries
    owed: int = 0         # kept in the outbox: their channel cannot be used (see Notifier.broken)

    @property
    def attempts(self) -> int:
        return self.delivered + self.failed


def backoff_s(attempts: int, cfg: NotificationSettings) -> float:
    """Idle time before retry number ``attempts`` (1 = the first retry) may start."""
    exp = min(cfg.retry_cap_s, cfg.retry_base_s * 2 ** max(0, attempts - 1))
    return max(exp, cfg.timeout_s)


class Notifier(RoleLoop):
    """Delivers the outbox. Drive with :meth:`step` (tests) or :meth:`run` (a thread)."""

    def __init__(self, settings: Settings, client: redis.Redis, keys: Keys, name: str,
                 channels: dict[str, NotificationChannel] | None = None, batch: int = 50,
                 block_ms: int = 500, metrics: AlertsMetrics | None = None):
        self.settings, self.client, self.keys, self.name = settings, client, keys, name
        self.metrics = metrics or AlertsMetrics.create()
        self.cfg = settings.notifications
        self.broken: dict[str, str] = {}  # channel -> why it cannot be used; its deliveries stay owed
        self.channels = channels if channels is not None else build_channels(settings, self.broken)
        cooldowns = RedisCooldowns(client, keys)
        for channel in self.channels.values():
            channel.cooldowns = cooldowns
        self.batch, self.block_ms = batch, block_ms
        self.stream, self.group = keys.notify_outbox_stream(), keys.notify_group()
        self._started = False

    def setup(self) -> None:
        ensure_group(self.client, self.stream, self.group)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.notify_broken())
            if self.broken:
                pipe.hset(self.keys.notify_broken(), mapping=self.broken)
            pipe.execute()
        for channel, reason in self.broken.items():
            log.error("notification_channel_unusable", channel=channel, reason=reason)

    def step(self, block_ms: int | None = None) -> NotifierStepReport:
        if not self._started:
            self.setup()
        tally: dict[str, int] = {}
        if not self._started:  # entries this consumer name left pending in an earlier run
            for entry in read_own_pending(self.client, self.group, self.name, self.stream, self.batch):
                self._handle(entry, tally)
            self._started = True
        for entry in self._due_retries():
            tally["retried"] = tally.get("retried", 0) + 1
            self._handle(entry, tally)
        for entry in read_group(self.client, self.group, self.name, [self.stream], self.batch, block_ms):
            self._handle(entry, tally)
        return NotifierStepReport(**tally)

    # --- the role loop (fallwatch.role.RoleLoop.run) ----------------------------------------
    def started_fields(self) -> dict[str, Any]:
        return {"channels": len(self.channels)}

    def run_once(self) -> NotifierStepReport:
        return self.step(self.block_ms)

    def on_outage(self, exc: BaseException) -> None:
        self._started = False  # set the group up again after a server restart

    def outbox_size(self) -> int:
        """Notifications still owed (delivered entries are deleted)."""
        return int(self.client.xlen(self.stream))

    # --- retries -------------------------------------------------------------------------------
    def _due_retries(self) -> Iterable[Entry]:
        """Pending entries (of any consumer) whose backoff has passed, claimed for this one."""
        min_idle = int(1000 * backoff_s(1, self.cfg))
        pending = self.client.xpending_range(self.stream, self.group, "-", "+", 1000, idle=min_idle)
        for p in pending:
            wait_ms = int(1000 * backoff_s(int(p["times_delivered"]), self.cfg))
            if int(p["time_since_delivered"]) < wait_ms:
                continue
            claimed = self.client.xclaim(self.stream, self.group, self.name, wait_ms, [p["message_id"]])
            for entry_id, fields in claimed:
                yield Entry(self.stream, text(entry_id), fields or None)

    # --- one entry -----------------------------------------------------------------------------
    def _handle(self, entry: Entry, tally: dict[str, int]) -> None:
        outcome = self._process(entry)
        tally[outcome] = tally.get(outcome, 0) + 1

    def _process(self, entry: Entry) -> str:
        if entry.fields is None:
            ack(self.client, self.group, entry)
            return "skipped"
        try:
            note, _ = decode(entry.fields, expect=Delivery)
        except SchemaError as exc:
            return self._dead(entry, "schema_error", str(exc))
        channel = self.channels.get(note.channel)
        if note.channel in self.broken:  # owed until the channel is fixed; retried with backoff
            self.metrics.notification(note.channel, False)
            return "owed"
        if channel is None:
            return self._dead(entry, "unknown_channel", f"channel {note.channel} is not configured any more")
        marker = self.keys.delivered(note.marker_id, note.channel)
        if self.client.exists(marker):
            self._finish(entry)
            return "skipped"
        status = self._send(channel, note)
        if status is not DeliveryStatus.SUPPRESSED:
            self.metrics.notification(note.channel, status is DeliveryStatus.DELIVERED)
        if status is DeliveryStatus.FAILED:
            attempts = self._attempts(entry)
            log.warning("notification_failed", channel=note.channel, event_id=note.event_id, attempt=attempts,
                        retry_in_s=round(backoff_s(attempts, self.cfg), 2))
            return "failed"
        self.client.set(marker, status.value, nx=True, ex=DELIVERED_TTL_S)
        wait_replica(self.client, self.keys.replica_barrier())  # a lost marker would mean a repeat
        self._finish(entry)
        log.info("notification_sent" if status is DeliveryStatus.DELIVERED else "notification_suppressed",
                 channel=note.channel, event_id=note.event_id, camera=note.camera_id)
        return status.value

    def _send(self, channel: NotificationChannel, note: Delivery) -> DeliveryStatus:
        if not (self.cfg.snapshot and note.frame_id):
            return channel.send(note)
        with tempfile.TemporaryDirectory(prefix="fw-snap-") as tmp:
            path = self._snapshot(note.frame_id, Path(tmp))
            return channel.send(note, path)

    def _snapshot(self, frame_id: str, folder: Path) -> Path | None:
        """The frame's middle image, if its pixels are still kept (offloaded frames, for a while)."""
        images = self.client.hgetall(self.keys.pixels(frame_id))
        if not images:
            log.info("snapshot_unavailable", frame=frame_id)
            return None
        names = sorted(images, key=lambda k: int(k[1:]) if k[1:].isdigit() else 0)
        path = folder / "snapshot.jpg"
        path.write_bytes(images[names[len(names) // 2]])
        return path

    def _attempts(self, entry: Entry) -> int:
        info = self.client.xpending_range(self.stream, self.group, entry.id, entry.id, 1)
        return int(info[0]["times_delivered"]) if info else 1

    def _finish(self, entry: Entry) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, entry.id)
            pipe.xdel(self.stream, entry.id)
            pipe.execute()

    def _dead(self, entry: Entry, reason: str, error: str) -> str:
        dead_letter(self.client, self.keys.dead_letter_stream(), entry, reason, error, self.name)
        self._finish(entry)
        return "dead_letters"

"""The MQTT bridge: fallwatch's events and states on an MQTT broker, for Home Assistant and others.

Published (prefix ``mqtt.topic_prefix``, see :class:`alerts.mqtt_topics.Topics`):

- ``<p>/available``: ``online`` once the initial states are out, ``offline`` on a clean stop and
  as the last will (the broker publishes it when the alerts process dies), retained;
- ``<p>/<camera>/fall``: ``ON`` from a fall event's start to its end, whatever ends it, retained;
- ``<p>/<camera>/online``: the camera's connectivity, retained;
- ``<p>/events``: one JSON per event change, ``{"type": "new"|"update"|"end", "before", "after"}``;
- ``<p>/stats``: cameras, offload rate, cloud queue depth, every ``mqtt.stats_period_s``;
- Home Assistant discovery configs (:mod:`alerts.ha_discovery`).

Received: ``<p>/<camera>/ack/set`` and ``<p>/events/<id>/ack/set`` acknowledge through
:func:`alerts.store.acknowledge` with source ``mqtt``.

One bridge per deployment is connected: every alerts process runs one, and the one holding a
lease in Redis (:class:`fallwatch.lease.Lease`) connects; another takes over when it dies.

Delivery: the bridge reads the alerts stream with its own consumer group, so the stream is its
outbox. An entry is handed to the MQTT client once (QoS 1) and acknowledged in Redis when the
broker has acknowledged every message made from it; meanwhile the client keeps it across
reconnects. While the broker is away nothing new is read, so events of an outage go out after
it, in stream order, once each; entries left pending by a process that died are published by
the next one. After every (re)connection the retained states are published again.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from alerts.ha_discovery import Entity, camera_entities, config_topic, site_entities
from alerts.mqtt_topics import Topics
from alerts.stats import read_stats
from alerts.store import EVENT_TTL_S, EventNotFound, acknowledge
from fallwatch.streams import Entry, ack, ensure_group, read_group, read_own_pending
from fallwatch.keys import Keys
from fallwatch.lease import Lease
from fallwatch.logging import redact_text
from fallwatch.schemas import AlertEvent, EventKind, EventType, SchemaError, decode
from fallwatch.settings import MqttSettings, Settings
from fallwatch.status import camera_row

log = structlog.get_logger(__name__)

EVENT_TYPES = {EventType.START: "new", EventType.UPDATE: "update", EventType.END: "end"}
MAX_COMMAND_BYTES = 1024
ACK_WORDS = {"", "PRESS", "ACK", "ON"}
CONSUMER = "bridge"
LEASE_POLL_S = 1.0
LAST_KEPT = 1000


# --- payloads ------------------------------------------------------------------------------


def event_state(ev: AlertEvent, before: dict[str, Any] | None) -> dict[str, Any]:
    """The event as ``before`` / ``after`` show it: every AlertEvent field plus Frigate-style times."""
    body = ev.model_dump(mode="json", exclude={"v", "type", "event_id", "camera_id", "started_at", "at", "frame_ids"})
    end = ev.at if ev.type is EventType.END else (before or {}).get("end_time")
    return {"id": ev.event_id, "camera": ev.camera_id, **body, "start_time": ev.started_at, "end_time": end,
            "active": end is None, "updated_at": ev.at, "frame_id": ev.frame_ids[-1] if ev.frame_ids else None,
            "frames": len(ev.frame_ids)}


def event_message(ev: AlertEvent, before: dict[str, Any] | None) -> dict[str, Any]:
    """The ``<p>/events`` payload; a new event's ``before`` is its ``after``."""
    after = event_state(ev, before)
    return {"type": EVENT_TYPES[ev.type], "before": before or after, "after": after}


def ack_payload_by(payload: bytes) -> str | None:
    """Who acknowledges, from a command payload (``PRESS``, ``ACK``, empty, or ``{"by": NAME}``);
    None for anything else."""
    if len(payload) > MAX_COMMAND_BYTES:
        return None
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if text.upper() in ACK_WORDS:
        return "mqtt"
    try:
        data = json.loads(text)
    except ValueError:
        return None
    by = data.get("by") if isinstance(data, dict) and set(data) == {"by"} else None
    return by if isinstance(by, str) and 0 < len(by.strip()) <= 200 else None


# --- the MQTT connection -------------------------------------------------------------------


class Link:
    """A paho-mqtt client with its network thread: connects (and reconnects) in the background,
    sets the will, subscribes the command topics, queues received commands and records which
    published messages the broker has acknowledged."""

    def __init__(self, cfg: MqttSettings, topics: Topics, client_id: str):
        import paho.mqtt.client as mqtt  # noqa: PLC0415 - only the alerts process with MQTT needs it
        from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

        self.cfg, self.topics = cfg, topics
        self.v5 = cfg.protocol == "5"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
                                  clean_session=None if self.v5 else True)
        if cfg.username:
            self.client.username_pw_set(cfg.username, cfg.password.get_secret_value() if cfg.password else None)
        if cfg.tls or cfg.ca_certs:
            self.client.tls_set(ca_certs=_path(cfg.ca_certs), certfile=_path(cfg.certfile), keyfile=_path(cfg.keyfile))
        self.client.will_set(topics.available(), "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)
        self.client.on_connect, self.client.on_disconnect = self._on_connect, self._on_disconnect
        self.client.on_message, self.client.on_publish = self._on_message, self._on_publish
        self.connected = threading.Event()
        self.generation = 0  # one more at every successful connection
        self.commands: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=1000)
        self._cond = threading.Condition()
        self._acked: set[int] = set()
        self._forgotten: set[int] = set()
        self._stopping = False

    def start(self) -> None:
        self._stopping = False
        kw: dict[str, Any] = {"clean_start": True} if self.v5 else {}
        self.client.connect_async(self.cfg.host or "", self.cfg.port, self.cfg.keepalive_s, **kw)
        self.client.loop_start()

    def stop(self, timeout_s: float = 2.0, announce: bool = True) -> None:
        """Publish ``offline`` (a clean stop; not when another process takes over), disconnect and
        end the network thread."""
        if announce and self.connected.is_set():
            self.wait({self.publish(self.topics.available(), "offline", retain=True)}, timeout_s)
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: str | bytes, retain: bool = False) -> int:
        """Hand one QoS 1 message to the client (kept across reconnects); its message id."""
        return int(self.client.publish(topic, payload, qos=1, retain=retain).mid)

    def wait(self, mids: set[int], timeout_s: float) -> bool:
        """True once the broker acknowledged every message in ``mids``; False on timeout or disconnect."""
        with self._cond:
            self._cond.wait_for(lambda: mids <= self._acked or not self.connected.is_set(), timeout_s)
            return mids <= self._acked

    def forget(self, mids: Iterable[int]) -> None:
        """Stop tracking these messages (acknowledged already, or whenever they will be)."""
        with self._cond:
            for mid in mids:
                if mid in self._acked:
                    self._acked.discard(mid)
                else:
                    self._forgotten.add(mid)

    # --- callbacks (the client's network thread) ---------------------------------------------
    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.warning("mqtt_connect_refused", broker=self._broker(), reason=str(reason))
            return
        client.subscribe([(t, 1) for t in self.topics.subscriptions()])
        self.generation += 1
        self.connected.set()
        log.info("mqtt_connected", broker=self._broker(), protocol=self.cfg.protocol)

    def _on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        with self._cond:
            self._cond.notify_all()
        if was:
            (log.info if self._stopping else log.warning)("mqtt_disconnected", broker=self._broker(), reason=str(reason))

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        try:
            self.commands.put_nowait((message.topic, bytes(message.payload)))
        except queue.Full:
            log.warning("mqtt_command_dropped", topic=message.topic, reason="queue full")

    def _on_publish(self, _client: Any, _userdata: Any, mid: int, _reason: Any, _props: Any) -> None:
        with self._cond:
            if mid in self._forgotten:
                self._forgotten.discard(mid)
            else:
                self._acked.add(mid)
            self._cond.notify_all()

    def _broker(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"


def _path(p: Any) -> str | None:
    return str(p) if p is not None else None


# --- the bridge ----------------------------------------------------------------------------


@dataclass
class Handed:
    """An alerts-stream entry whose messages are with the MQTT client, and what to store once the
    broker has them all."""

    entry_id: str
    mids: set[int]
    event_id: str | None = None
    after: str | None = None
    fall: tuple[str, str | None] | None = None  # (camera, open fall event id or None)


class MqttBridge:
    """Runs in the alerts process. Drive with :meth:`run` (a thread) or :meth:`step`."""

    def __init__(self, settings: Settings, client: redis.Redis, keys: Keys, link: Link | None = None,
                 batch: int = 50, block_ms: int = 200):
        self.settings, self.client, self.keys = settings, client, keys
        self.cfg = settings.mqtt
        self.topics = Topics(self.cfg.topic_prefix)
        client_id = self.cfg.client_id or f"{self.cfg.topic_prefix}-{socket.gethostname()}-{os.getpid()}"
        self.link = link or Link(self.cfg, self.topics, client_id)
        self.batch, self.block_ms = batch, block_ms
        self.stream, self.group = keys.alerts_stream(), keys.mqtt_group()
        self.falls: dict[str, str] = {}     # camera -> open fall event, as handed to the broker
        self.online: dict[str, bool] = {}   # camera -> connectivity, as published
        self.last: OrderedDict[str, dict[str, Any]] = OrderedDict()  # event -> its latest "after"
        self.handed: list[Handed] = []
        self._synced = 0
        self._next_stats = 0.0
        self._leading = False
        ttl = max(10.0, 4 * self.cfg.publish_timeout_s)  # longer than the longest step
        self.lease = Lease(client, keys.mqtt_lease(), f"{socket.gethostname()}-{os.getpid()}-{id(self):x}", ttl)

    @property
    def synced(self) -> bool:
        """Connected, and the retained states are out since the latest connection."""
        return self.link.connected.is_set() and self._synced == self.link.generation

    # --- set-up and loop ---------------------------------------------------------------------
    def setup(self) -> None:
        ensure_group(self.client, self.stream, self.group, start_id="$")  # a new bridge skips history

    def run(self, stop: threading.Event) -> None:
        """Bridge while this process holds the lease (one bridge per deployment), until ``stop``."""
        log.info("mqtt_bridge_started", broker=f"{self.cfg.host}:{self.cfg.port}", prefix=self.cfg.topic_prefix)
        delay, ready = 0.1, False
        while not stop.is_set():
            try:
                if not ready:
                    self.setup()
                    ready = True
                if self.lead():
                    self.step()
                else:
                    stop.wait(LEASE_POLL_S)
                delay = 0.1
            except redis.RedisError as exc:
                log.warning("mqtt_bridge_redis_error", error=redact_text(str(exc)), retry_in_s=delay)
                stop.wait(delay)
                delay, ready = min(delay * 2, 5.0), False
        self.close()

    def lead(self) -> bool:
        """Take or renew the lease; connect on taking it, disconnect (without ``offline``) on losing it."""
        held = self.lease.hold()
        if held and not self._leading:
            self.falls = {k.decode(): v.decode() for k, v in self.client.hgetall(self.keys.mqtt_state()).items()}
            self.last.clear()
            self.link.start()
            log.info("mqtt_lease_taken", holder=self.lease.holder)
        elif not held and self._leading:
            self.handed.clear()  # the new holder publishes what is still unacknowledged
            self.link.stop(announce=False)
            log.warning("mqtt_lease_lost", holder=self.lease.owner())
        self._leading = held
        return held

    def close(self) -> None:
        if self._leading:
            try:
                self._settle(min(2.0, self.cfg.publish_timeout_s))
                self.lease.release()
            except redis.RedisError:
                pass  # unacknowledged entries are published by the next holder
            self.link.stop()
            self._leading = False
        log.info("mqtt_bridge_stopped")

    def step(self) -> None:
        """Wait for the broker, finish in-flight entries, republish states after a reconnection,
        run received commands, publish new entries, and the stats when due."""
        if not self.link.connected.wait(self.block_ms / 1000):
            return
        if not self._settle(self.cfg.publish_timeout_s):
            return
        if self._synced != self.link.generation:
            self.sync()
        self._commands()
        for entry in self._next_entries():
            self._hand(entry)
        self._settle(self.cfg.publish_timeout_s)
        if time.monotonic() >= self._next_stats:
            self.publish_stats()

    # --- entries -----------------------------------------------------------------------------
    def _next_entries(self) -> list[Entry]:
        """Entries left pending (an earlier run died before the broker acknowledged them) first."""
        pending = read_own_pending(self.client, self.group, CONSUMER, self.stream, self.batch)
        return pending or read_group(self.client, self.group, CONSUMER, [self.stream], self.batch, self.block_ms)

    def _hand(self, entry: Entry) -> None:
        try:
            if entry.fields is None:
                raise SchemaError("entry deleted before it was published")
            ev = decode(entry.fields, expect=AlertEvent)[0]
        except SchemaError as exc:
            log.warning("mqtt_entry_skipped", entry_id=entry.id, error=str(exc))
            ack(self.client, self.group, entry)
            return
        assert isinstance(ev, AlertEvent)
        message = event_message(ev, self._before(ev.event_id))
        item = Handed(entry.id, {self.link.publish(self.topics.events(), json.dumps(message))},
                      ev.event_id, json.dumps(message["after"]))
        self._apply_state(ev, item)
        self._remember(ev.event_id, message["after"])
        self.handed.append(item)

    def _apply_state(self, ev: AlertEvent, item: Handed) -> None:
        cam = ev.camera_id
        if ev.kind is EventKind.FALL and ev.type is EventType.START:
            self.falls[cam] = ev.event_id
            item.fall = (cam, ev.event_id)
            item.mids.add(self.link.publish(self.topics.fall(cam), "ON", retain=True))
        elif ev.kind is EventKind.FALL and ev.type is EventType.END and self.falls.get(cam) in (None, ev.event_id):
            self.falls.pop(cam, None)
            item.fall = (cam, None)
            item.mids.add(self.link.publish(self.topics.fall(cam), "OFF", retain=True))
        elif ev.kind is EventKind.CAMERA_OFFLINE and ev.type is not EventType.UPDATE:
            self.online[cam] = ev.type is EventType.END
            item.mids.add(self.link.publish(self.topics.online(cam), _on_off(self.online[cam]), retain=True))

    def _before(self, event_id: str) -> dict[str, Any] | None:
        if event_id in self.last:
            return self.last[event_id]
        raw = self.client.get(self.keys.mqtt_event(event_id))
        return json.loads(raw) if raw is not None else None

    def _remember(self, event_id: str, after: dict[str, Any]) -> None:
        self.last[event_id] = after
        self.last.move_to_end(event_id)
        while len(self.last) > LAST_KEPT:
            self.last.popitem(last=False)

    def _settle(self, timeout_s: float) -> bool:
        """Acknowledge, in order, the entries the broker has; True when none is left in flight."""
        done: list[Handed] = []
        while self.handed and self.link.wait(self.handed[0].mids, timeout_s):
            done.append(self.handed.pop(0))
        if done:
            self._commit(done)
        return not self.handed

    def _commit(self, done: list[Handed]) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            for item in done:
                pipe.xack(self.stream, self.group, item.entry_id)
                if item.event_id and item.after:
                    pipe.set(self.keys.mqtt_event(item.event_id), item.after, ex=EVENT_TTL_S)
                if item.fall is not None and item.fall[1] is None:
                    pipe.hdel(self.keys.mqtt_state(), item.fall[0])
                elif item.fall is not None:
                    pipe.hset(self.keys.mqtt_state(), item.fall[0], item.fall[1])
            pipe.execute()
        self.link.forget(mid for item in done for mid in item.mids)

    # --- retained states ---------------------------------------------------------------------
    def sync(self) -> None:
        """Everything retained, again (after every connection): discovery, states, stats, and
        ``online`` last, once the rest is out."""
        generation = self.link.generation
        mids = self._discovery() + self._remove_cameras()
        for cam in self._camera_ids():
            mids.append(self.link.publish(self.topics.fall(cam), _on_off(cam in self.falls), retain=True))
        mids += self._refresh_online(force=True)
        self.publish_stats()
        mids.append(self.link.publish(self.topics.available(), "online", retain=True))
        if self.link.wait(set(mids), self.cfg.publish_timeout_s):
            self._synced = generation
            log.info("mqtt_states_published", cameras=len(self.settings.cameras), generation=generation)
        self.link.forget(mids)

    def _camera_ids(self) -> list[str]:
        ids = [c.id for c in self.settings.cameras]
        return ids + [cam for cam in self.falls if cam not in ids]

    def _publish_entities(self, entities: list[Entity], empty: bool = False) -> list[int]:
        return [self.link.publish(config_topic(self.cfg, e.component, e.object_id),
                                  "" if empty else json.dumps(e.config), retain=True) for e in entities]

    def _discovery(self) -> list[int]:
        if not self.cfg.discovery:
            return []
        entities = site_entities(self.cfg)
        for cam in self.settings.cameras:
            entities += camera_entities(self.cfg, cam.id, cam.display_name)
        if self.settings.cameras:
            self.client.sadd(self.keys.mqtt_cameras(), *(c.id for c in self.settings.cameras))
        return self._publish_entities(entities)

    def _remove_cameras(self) -> list[int]:
        """Empty retained configs (and states) for cameras published earlier and no longer configured."""
        current = {c.id for c in self.settings.cameras} if self.cfg.discovery else set()
        gone = sorted({m.decode() for m in self.client.smembers(self.keys.mqtt_cameras())} - current)
        mids: list[int] = []
        for cam in gone:
            mids += self._publish_entities(camera_entities(self.cfg, cam, cam), empty=True)
            mids += [self.link.publish(t, "", retain=True) for t in (self.topics.fall(cam), self.topics.online(cam))]
            log.info("mqtt_camera_removed", camera=cam)
        if gone:
            self.client.srem(self.keys.mqtt_cameras(), *gone)
        return mids

    def _refresh_online(self, force: bool = False) -> list[int]:
        """Publish the connectivity of cameras ingest has reported on, when it changed."""
        mids, now = [], time.time()
        for cam in self.settings.cameras:
            row = camera_row(self.client, self.keys, self.settings, cam.id, now)
            value = row.online if row.state != "unknown" else self.online.get(cam.id)
            if value is not None and (force or self.online.get(cam.id) != value):
                self.online[cam.id] = value
                mids.append(self.link.publish(self.topics.online(cam.id), _on_off(value), retain=True))
        return mids

    def stats(self) -> dict[str, Any]:
        from rq import Queue  # noqa: PLC0415

        rep = read_stats(self.client, self.keys)
        depth = Queue(self.keys.cloud_queue(self.settings.cloud.queue), connection=self.client).count
        cams = {c.id: {"name": c.display_name, "online": self.online.get(c.id), "fall": c.id in self.falls,
                       "event_id": self.falls.get(c.id)} for c in self.settings.cameras}
        pct = round(100 * rep.offload_rate, 2) if rep.offload_rate is not None else None
        return {"at": time.time(), "cameras": cams, "finals": rep.finals, "offloaded": rep.offloaded,
                "offload_rate": rep.offload_rate, "offload_percent": pct, "cloud_queue_depth": depth}

    def publish_stats(self) -> None:
        mids = self._refresh_online()
        mids.append(self.link.publish(self.topics.stats(), json.dumps(self.stats()), retain=True))
        self.link.forget(mids)
        self._next_stats = time.monotonic() + self.cfg.stats_period_s

    # --- commands ----------------------------------------------------------------------------
    def _commands(self) -> None:
        while True:
            try:
                topic, payload = self.link.commands.get_nowait()
            except queue.Empty:
                return
            self.command(topic, payload)

    def command(self, topic: str, payload: bytes) -> AlertEvent | None:
        """Acknowledge what a command asks for; anything wrong is logged and ignored."""
        cmd, by = self.topics.parse_command(topic), ack_payload_by(payload)
        if cmd is None or by is None:
            return _ignored(topic, "not a command topic" if cmd is None else "bad payload")
        event_id = cmd.id if cmd.target == "event" else self.falls.get(cmd.id)
        if event_id is None:
            return _ignored(topic, "no open fall event on this camera")
        try:
            return acknowledge(self.client, self.keys, event_id, by, self.settings.alerts.stream_maxlen, source="mqtt")
        except EventNotFound:
            return _ignored(topic, "no such event")


def _ignored(topic: str, reason: str) -> None:
    log.warning("mqtt_command_ignored", topic=topic[:300], reason=reason)


def _on_off(value: bool) -> str:
    return "ON" if value else "OFF"

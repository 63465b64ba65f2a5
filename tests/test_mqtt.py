"""The MQTT bridge against a real Mosquitto (plain, and with a password file and TLS): states,
events, Home Assistant discovery, the last will, a broker outage, and acknowledgements."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from alerts.mqtt import MqttBridge
from alerts.store import EventStore, load_event, resolve
from fallwatch.schemas import AlertEvent, CameraState, CameraStatus, Decider, EventOutcome, EventType, FinalVerdict
from fallwatch.settings import ConfigError, Settings, read_yaml
from tests.helpers import FakeClock, wait_for
from tests.mosquitto import Mosquitto, Observer, ensure_installed, retained

pytestmark = pytest.mark.mqtt

USER, PASSWORD = "fallwatch", "pw-Zq81-secret"
ROOM = {"id": "cam1", "name": "Room 12", "url": "file:///dev/null"}
HALL = {"id": "cam2", "name": "Hall", "url": "file:///dev/null"}
REQUIRED = {"binary_sensor": {"state_topic"}, "button": {"command_topic"}, "sensor": {"state_topic"}}
COMMON = {"name", "unique_id", "device", "availability_topic", "payload_available", "payload_not_available"}


@pytest.fixture(scope="module", autouse=True)
def mosquitto_installed() -> None:
    if ensure_installed() is None:
        pytest.skip("mosquitto is not installed and could not be (run scripts/install-mosquitto.sh)")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    (tmp_path / "plain").mkdir()
    b = Mosquitto(tmp_path / "plain").start()
    yield b
    b.stop()


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[Mosquitto]:
    (tmp_path / "secure").mkdir()
    b = Mosquitto(tmp_path / "secure", users={USER: PASSWORD}, tls=True).start()
    yield b
    b.stop()


def mqtt_settings(b: Mosquitto, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"host": "127.0.0.1", "port": b.port, "stats_period_s": 0.5, "reconnect_min_s": 0.2,
                           "reconnect_max_s": 0.5, "keepalive_s": 5, **extra}
    if b.certs:
        cfg.update(username=USER, password=PASSWORD, ca_certs=str(b.certs / "ca.crt"))
    return cfg


def make_settings(redis_url: str, b: Mosquitto, cameras: list[dict[str, str]] | None = None, **mqtt: Any) -> Settings:
    return Settings(redis={"url": redis_url}, cameras=cameras if cameras is not None else [ROOM, HALL],
                    mqtt=mqtt_settings(b, **mqtt), alerts={"offline_grace_s": 0})  # offline events at once


class Running:
    """A bridge in a thread, as the alerts process runs it."""

    def __init__(self, settings: Settings, r: Any, keys: Any):
        self.bridge, self.stop_event = MqttBridge(settings, r, keys, block_ms=50), threading.Event()
        self.thread = threading.Thread(target=self.bridge.run, args=(self.stop_event,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(15)
        assert not self.thread.is_alive()


@contextmanager
def bridge_running(settings: Settings, r: Any, keys: Any) -> Iterator[MqttBridge]:
    running = Running(settings, r, keys)
    try:
        yield running.bridge
    finally:
        running.stop()


@contextmanager
def observing(b: Mosquitto, topics: list[str] | None = None, **kw: Any) -> Iterator[Observer]:
    obs = Observer(b, topics or ["fallwatch/#"], **kw).start()
    try:
        yield obs
    finally:
        obs.stop()


def final(frame_id: str, at: float, fall: bool = True, p: float = 0.9) -> FinalVerdict:
    return FinalVerdict(frame_id=frame_id, camera_id=frame_id.split(":")[0], captured_at=at, is_fall=fall,
                        p_fall=p, decided_by=Decider.EDGE, latency_ms=50.0)


def start_fall(store: EventStore, camera: str, at: float) -> AlertEvent:
    store.apply_final(final(f"{camera}:0", at, p=0.8))
    (ev,) = store.apply_final(final(f"{camera}:1", at + 0.5, p=0.93))
    assert ev.type is EventType.START
    return ev


def ready(obs: Observer) -> bool:
    return obs.last("fallwatch/available") == b"online"


def test_fall_event_sets_state_and_publishes_new_and_end_field_by_field(redis_url, r, keys, broker) -> None:
    settings = make_settings(redis_url, broker)
    clock = FakeClock()
    store = EventStore(r, keys, settings, clock)
    with observing(broker) as obs, bridge_running(settings, r, keys):
        assert wait_for(lambda: ready(obs) and obs.last("fallwatch/cam1/fall") == b"OFF", 20)
        start = start_fall(store, "cam1", clock.t)
        assert wait_for(lambda: obs.last("fallwatch/cam1/fall") == b"ON" and obs.json_on("fallwatch/events"), 20)
        (new,) = obs.json_on("fallwatch/events")
        assert new["type"] == "new" and new["before"] == new["after"]
        after = new["after"]
        assert {k: after[k] for k in ("id", "camera", "camera_name", "kind", "start_time", "end_time", "active",
                                      "confidence", "decided_by", "acknowledged", "acknowledged_by", "ack_source",
                                      "frame_id", "frames")} == {
            "id": start.event_id, "camera": "cam1", "camera_name": "Room 12", "kind": "fall",
            "start_time": start.started_at, "end_time": None, "active": True, "confidence": 0.93,
            "decided_by": "edge", "acknowledged": False, "acknowledged_by": None, "ack_source": None,
            "frame_id": "cam1:1", "frames": 2}
        assert obs.last("fallwatch/cam2/fall") == b"OFF"

        clock.advance(settings.alerts.quiet_s + 1)
        (unseen,) = store.tick()  # no longer seen: the alarm latches, the state stays ON
        assert wait_for(lambda: len(obs.json_on("fallwatch/events")) == 2)
        update = obs.json_on("fallwatch/events")[1]
        assert update["type"] == "update" and update["before"] == after and update["after"]["active"] is True
        assert obs.last("fallwatch/cam1/fall") == b"ON"
        end = resolve(r, keys, start.event_id, "nurse", EventOutcome.FALSE_ALARM, settings.alerts.stream_maxlen,
                      clock=clock)
        assert wait_for(lambda: obs.last("fallwatch/cam1/fall") == b"OFF" and len(obs.json_on("fallwatch/events")) == 3)
        msg = obs.json_on("fallwatch/events")[2]
        assert msg["type"] == "end" and msg["before"] == update["after"]
        assert msg["after"]["id"] == start.event_id and msg["after"]["end_time"] == end.at
        assert msg["after"]["active"] is False and msg["after"]["start_time"] == start.started_at
        assert msg["after"]["updated_at"] == end.at
    states = retained(broker, ["fallwatch/+/fall", "fallwatch/available"], 3)
    assert states == {"fallwatch/cam1/fall": b"OFF", "fallwatch/cam2/fall": b"OFF", "fallwatch/available": b"offline"}


def test_discovery_has_every_required_key_and_stable_ids_and_a_removed_camera_goes(redis_url, r, keys,
                                                                                    broker) -> None:
    r.hset(keys.stats(), mapping={"finals": 8, "offloaded": 2})
    r.rpush("rq:queue:" + keys.cloud_queue(), "job-a", "job-b", "job-c")
    with observing(broker) as obs, bridge_running(make_settings(redis_url, broker), r, keys):
        assert wait_for(lambda: ready(obs) and obs.json_on("fallwatch/stats"), 20)
        stats = obs.json_on("fallwatch/stats")[-1]
    first = {t: json.loads(p) for t, p in retained(broker, ["homeassistant/#"], 7).items()}
    assert len(first) == 7, sorted(first)
    for topic, cfg in first.items():
        component = topic.split("/")[1]
        assert REQUIRED[component] | COMMON <= set(cfg), topic
        assert cfg["availability_topic"] == "fallwatch/available"
        assert cfg["device"]["identifiers"] == ["fallwatch_fallwatch"]
    by_uid = {cfg["unique_id"]: cfg for cfg in first.values()}
    assert len(by_uid) == 7
    fall, online, button = (by_uid[f"fallwatch_fallwatch_cam1_{s}"] for s in ("fall", "online", "ack"))
    assert (fall["state_topic"], fall["device_class"]) == ("fallwatch/cam1/fall", "safety")
    assert (online["state_topic"], online["device_class"]) == ("fallwatch/cam1/online", "connectivity")
    assert button["command_topic"] == "fallwatch/cam1/ack/set" and fall["name"] == "Room 12 fall"
    assert by_uid["fallwatch_fallwatch_offload_rate"]["state_topic"] == "fallwatch/stats"
    assert (stats["offload_rate"], stats["offload_percent"], stats["cloud_queue_depth"]) == (0.25, 25.0, 3)
    assert stats["cameras"]["cam1"] == {"name": "Room 12", "online": None, "fall": False, "event_id": None}

    # restart without cam2: cam1's entities are the same, cam2's configs are emptied
    with observing(broker, ["homeassistant/#", "fallwatch/cam2/#"]) as obs, \
            bridge_running(make_settings(redis_url, broker, [ROOM]), r, keys):
        assert wait_for(lambda: obs.on("homeassistant/binary_sensor/fallwatch/cam2_fall/config")[-1:] == [b""], 20)
        assert wait_for(lambda: obs.on("homeassistant/button/fallwatch/cam2_ack/config")[-1:] == [b""], 20)
        assert obs.on("fallwatch/cam2/fall")[-1] == b""
    second = {t: json.loads(p) for t, p in retained(broker, ["homeassistant/#"], 4).items()}
    assert second == {t: c for t, c in first.items() if "/cam2_" not in t}
    assert r.smembers(keys.mqtt_cameras()) == {b"cam1"}


def test_sigkill_of_the_alerts_process_leaves_the_will_offline_over_tls(redis_url, r, keys, secure) -> None:
    env = {**os.environ, "FALLWATCH_REDIS__URL": redis_url, "FALLWATCH_CAMERAS": json.dumps([ROOM]),
           "FALLWATCH_METRICS__ENABLED": "false",
           **{f"FALLWATCH_MQTT__{k.upper()}": str(v) for k, v in mqtt_settings(secure, protocol="5").items()}}
    proc = subprocess.Popen([sys.executable, "-m", "fallwatch", "--log-format", "json", "alerts", "--no-notify"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with observing(secure, ["fallwatch/available"]) as obs:
            assert wait_for(lambda: ready(obs), 30), secure.log()[-3000:]
            proc.send_signal(signal.SIGKILL)
            assert wait_for(lambda: obs.last("fallwatch/available") == b"offline", 20)
    finally:
        proc.kill()
        out, err = proc.communicate(timeout=10)
    assert "mqtt_connected" in err and PASSWORD not in out + err
    assert retained(secure, ["fallwatch/available"], 1) == {"fallwatch/available": b"offline"}


@pytest.mark.fault
def test_events_of_a_broker_outage_arrive_once_in_order_after_it(redis_url, r, keys, tmp_path) -> None:
    (tmp_path / "p").mkdir()
    b = Mosquitto(tmp_path / "p", persistence=True).start()
    settings = make_settings(redis_url, b)
    store = EventStore(r, keys, settings, FakeClock())
    try:
        with observing(b, client_id="watcher", persistent=True) as obs, bridge_running(settings, r, keys) as bridge:
            assert wait_for(lambda: ready(obs), 20)
            subscribed = time.time()
            assert wait_for(lambda: b.db.exists() and b.db.stat().st_mtime > subscribed + 0.1, 20)  # session saved
            b.stop(signal.SIGKILL)
            assert wait_for(lambda: not bridge.link.connected.is_set(), 20)
            first, second = start_fall(store, "cam1", 1_700_000_000.0), start_fall(store, "cam2", 1_700_000_001.0)
            time.sleep(5)  # the outage itself
            assert not _all_published(r, keys)  # nothing acknowledged while it lasts
            b.start()
            assert wait_for(lambda: len(obs.json_on("fallwatch/events")) >= 2, 30), b.log()[-3000:]
            assert wait_for(lambda: _all_published(r, keys), 20)
            assert wait_for(lambda: obs.last("fallwatch/available") == b"online", 20)
            events = obs.json_on("fallwatch/events")
    finally:
        b.stop()
    assert [(e["type"], e["after"]["id"]) for e in events] == [("new", first.event_id), ("new", second.event_id)]
    b.start()
    try:
        states = retained(b, ["fallwatch/+/fall", "fallwatch/available"], 3)
    finally:
        b.stop()
    assert states == {"fallwatch/cam1/fall": b"ON", "fallwatch/cam2/fall": b"ON", "fallwatch/available": b"offline"}


def _all_published(r: Any, keys: Any) -> bool:
    (group,) = r.xinfo_groups(keys.alerts_stream())
    last = r.xrevrange(keys.alerts_stream(), count=1)[0][0]
    return int(group["pending"]) == 0 and group["last-delivered-id"] == last


def test_button_and_event_command_acknowledge_over_tls_and_mqtt5(redis_url, r, keys, secure) -> None:
    settings = make_settings(redis_url, secure, protocol="5")
    store = EventStore(r, keys, settings, FakeClock())
    with observing(secure) as obs, bridge_running(settings, r, keys):
        assert wait_for(lambda: ready(obs), 20)
        room, hall = start_fall(store, "cam1", 1_700_000_000.0), start_fall(store, "cam2", 1_700_000_000.0)
        assert wait_for(lambda: obs.last("fallwatch/cam1/fall") == b"ON" and obs.last("fallwatch/cam2/fall") == b"ON")
        obs.client.publish("fallwatch/cam1/ack/set", "PRESS", qos=1)
        assert wait_for(lambda: load_event(r, keys, room.event_id).acknowledged, 20)
        obs.client.publish(f"fallwatch/events/{hall.event_id}/ack/set", json.dumps({"by": "nurse Ann"}), qos=1)
        assert wait_for(lambda: load_event(r, keys, hall.event_id).acknowledged, 20)
        assert wait_for(lambda: len(obs.json_on("fallwatch/events")) == 4)
        updates = [m for m in obs.json_on("fallwatch/events") if m["type"] == "update"]
    acked = {e: load_event(r, keys, e) for e in (room.event_id, hall.event_id)}
    assert [(a.acknowledged_by, a.ack_source) for a in acked.values()] == [("mqtt", "mqtt"), ("nurse Ann", "mqtt")]
    assert [(u["after"]["id"], u["before"]["acknowledged"], u["after"]["acknowledged"], u["after"]["ack_source"])
            for u in updates] == [(room.event_id, False, True, "mqtt"), (hall.event_id, False, True, "mqtt")]
    assert updates[0]["after"]["acknowledged_at"] == acked[room.event_id].acknowledged_at


def test_garbage_on_command_topics_changes_nothing_and_the_bridge_goes_on(redis_url, r, keys, broker) -> None:
    settings = make_settings(redis_url, broker)
    store = EventStore(r, keys, settings, FakeClock())
    with observing(broker) as obs, bridge_running(settings, r, keys) as bridge:
        assert wait_for(lambda: ready(obs), 20)
        ev = start_fall(store, "cam1", 1_700_000_000.0)
        assert wait_for(lambda: obs.last("fallwatch/cam1/fall") == b"ON")
        entries = r.xlen(keys.alerts_stream())
        garbage = [("fallwatch/cam1/ack/set", p) for p in
                   (b"\xff\xfe\x00", b"{not json", b'{"by": 5}', b'{"by": "x", "extra": 1}', b'["PRESS"]',
                    b"PRESS" * 300, b"delete everything")]
        garbage += [("fallwatch/cam2/ack/set", b"PRESS"), ("fallwatch/events/no-such-event/ack/set", b"PRESS"),
                    ("fallwatch/events/a.b/ack/set", b"PRESS"), (f"fallwatch/events/{ev.event_id}/ack/set", b"\x00"),
                    ("fallwatch/cam1/fall/ack/set", b"PRESS")]
        for topic, payload in garbage:
            obs.client.publish(topic, payload, qos=1)
        obs.client.publish(f"fallwatch/events/{ev.event_id}/ack/set", b'{"by": "after the garbage"}', qos=1)
        assert wait_for(lambda: load_event(r, keys, ev.event_id).acknowledged, 20)
        assert bridge.link.connected.is_set()
        plant_status = CameraStatus(camera_id="cam2", state=CameraState.OFFLINE, reason="unplugged")
        store.apply_status(plant_status)
        assert wait_for(lambda: obs.last("fallwatch/cam2/online") == b"OFF")
    assert load_event(r, keys, ev.event_id).acknowledged_by == "after the garbage"
    assert r.xlen(keys.alerts_stream()) == entries + 2  # the one acknowledgement and the camera going offline


def test_events_written_while_no_bridge_runs_are_published_by_the_next_one(redis_url, r, keys, broker) -> None:
    settings = make_settings(redis_url, broker)
    store = EventStore(r, keys, settings, FakeClock())
    with observing(broker) as obs:
        with bridge_running(settings, r, keys):
            assert wait_for(lambda: ready(obs), 20)
        assert wait_for(lambda: obs.last("fallwatch/available") == b"offline")  # a clean stop says so
        ev = start_fall(store, "cam2", 1_700_000_000.0)
        with bridge_running(settings, r, keys):
            assert wait_for(lambda: obs.json_on("fallwatch/events") and obs.last("fallwatch/cam2/fall") == b"ON", 20)
            assert wait_for(lambda: _all_published(r, keys), 20)
        assert [(m["type"], m["after"]["id"]) for m in obs.json_on("fallwatch/events")] == [("new", ev.event_id)]
    assert r.hgetall(keys.mqtt_state()) == {b"cam2": ev.event_id.encode()}


def test_mqtt_settings_are_checked_and_the_password_never_shown(tmp_path, redis_url) -> None:
    with pytest.raises(ValueError, match="protocol"):
        Settings(mqtt={"host": "broker", "protocol": "4"})
    cfg = Settings(mqtt={"host": "broker", "username": "u", "password": PASSWORD})
    assert PASSWORD not in json.dumps(cfg.redacted()) and cfg.mqtt.enabled and not Settings().mqtt.enabled
    literal = tmp_path / "c.yaml"
    literal.write_text(f"mqtt:\n  host: broker\n  password: {PASSWORD}\n")
    with pytest.raises(ConfigError, match="mqtt.password"):
        read_yaml(literal, {})
    missing_ca = {**os.environ, "FALLWATCH_REDIS__URL": redis_url, "FALLWATCH_MQTT__HOST": "127.0.0.1",
                  "FALLWATCH_MQTT__CA_CERTS": str(tmp_path / "nope.crt"), "FALLWATCH_METRICS__ENABLED": "false"}
    done = subprocess.run([sys.executable, "-m", "fallwatch", "alerts", "--no-notify"], env=missing_ca,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "mqtt:" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_of_two_alerts_processes_one_bridge_is_connected_and_the_other_takes_over(redis_url, r, keys,
                                                                                  broker) -> None:
    settings = make_settings(redis_url, broker)
    store = EventStore(r, keys, settings, FakeClock())
    with observing(broker) as obs:
        first = Running(settings, r, keys)
        try:
            assert wait_for(lambda: ready(obs), 20)
            with bridge_running(settings, r, keys) as second:
                assert wait_for(lambda: r.pttl(keys.mqtt_lease()) > 0)
                assert second.lease.owner() == first.bridge.lease.holder
                one = start_fall(store, "cam1", 1_700_000_000.0)
                assert wait_for(lambda: _all_published(r, keys) and obs.json_on("fallwatch/events"), 20)
                assert first.bridge.link.connected.is_set() and not second.link.connected.is_set()
                first.stop()  # a clean stop gives the lease up
                assert wait_for(lambda: second.link.connected.is_set() and ready(obs), 20)
                two = start_fall(store, "cam2", 1_700_000_001.0)
                assert wait_for(lambda: len(obs.json_on("fallwatch/events")) >= 2 and _all_published(r, keys), 20)
                assert wait_for(lambda: obs.last("fallwatch/cam2/fall") == b"ON")
        finally:
            first.stop()
        ids = [m["after"]["id"] for m in obs.json_on("fallwatch/events")]
    assert ids == [one.event_id, two.event_id]
    assert retained(broker, ["fallwatch/+/fall"], 2) == {"fallwatch/cam1/fall": b"ON", "fallwatch/cam2/fall": b"ON"}


def test_retained_states_are_published_again_after_a_broker_lost_them(redis_url, r, keys, broker) -> None:
    settings = make_settings(redis_url, broker)
    store = EventStore(r, keys, settings, FakeClock())
    with bridge_running(settings, r, keys) as bridge:
        assert wait_for(lambda: bridge.link.connected.is_set(), 20)
        ev = start_fall(store, "cam1", 1_700_000_000.0)
        assert wait_for(lambda: _all_published(r, keys) and r.hget(keys.mqtt_state(), "cam1") == ev.event_id.encode())
        broker.stop(signal.SIGKILL)  # no persistence: every retained message is gone
        assert wait_for(lambda: not bridge.link.connected.is_set(), 20)
        broker.start()
        assert wait_for(lambda: bridge.link.generation == 2 and bridge.synced, 20)
        states = retained(broker, ["fallwatch/+/fall", "fallwatch/available", "homeassistant/#"], 10)
    assert {t: states[t] for t in ("fallwatch/cam1/fall", "fallwatch/cam2/fall", "fallwatch/available")} == {
        "fallwatch/cam1/fall": b"ON", "fallwatch/cam2/fall": b"OFF", "fallwatch/available": b"online"}
    assert len([t for t in states if t.startswith("homeassistant/")]) == 7

"""Home Assistant MQTT discovery: the config payloads of fallwatch's entities.

One device per site (``mqtt.site_id``) holds every entity; per camera a fall binary sensor
(device class ``safety``: Home Assistant shows ON as "Unsafe"), a connectivity binary sensor and
a button that acknowledges the camera's open fall event; for the site a sensor with the offload
rate. Every entity's availability is ``<prefix>/available``. Unique ids are built from the site
and camera ids only, so they are the same after every restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alerts.mqtt_topics import Topics
from fallwatch import __version__
from fallwatch.settings import MqttSettings

ORIGIN = {"name": "fallwatch", "sw_version": __version__}


@dataclass(frozen=True)
class Entity:
    """One discovery config: where it is published and what it says."""

    component: str  # binary_sensor, button, sensor
    object_id: str
    config: dict[str, Any]


def config_topic(cfg: MqttSettings, component: str, object_id: str) -> str:
    return f"{cfg.discovery_prefix}/{component}/{cfg.site_id}/{object_id}/config"


def unique_id(cfg: MqttSettings, *parts: str) -> str:
    return "_".join(("fallwatch", cfg.site_id, *parts))


def device(cfg: MqttSettings) -> dict[str, Any]:
    return {"identifiers": [unique_id(cfg)], "name": cfg.site_name, "manufacturer": "fallwatch",
            "model": "fall detection", "sw_version": __version__}


def _common(cfg: MqttSettings, uid: str, name: str) -> dict[str, Any]:
    topics = Topics(cfg.topic_prefix)
    return {"name": name, "unique_id": uid, "availability_topic": topics.available(),
            "payload_available": "online", "payload_not_available": "offline",
            "device": device(cfg), "origin": ORIGIN}


def camera_entities(cfg: MqttSettings, camera_id: str, camera_name: str) -> list[Entity]:
    """The fall sensor, connectivity sensor and acknowledge button of one camera."""
    t = Topics(cfg.topic_prefix)
    fall = {**_common(cfg, unique_id(cfg, camera_id, "fall"), f"{camera_name} fall"),
            "state_topic": t.fall(camera_id), "payload_on": "ON", "payload_off": "OFF", "device_class": "safety"}
    online = {**_common(cfg, unique_id(cfg, camera_id, "online"), f"{camera_name} camera"),
              "state_topic": t.online(camera_id), "payload_on": "ON", "payload_off": "OFF",
              "device_class": "connectivity", "entity_category": "diagnostic"}
    ack = {**_common(cfg, unique_id(cfg, camera_id, "ack"), f"{camera_name} acknowledge fall"),
           "command_topic": t.camera_ack(camera_id), "payload_press": "PRESS", "qos": 1, "icon": "mdi:check-circle"}
    return [Entity("binary_sensor", f"{camera_id}_fall", fall), Entity("binary_sensor", f"{camera_id}_online", online),
            Entity("button", f"{camera_id}_ack", ack)]


def site_entities(cfg: MqttSettings) -> list[Entity]:
    """Entities of the whole site: the offload rate (from ``<prefix>/stats``)."""
    t = Topics(cfg.topic_prefix)
    rate = {**_common(cfg, unique_id(cfg, "offload_rate"), "offload rate"), "state_topic": t.stats(),
            "value_template": "{{ value_json.offload_percent }}", "unit_of_measurement": "%",
            "state_class": "measurement", "entity_category": "diagnostic", "icon": "mdi:cloud-upload"}
    return [Entity("sensor", "offload_rate", rate)]

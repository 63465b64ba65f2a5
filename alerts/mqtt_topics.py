"""The MQTT topics of fallwatch, under one prefix (``mqtt.topic_prefix``, default ``fallwatch``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Command:
    """An acknowledgement asked for on a command topic: of a camera's open fall event, or of one event."""

    target: str  # "camera" or "event"
    id: str


@dataclass(frozen=True)
class Topics:
    prefix: str = "fallwatch"

    def _t(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    def available(self) -> str:
        """``online`` / ``offline``, retained; ``offline`` is also the last will."""
        return self._t("available")

    def events(self) -> str:
        """One JSON per event change (new / update / end with before and after), QoS 1."""
        return self._t("events")

    def stats(self) -> str:
        return self._t("stats")

    def fall(self, camera_id: str) -> str:
        """``ON`` while a fall event is open on the camera, ``OFF`` otherwise, retained."""
        return self._t(camera_id, "fall")

    def online(self, camera_id: str) -> str:
        """The camera's connectivity, ``ON`` / ``OFF``, retained."""
        return self._t(camera_id, "online")

    def camera_ack(self, camera_id: str) -> str:
        return self._t(camera_id, "ack", "set")

    def event_ack(self, event_id: str) -> str:
        return self._t("events", event_id, "ack", "set")

    def subscriptions(self) -> list[str]:
        return [self._t("+", "ack", "set"), self._t("events", "+", "ack", "set")]

    def parse_command(self, topic: str) -> Command | None:
        """The command a topic names, or None for a topic that is not one of ours."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        if len(parts) == 3 and parts[1:] == ["ack", "set"] and _ID.match(parts[0]):
            return Command("camera", parts[0])
        if len(parts) == 4 and parts[0] == "events" and parts[2:] == ["ack", "set"] and _ID.match(parts[1]):
            return Command("event", parts[1])
        return None

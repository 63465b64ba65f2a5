"""Shared by the web tests: users with real argon2 hashes, real fall events, signing in."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis

from alerts.store import EventStore
from fallwatch.keys import Keys
from fallwatch.schemas import AlertEvent, CameraStatus, CameraState, Decider, FinalVerdict
from fallwatch.settings import Settings
from web.users import add_user

PASSWORD = "correct horse battery"
USERS = {"carol": "caregiver", "cara": "caregiver", "adam": "admin"}


def write_users(path: Path) -> Path:
    for name, role in USERS.items():
        add_user(path, name, role, PASSWORD)
    return path


def fall_event(r: redis.Redis, keys: Keys, settings: Settings, camera: str = "room-12",
               decided_by: Decider = Decider.CLOUD, at: float | None = None, p: float = 0.93) -> AlertEvent:
    """A real fall event: two fall verdicts through the alerts state machine (debounce 2 of 3)."""
    at = time.time() if at is None else at
    store = EventStore(r, keys, settings, clock=lambda: at + 1)
    events: list[AlertEvent] = []
    for i in range(2):
        seq = int(at * 1000) + i
        events += store.apply_final(FinalVerdict(
            frame_id=f"{camera}:{seq}", camera_id=camera, captured_at=at + 0.5 * i, is_fall=True, p_fall=p,
            decided_by=decided_by, latency_ms=120.0))
    (start,) = [e for e in events if e.type.value == "start"]
    return start


def offline_event(r: redis.Redis, keys: Keys, settings: Settings, camera: str = "hall") -> AlertEvent:
    at_once = settings.model_copy(update={"alerts": settings.alerts.model_copy(update={"offline_grace_s": 0})})
    (ev,) = EventStore(r, keys, at_once).apply_status(
        CameraStatus(camera_id=camera, state=CameraState.OFFLINE, reason="no frames for 5 s"))
    return ev


def login(client: Any, name: str, password: str = PASSWORD) -> Any:
    token = client.get("/api/login-token").json()["csrf"]
    return client.post("/api/login", json={"name": name, "password": password}, headers={"X-CSRF-Token": token})


def csrf(client: Any) -> dict[str, str]:
    return {"X-CSRF-Token": client.get("/api/me").json()["csrf"]}

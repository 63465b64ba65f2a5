"""A private Mosquitto broker for tests (Debian's ``mosquitto`` binary, installed by
scripts/install-test-deps.sh) and an MQTT observer that records what it receives."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "scripts/install-mosquitto.sh"


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.access(p, os.X_OK)), None)


def ensure_installed() -> str | None:
    """The broker binary, installed with scripts/install-mosquitto.sh (apt) when it is missing."""
    found = mosquitto_binary()
    if found is None and shutil.which("apt-get"):
        subprocess.run(["bash", str(INSTALL)], capture_output=True, timeout=600, check=False)
        found = mosquitto_binary()
    return found


def make_certs(folder: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1 (compose/tls/make-certs.sh); returns the folder."""
    subprocess.run(["bash", str(ROOT / "compose/tls/make-certs.sh"), str(folder), "127.0.0.1", "127.0.0.1"],
                   check=True, capture_output=True)
    return folder


class Mosquitto:
    """``mosquitto -c FILE`` on a free port; optional password file, TLS and persistence."""

    def __init__(self, folder: Path, users: dict[str, str] | None = None, tls: bool = False,
                 persistence: bool = False):
        self.folder, self.users, self.tls, self.persistence = folder, users or {}, tls, persistence
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.certs = make_certs(folder / "certs") if tls else None
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(self._config())

    def _config(self) -> str:
        lines = [f"listener {self.port} 127.0.0.1", f"allow_anonymous {'false' if self.users else 'true'}",
                 f"persistence {'true' if self.persistence else 'false'}", f"log_dest file {self.folder}/broker.log",
                 "log_type all"]
        if self.persistence:
            lines += [f"persistence_location {self.folder}/", "autosave_interval 1"]
        if os.geteuid() == 0:
            lines.append("user root")
        if self.users:
            pw = self.folder / "passwd"
            pw.write_text("")
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True, capture_output=True)
            lines.append(f"password_file {pw}")
        if self.certs:
            c = self.certs
            lines += [f"cafile {c}/ca.crt", f"certfile {c}/redis.crt", f"keyfile {c}/redis.key"]
        return "\n".join(lines) + "\n"

    @property
    def db(self) -> Path:
        return self.folder / "mosquitto.db"

    def start(self) -> Mosquitto:
        binary = mosquitto_binary()
        assert binary is not None, "mosquitto is not installed (scripts/install-mosquitto.sh)"
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        if not wait_for(self._listening, 20):
            raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log()[-2000:]}")
        return self

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        p = self.folder / "broker.log"
        return p.read_text(errors="replace") if p.exists() else ""


@dataclass
class Observer:
    """A paho client subscribed to ``topics`` that records (topic, payload, retained) in order
    (it logs in as the broker's first user, if it has users)."""

    broker: Mosquitto
    topics: list[str]
    username: str | None = None
    password: str | None = None
    client_id: str = ""
    persistent: bool = False
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  clean_session=not self.persistent)
        if self.username is None and self.broker.users:
            self.username, self.password = next(iter(self.broker.users.items()))
        if self.username:
            self.client.username_pw_set(self.username, self.password)
        if self.broker.certs:
            self.client.tls_set(ca_certs=str(self.broker.certs / "ca.crt"))
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in self.topics])
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def start(self) -> Observer:
        self.client.connect_async("127.0.0.1", self.broker.port, 5)
        self.client.loop_start()
        assert self.subscribed.wait(20), "observer did not subscribe"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def on(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p, _ in self.messages if t == topic]

    def last(self, topic: str) -> bytes | None:
        got = self.on(topic)
        return got[-1] if got else None

    def json_on(self, topic: str) -> list[Any]:
        return [json.loads(p) for p in self.on(topic) if p]


def retained(broker: Mosquitto, topics: list[str], expect: int) -> dict[str, bytes]:
    """The retained messages a fresh subscriber gets for ``topics`` (waits for ``expect`` of them)."""
    obs = Observer(broker, topics).start()
    try:
        wait_for(lambda: len({t for t, _, r in obs.messages if r}) >= expect, 20)
        with obs._lock:
            return {t: p for t, p, r in obs.messages if r}
    finally:
        obs.stop()

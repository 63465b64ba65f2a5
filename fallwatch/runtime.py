"""Process helpers shared by the long-running roles: a stop event wired to SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, NoReturn

from fallwatch.keys import Keys
from fallwatch.metrics import advertise, served_port
from fallwatch.settings import MetricsSettings


def stop_on_signals(stop: threading.Event | None = None) -> threading.Event:
    """An event set by SIGINT or SIGTERM (a second Ctrl-C restores the default and interrupts)."""
    stop = stop or threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
    return stop


def exit_stopped(code: int = 0) -> NoReturn:
    """End a role process that has stopped cleanly, its output flushed, without the interpreter's
    teardown of torch and transformers (about 0.9 s here): everything the role read is acknowledged
    or left pending for another worker by then, so skipping it loses nothing and a restart (or the
    next deploy) comes sooner."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it), for a server started next."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def worker_name(role: str) -> str:
    """A worker's default name: role-host-pid (unique per process)."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


class Heartbeat:
    """A worker's liveness key (TTL: three periods) and its metrics endpoint, refreshed at most
    once a period. ``fallwatch health ROLE`` and ``fallwatch status`` read them."""

    def __init__(self, client: Any, keys: Keys, role: str, name: str, cfg: MetricsSettings):
        self.client, self.keys, self.role, self.name, self.cfg = client, keys, role, name, cfg
        self._last = float("-inf")

    def beat(self, force: bool = False) -> bool:
        """Refresh when a period has passed (or ``force``); True when it wrote."""
        now = time.monotonic()
        if not force and now - self._last < self.cfg.heartbeat_s:
            return False
        self._last = now
        ttl = max(1, int(self.cfg.heartbeat_s * 3))
        self.client.set(self.keys.heartbeat(self.role, self.name), repr(time.time()), ex=ttl)
        advertise(self.client, self.keys, self.role, self.name, self.cfg, served_port())
        return True

    def clear(self) -> None:
        self.client.delete(self.keys.heartbeat(self.role, self.name))

    def run(self, stop: threading.Event) -> None:
        """Beat every period until ``stop`` (for roles without a single loop of their own)."""
        import redis  # noqa: PLC0415

        while not stop.is_set():
            try:
                self.beat(force=True)
            except redis.RedisError:
                pass  # the role's own loops report the outage; keep beating once Redis is back
            stop.wait(self.cfg.heartbeat_s)

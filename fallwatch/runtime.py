"""Process helpers shared by the long-running roles: a stop event wired to SIGINT/SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import threading


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


def worker_name(role: str) -> str:
    """A worker's default name: role-host-pid (unique per process)."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}"

"""fallwatch.role.RoleLoop: hooks in order, heartbeat, Redis outages retried with capped backoff."""

from __future__ import annotations

import threading

import pytest
import redis
from structlog.testing import capture_logs

from fallwatch.keys import Keys
from fallwatch.role import RoleLoop
from fallwatch.runtime import Heartbeat
from fallwatch.settings import Settings


class Flaky(RoleLoop):
    log_name = "flaky"

    def __init__(self, settings: Settings, client: redis.Redis, keys: Keys, fail: int, stop: threading.Event):
        self.settings, self.name, self.stop = settings, "flaky-1", stop
        self.beat = Heartbeat(client, keys, "flaky", self.name, settings.metrics)
        self.calls: list[str] = []
        self.fail = fail

    def on_start(self) -> None:
        self.calls.append("start")

    def run_once(self) -> None:
        if self.fail:
            self.fail -= 1
            raise redis.ConnectionError("server gone")
        self.calls.append("step")
        self.stop.set()

    def on_outage(self, exc: BaseException) -> None:
        self.calls.append(f"outage:{exc}")

    def on_stop(self) -> None:
        self.calls.append("stop")


def test_the_loop_retries_outages_then_steps_and_beats(settings, r, keys) -> None:
    cfg = settings.model_copy(update={"redis": settings.redis.model_copy(update={"retry_base_s": 0.01,
                                                                                  "retry_cap_s": 0.02})})
    stop = threading.Event()
    role = Flaky(cfg, r, keys, fail=3, stop=stop)
    with capture_logs() as logs:
        role.run(stop)
    assert role.calls == ["start", *["outage:server gone"] * 3, "step", "stop"]
    assert r.exists(keys.heartbeat("flaky", "flaky-1"))
    events = [e["event"] for e in logs]
    assert events[0] == "flaky_started" and events[-1] == "flaky_stopped"
    waits = [e["retry_in_s"] for e in logs if e["event"] == "redis_unavailable"]
    assert waits == [0.01, 0.02, 0.02]  # doubling, capped at redis.retry_cap_s


def test_errors_that_are_not_outages_end_the_loop(settings, r, keys) -> None:
    class Broken(Flaky):
        def run_once(self) -> None:
            raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        Broken(settings, r, keys, fail=0, stop=threading.Event()).run(threading.Event())


def test_exit_stopped_flushes_output_and_keeps_the_exit_code() -> None:
    """A stopped role leaves without the interpreter's teardown; what it printed and logged is out."""
    import subprocess
    import sys

    code = ("import logging, sys\n"
            "from fallwatch.runtime import exit_stopped\n"
            "logging.basicConfig(stream=sys.stderr)\n"
            "print('verdicts acknowledged', end='')\n"  # block-buffered on a pipe: lost without a flush
            "logging.getLogger('x').warning('worker_stopped')\n"
            "exit_stopped(3)\n"
            "print('unreachable')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "verdicts acknowledged"
    assert "worker_stopped" in done.stderr

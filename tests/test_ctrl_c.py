"""Ctrl-C in a terminal signals the whole foreground process group: the embedded Redis is not in it,
so the roles stop cleanly against a live server, which is stopped last."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import redis

from fallwatch.keys import Keys
from fallwatch.redis import EmbeddedRedis
from tests.helpers import wait_for

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def test_ctrl_c_on_up_stops_the_roles_then_the_embedded_redis(tmp_path) -> None:
    data = Path(tempfile.mkdtemp(prefix="fw-cc-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALLWATCH_")}
    env.update(FALLWATCH_REDIS__DATA_DIR=str(data), FALLWATCH_METRICS__ENABLED="false",
               FALLWATCH_METRICS__HEARTBEAT_S="0.5", PYTHONUNBUFFERED="1")
    log = tmp_path / "up.log"
    with log.open("w") as out:  # its own group, as a terminal's foreground job
        proc = subprocess.Popen([sys.executable, "-m", "fallwatch", "--log-format", "json", "up", "--edge-workers",
                                 "0", "--no-cloud", "--no-ingest"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=tmp_path)
    server = EmbeddedRedis(data)
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        assert wait_for(lambda: server.answers() and client.keys(Keys().heartbeat_pattern("alerts")), 90), \
            log.read_text()
        redis_pid = int(client.info("server")["process_id"])
        client.close()
        assert os.getpgid(redis_pid) != os.getpgid(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)                       # what Ctrl-C does
        assert proc.wait(60) == 0, log.read_text()
        assert not alive(redis_pid)                                # stopped, last
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "role_killed" not in text and "redis_unavailable" not in text and "Traceback" not in text, text
    assert '"event": "roles_stopped"' in text


def test_the_embedded_redis_dies_with_a_killed_parent(tmp_path) -> None:
    data = Path(tempfile.mkdtemp(prefix="fw-cc-"))
    code = f"from fallwatch.redis import EmbeddedRedis; s = EmbeddedRedis({str(data)!r}).start(); print('PID', s.proc.pid, flush=True)"
    proc = subprocess.Popen([sys.executable, "-c", code + "; import time; time.sleep(600)"], stdout=subprocess.PIPE,
                            text=True)
    line = ""
    while not line.startswith("PID"):
        line = proc.stdout.readline()
    redis_pid = int(line.split()[1])
    proc.kill()
    proc.wait(10)
    assert wait_for(lambda: not alive(redis_pid), 20)

"""The service loop: a thread with a stop event, and the `fallwatch alerts` commands as processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from alerts.notify import Notifier
from alerts.service import AlertsService
from tests.helpers import edge_verdict, plant, read_all, wait_for
from fallwatch.keys import Keys
from fallwatch.redis import EmbeddedRedis, connect
from fallwatch.schemas import AlertEvent, CameraState, CameraStatus, FinalVerdict
from fallwatch.settings import Settings
from fallwatch.webhook import WebhookReceiver


def test_service_and_notifier_threads_run_until_stopped(redis_url, r, keys) -> None:
    hook = WebhookReceiver().start()
    settings = Settings(redis={"url": redis_url}, notifications={"urls": [f"json://127.0.0.1:{hook.port}/x"]})
    stop = threading.Event()
    svc = AlertsService(settings, r, keys, name="t1", block_ms=100)
    notifier = Notifier(settings, r, keys, "t1-notify", block_ms=100)
    threads = [threading.Thread(target=svc.run, args=(stop,)), threading.Thread(target=notifier.run, args=(stop,))]
    try:
        for t in threads:
            t.start()
        now = time.time()
        plant(r, keys.verdicts_stream(), edge_verdict("cam9:0", now, 0.9), edge_verdict("cam9:1", now + 0.1, 0.9))
        assert wait_for(lambda: len(hook.received) == 1)
        assert len(read_all(r, keys.final_stream())) == 2
        assert r.exists(keys.heartbeat("alerts", "t1"))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
        hook.stop()
    assert not any(t.is_alive() for t in threads)


def fallwatch(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fallwatch", "--log-format", "json", *args],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_alerts_command_serves_and_stops_cleanly_on_sigterm(redis_url, r, keys) -> None:
    env = {"FALLWATCH_REDIS__URL": redis_url, "FALLWATCH_ALERTS__OFFLINE_GRACE_S": "0"}
    procs = {"tail": fallwatch("alerts", "tail", "--json", env=env),
             "alerts": fallwatch("alerts", "--name", "cli-1", "--no-notify", env=env)}
    try:
        assert wait_for(lambda: r.exists(keys.heartbeat("alerts", "cli-1")), 15)
        assert wait_for(lambda: r.pubsub_numsub(keys.alerts_channel())[0][1] == 1, 15)
        plant(r, keys.camera_status_stream(), CameraStatus(camera_id="cam7", state=CameraState.OFFLINE))
        assert wait_for(lambda: r.xlen(keys.alerts_stream()) == 1)
        plant(r, keys.verdicts_stream(), edge_verdict("cam7:0", time.time(), 0.2))
        assert wait_for(lambda: any(isinstance(m, FinalVerdict) for m in read_all(r, keys.final_stream())))
        event = AlertEvent.model_validate(json.loads(procs["tail"].stdout.readline()))
        assert event.camera_id == "cam7" and event.kind.value == "camera_offline"
        procs["history"] = fallwatch("alerts", "tail", "--history", "5", env=env)
        line = procs["history"].stdout.readline()
        assert "camera_offline" in line and event.event_id in line
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        outs = {name: p.communicate(timeout=10) for name, p in procs.items()}
    assert {name: p.returncode for name, p in procs.items()} == {name: 0 for name in procs}, outs
    assert "alerts_stopped" in outs["alerts"][1]


@pytest.mark.fault
def test_service_carries_on_after_a_redis_restart() -> None:
    server = EmbeddedRedis(tempfile.mkdtemp(prefix="fw-alerts-"), appendonly=False).start()
    settings = Settings(redis={"url": server.url, "retry_attempts": 2, "retry_base_s": 0.01, "retry_cap_s": 0.05,
                               "socket_timeout_s": 2})
    client, keys, stop = connect(settings.redis), Keys(), threading.Event()
    thread = threading.Thread(target=AlertsService(settings, client, keys, name="f", block_ms=100).run, args=(stop,))
    thread.start()
    try:
        plant(client, keys.verdicts_stream(), edge_verdict("cam8:0", time.time(), 0.9))
        assert wait_for(lambda: client.exists(keys.final_done("cam8:0")))
        server.stop()
        time.sleep(0.3)
        server.start()  # empty: the groups are gone too
        plant(client, keys.verdicts_stream(), edge_verdict("cam8:1", time.time(), 0.9))
        assert wait_for(lambda: client.exists(keys.final_done("cam8:1")))
    finally:
        stop.set()
        thread.join(timeout=10)
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)
    assert not thread.is_alive()

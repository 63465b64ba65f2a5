"""`fallwatch up` as a user runs it: every role as a process on an embedded Redis, a file camera,
tiny models. Each role's Prometheus endpoint is scraped and `fallwatch status --json` is read."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from fallwatch.keys import Keys
from tests.ingest_media import write_mp4

pytestmark = pytest.mark.slow
ROLES = ("ingest", "edge", "cloud", "alerts")


def scrape(endpoint: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(fallwatch_[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
    return values


def endpoints(client: redis.Redis, keys: Keys) -> dict[str, str]:
    found = {}
    for role in ROLES:
        for key in client.scan_iter(match=keys.metrics_endpoint(role, "*")):
            found[role] = client.get(key).decode()
    return found


def wait_for(cond, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.5)
    return False


def test_up_runs_every_role_serves_metrics_and_status(tmp_path: Path) -> None:
    data = Path(tempfile.mkdtemp(prefix="fw-up-"))
    video = write_mp4(tmp_path / "room.mp4", frames=90, fps=18)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALLWATCH_")}
    env.update({
        "FALLWATCH_REDIS__DATA_DIR": str(data),
        "FALLWATCH_CAMERAS": json.dumps([{"id": "room1", "name": "Room 1", "url": str(video), "fps": 4}]),
        "FALLWATCH_EDGE__MODEL": "tiny",
        "FALLWATCH_CLOUD__MODEL": "tiny", "FALLWATCH_CLOUD__DEVICE": "cpu", "FALLWATCH_CLOUD__DTYPE": "fp32",
        "FALLWATCH_METRICS__HEARTBEAT_S": "1",
        "FALLWATCH_LOGGING__LEVEL": "warning",
    })
    exe = Path(sys.executable).with_name("fallwatch")
    proc = subprocess.Popen([str(exe), "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    keys = Keys()
    try:
        sock = data / "redis.sock"
        assert wait_for(sock.exists, 30), "embedded Redis did not start"
        client = redis.Redis(unix_socket_path=str(sock))
        assert wait_for(lambda: set(endpoints(client, keys)) == set(ROLES), 90), endpoints(client, keys)
        assert wait_for(lambda: client.xlen(keys.final_stream()) >= 3, 90)
        eps = endpoints(client, keys)
        assert wait_for(lambda: scrape(eps["edge"]).get("fallwatch_edge_batch_size_count", 0) > 0, 30)
        assert scrape(eps["ingest"]).get("fallwatch_frames_ingested_total", 0) > 0
        assert scrape(eps["alerts"]).get("fallwatch_final_verdicts_total", 0) >= 3
        # nothing is offloaded without a switcher: the cloud endpoint serves its labelled registry only
        assert "fallwatch_role_info" in scrape(eps["cloud"])
        for role in ROLES:
            health = subprocess.run([str(exe), "health", role], env=env, capture_output=True, text=True, timeout=60)
            assert health.returncode == 0, (role, health.stderr)
        status = subprocess.run([str(exe), "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        snap = json.loads(status.stdout)
        assert [c["id"] for c in snap["cameras"]] == ["room1"]
        assert {w["role"] for w in snap["workers"]} == set(ROLES)
        streams = {s["name"]: s for s in snap["streams"]}
        assert any(s["length"] > 0 for name, s in streams.items() if "final" in name)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()[-3000:]
    leftover = subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True).stdout.strip()
    assert leftover == ""
    shutil.rmtree(data, ignore_errors=True)

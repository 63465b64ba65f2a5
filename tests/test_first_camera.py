"""The README's "Your first camera" section as written: its config validates, the channel it names is
the one events are published on, and `alerts tail` prints the redis-cli line and raw messages."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fallwatch.keys import Keys
from fallwatch.redis import EmbeddedRedis, redis_cli
from fallwatch.settings import Settings
from fallwatch.schemas import AlertEvent, EventKind, EventType
from tests.faults import role_env
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]
SECTION = (ROOT / "README.md").read_text().split("## Your first camera", 1)[1].split("\n## ", 1)[0]


def readme_config() -> str:
    return re.search(r"```yaml\n(.*?)```", SECTION, re.S).group(1)


def test_the_readme_config_validates_as_written(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from fallwatch.cli import app

    monkeypatch.delenv("FALLWATCH_CONFIG", raising=False)
    cfg = tmp_path / "first-camera.yaml"
    cfg.write_text("\n".join(line[3:] for line in readme_config().splitlines()))
    assert yaml.safe_load(cfg.read_text())["cameras"][0]["id"] == "hall"
    res = CliRunner().invoke(app, ["-c", str(cfg), "config", "validate"])
    assert res.exit_code == 0 and "(1 camera)" in res.output, res.output


def test_the_readme_names_the_real_channel_and_socket() -> None:
    assert f"SUBSCRIBE {Keys().alerts_channel()}" in SECTION.replace("\n   ", " ")
    data_dir = Settings().redis.data_dir                       # the default: where `up` puts the socket
    line = redis_cli(EmbeddedRedis(data_dir).url, "SUBSCRIBE", Keys().alerts_channel())
    assert line.endswith(f"/{data_dir}/redis.sock SUBSCRIBE {Keys().alerts_channel()}")
    assert line.replace(str(Path.cwd().absolute()) + "/", "") in SECTION.replace("\n   ", " ")
    for needed in ("scripts/install-rtsp.sh", "tests/rtsp_server.py", "up", "alerts ack", "status --once"):
        assert needed in SECTION


def test_redis_cli_lines() -> None:
    assert redis_cli("redis://db.example:6380/2", "PING") == "redis-cli -h db.example -p 6380 -n 2 PING"
    assert redis_cli("rediss://app:pw@h:6379/0", "PING") == "redis-cli -h h -p 6379 --tls --user app --askpass PING"


@pytest.mark.slow
def test_alerts_tail_raw_prints_the_redis_cli_line_and_each_message(redis_url, r, keys) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "fallwatch", "alerts", "tail", "--raw"], env=role_env(redis_url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: r.pubsub_numsub(keys.alerts_channel())[0][1] == 1, 30)
        ev = AlertEvent(event_id="e1", type=EventType.START, kind=EventKind.FALL, camera_id="hall",
                        started_at=time.time())
        r.publish(keys.alerts_channel(), ev.model_dump_json())
        assert proc.stdout.readline().strip() == ev.model_dump_json()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert f"redis-cli -s {redis_url[len('unix://'):].split('?')[0]} SUBSCRIBE {keys.alerts_channel()}" in err

"""Ordinary mistakes get one line saying what is wrong and what to do, exit 2, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from apprise.manager_plugins import NotificationManager
from typer.testing import CliRunner

from fallwatch.cli import app
from tests.helpers import free_port, wait_for

pytestmark = pytest.mark.slow
ONE_SHOT = [("alerts", "stats"), ("alerts", "tail"), ("alerts", "ack", "some-event"), ("status", "--once"),
            ("replay", "--video", "clip.mp4")]


def closed_port_env(**extra: str) -> dict[str, str]:
    """Default retry settings (8 attempts, 5 s cap) and a port nobody listens on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALLWATCH_")}
    return {**env, "FALLWATCH_REDIS__URL": f"redis://127.0.0.1:{free_port()}/0", "PYTHONUNBUFFERED": "1", **extra}


def run(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fallwatch", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args", ONE_SHOT, ids=lambda a: " ".join(a))
def test_one_shot_commands_fail_fast_on_a_closed_port(args, tmp_path) -> None:
    (tmp_path / "clip.mp4").write_bytes(b"")
    started = time.monotonic()
    res = run(*args, env=closed_port_env(), cwd=tmp_path)
    took = time.monotonic() - started
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("cannot reach Redis at 127.0.0.1:") and "redis.url" in res.stderr
    assert took < 12, took  # no reconnect retries (8 of them with backoff took 16-17 s)


@pytest.mark.parametrize("role", ["edge", "alerts"])
def test_long_running_roles_say_at_once_they_wait_for_redis_and_stop_cleanly(role, tmp_path) -> None:
    log = tmp_path / "role.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fallwatch", "--log-level", "error", role],
                                env=closed_port_env(FALLWATCH_EDGE__MODEL="tiny"), stdout=out,
                                stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
        try:
            assert wait_for(lambda: "retrying" in log.read_text(), 60), log.read_text()
            assert proc.poll() is None
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "cannot reach Redis at 127.0.0.1:" in text and "Traceback" not in text
    assert "Loading weights" not in text.split("retrying")[0]  # said before loading the model


def test_a_wrong_switcher_checkpoint_is_one_line(redis_server, tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    env = closed_port_env(FALLWATCH_REDIS__URL=redis_server.url, FALLWATCH_SWITCHER__CHECKPOINT=str(tmp_path))
    res = run("edge", "--edge", "tiny", env=env, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    [line] = [x for x in res.stderr.splitlines() if x.startswith("switcher.checkpoint")]
    assert "not a switcher checkpoint" in line and "fallwatch switcher train" in line


def validate(tmp_path: Path, config: dict) -> tuple[int, str]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    res = CliRunner().invoke(app, ["config", "validate", str(path)])
    return res.exit_code, res.output


def test_validate_checks_the_paths_it_names(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("FALLWATCH_CONFIG", raising=False)
    code, out = validate(tmp_path, {"switcher": {"checkpoint": str(tmp_path / "nope")}, "edge": {"model": "tiny"},
                                    "cameras": [{"id": "hall", "url": str(tmp_path / "hall.mp4")}]})
    assert code == 2
    assert f"switcher.checkpoint: {tmp_path / 'nope'} does not exist" in out
    assert "cameras.0.url: camera hall: the file" in out
    (tmp_path / "hall.mp4").write_bytes(b"x")
    code, out = validate(tmp_path, {"cameras": [{"id": "hall", "url": str(tmp_path / "hall.mp4")}],
                                    "edge": {"model": "./models/missing"}})
    assert code == 2 and "edge.model: models/missing does not exist" in out
    code, out = validate(tmp_path, {"cameras": [{"id": "hall", "url": str(tmp_path / "hall.mp4")}]})
    assert code == 0 and "(1 camera)" in out


def test_validate_checks_notification_urls_and_names_a_missing_package(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("FALLWATCH_CONFIG", raising=False)
    monkeypatch.setattr(NotificationManager()["mqtt"], "enabled", False)  # as without paho-mqtt
    code, out = validate(tmp_path, {"notifications": {"urls": ["mqtt://127.0.0.1:1883/fallwatch/alerts",
                                                               "json://127.0.0.1:9/hook", "nosuch://x"]}})
    assert code == 2
    assert "notifications.urls.0: mqtt:// needs the Python package paho-mqtt" in out
    assert "notifications.urls.2: unknown notification scheme 'nosuch://'" in out
    assert "urls.1" not in out and "1883" not in out  # the good one passes; no URL is printed


def test_bad_yaml_fields_exit_2(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("FALLWATCH_CONFIG", raising=False)
    code, out = validate(tmp_path, {"edge": {"batch_size": 0}})
    assert code == 2 and "edge.batch_size" in out

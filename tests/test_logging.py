from __future__ import annotations

import io
import json

import structlog

from fallwatch.logging import configure, redact_text


def test_redact_text() -> None:
    assert redact_text("redis://app:pw@host:6379/0") == "redis://app:***@host:6379/0"
    assert redact_text("rtsp://admin:12345@10.1.1.1/live") == "rtsp://admin:***@10.1.1.1/live"
    assert "TOKEN" not in redact_text("notify tgram://123:TOKEN/456 failed")
    assert redact_text("plain text http://host/path") == "plain text http://host/path"


def test_json_logs_redact_secrets() -> None:
    buf = io.StringIO()
    configure("info", "json", stream=buf)
    log = structlog.get_logger("t")
    log.info("connected", url="rediss://u:topsecret@h:1/0", password="pw1", nested={"token": "t0k"})
    try:
        raise ValueError("cannot open rtsp://cam:camsecret@1.2.3.4/s")
    except ValueError:
        log.exception("camera_failed")
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    text = buf.getvalue()
    for secret in ("topsecret", "pw1", "t0k", "camsecret"):
        assert secret not in text
    assert lines[0]["event"] == "connected" and lines[0]["level"] == "info"
    assert lines[0]["url"] == "rediss://u:***@h:1/0"
    assert "ValueError" in lines[1]["exception"]


def test_level_filtering() -> None:
    buf = io.StringIO()
    configure("warning", "json", stream=buf)
    structlog.get_logger("t").info("hidden")
    structlog.get_logger("t").warning("shown")
    assert [json.loads(x)["event"] for x in buf.getvalue().splitlines()] == ["shown"]

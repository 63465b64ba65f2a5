"""A notification channel that cannot be used never stops the alerts service or the other channels."""

from __future__ import annotations

import json

import pytest
from apprise.manager_plugins import NotificationManager
from typer.testing import CliRunner

from alerts.notify import Notifier, build_channels
from fallwatch.checks import url_problem
from fallwatch.cli import app
from tests.faults import Roles, fallwatch, role_env, wait_up
from tests.test_notify import hook, make_settings, start_fall_event  # noqa: F401, F811 - hook is a fixture

BAD = "nosuch://127.0.0.1/fallwatch"


def test_url_problem_names_the_scheme_the_package_and_a_malformed_url(monkeypatch) -> None:
    assert url_problem("json://127.0.0.1:9/hook") is None
    assert "unknown notification scheme 'nosuch://'" in url_problem(BAD)
    assert "json://" in url_problem("json://")
    monkeypatch.setattr(NotificationManager()["mqtt"], "enabled", False)  # as without paho-mqtt
    assert "needs the Python package paho-mqtt" in url_problem("mqtt://127.0.0.1:1883/fallwatch/alerts")


def test_a_bad_channel_is_reported_and_its_deliveries_stay_owed(redis_url, r, keys, hook) -> None:  # noqa: F811
    settings = make_settings(redis_url, [f"json://127.0.0.1:{hook.port}/hook", BAD])
    with pytest.raises(ValueError, match="nosuch"):
        build_channels(settings)
    start_fall_event(settings, r, keys)
    notifier = Notifier(settings, r, keys, "n1")
    rep = notifier.step()
    assert (rep.delivered, rep.owed) == (1, 1) and len(hook.received) == 1
    assert notifier.outbox_size() == 1                          # the bad channel's delivery is still owed
    [reason] = r.hvals(keys.notify_broken())
    assert b"unknown notification scheme" in reason


def test_health_alerts_fails_with_the_reason_and_status_lists_it(redis_url, r, keys, monkeypatch) -> None:
    monkeypatch.setenv("FALLWATCH_REDIS__URL", redis_url)
    r.set(keys.heartbeat("alerts", "a1"), "1", ex=30)
    runner = CliRunner()
    assert runner.invoke(app, ["health", "alerts"]).exit_code == 0
    r.hset(keys.notify_broken(), "c1", "notification channel c1: unknown notification scheme 'nosuch://'")
    res = runner.invoke(app, ["health", "alerts"])
    assert res.exit_code == 1 and "nosuch://" in res.output
    snap = json.loads(runner.invoke(app, ["status", "--json"]).output)
    assert any("nosuch://" in p for p in snap["problems"])
    assert snap["down"] == ["edge", "cloud"]
    assert "down" in runner.invoke(app, ["status", "--once"]).output


@pytest.mark.slow
def test_the_alerts_service_runs_with_a_bad_channel(redis_server, r, keys, tmp_path) -> None:
    with Roles(redis_server.url, tmp_path, notifications__urls=[BAD]) as roles:
        roles.start("alerts", "alerts", "--name", "alerts-1")
        wait_up(r, keys, roles, ("alerts", "alerts-1"), timeout=60)
        assert roles["alerts"].alive, roles.logs()
        res = fallwatch("health", "alerts", env=role_env(redis_server.url, notifications__urls=[BAD]))
        assert res.returncode == 1 and "unknown notification scheme" in res.stderr + res.stdout
        assert roles.stop_all()["alerts"] == 0
    assert "notification_channel_unusable" in roles["alerts"].output()

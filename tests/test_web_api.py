"""The caregiver station's JSON API against a real Redis: every route, sign-in, roles, CSRF,
sessions, bad input (clear 4xx, nothing changed), snapshots, and the CLI around it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from alerts.store import EventNotFound, resolve
from fallwatch.cli import _load_plugins, app as cli_app
from fallwatch.keys import Keys
from fallwatch.schemas import AlertEvent, EventOutcome, EventType, OutcomeRecord, decode
from fallwatch.settings import ConfigError, Settings, load_settings
from ingest.status import StatusReporter
from tests.web_helpers import PASSWORD, csrf, fall_event, login, offline_event, write_users
from web.app import create_app
from web.users import read_users_file

_load_plugins()


@pytest.fixture(scope="module")
def users_file(tmp_path_factory) -> Path:
    return write_users(tmp_path_factory.mktemp("web") / "users.yaml")


@pytest.fixture
def web_settings(settings: Settings, users_file: Path) -> Settings:
    return settings.model_copy(update={"web": settings.web.model_copy(update={"users_file": users_file})})


def client_for(settings: Settings, r, https: bool = False) -> TestClient:
    app = create_app(settings, r, Keys(settings.redis.key_prefix))
    return TestClient(app, base_url="https://testserver" if https else "http://testserver")


@pytest.fixture
def web(web_settings, r):
    with client_for(web_settings, r) as c:
        yield c


@pytest.fixture
def carol(web):
    assert login(web, "carol").status_code == 200
    return web


def event_record(r, keys, event_id) -> AlertEvent:
    return AlertEvent.from_json(r.hget(keys.event(event_id), "m"))


# --- every route needs a session ---------------------------------------------------------------------


def test_every_api_route_refuses_anonymous_requests(web, web_settings, r, keys):
    ev = fall_event(r, keys, web_settings)
    open_routes = {"/api/login-token", "/api/login"}
    checked = 0
    for route in web.app.routes:
        path = getattr(route, "path", "")
        if not path.startswith("/api/") or path in open_routes:
            continue
        for method in route.methods - {"HEAD"}:
            res = web.request(method, path.replace("{event_id}", ev.event_id), json={"outcome": "false_alarm"})
            assert res.status_code == 401, (method, path, res.text)
            assert res.headers["cache-control"] == "no-store"
            checked += 1
    assert checked >= 10
    assert web.get("/api/openapi.json").status_code == 401
    for page in ("/", "/admin"):
        res = web.get(page, follow_redirects=False)
        assert res.status_code == 303 and res.headers["location"] == "/login"
    assert web.get("/login").status_code == 200
    assert not event_record(r, keys, ev.event_id).acknowledged


def test_openapi_lists_the_api_for_a_signed_in_user(carol):
    spec = carol.get("/api/openapi.json").json()
    for path in ("/api/events/open", "/api/events", "/api/events/{event_id}", "/api/events/{event_id}/ack",
                 "/api/events/{event_id}/resolve", "/api/events/{event_id}/snapshot", "/api/cameras", "/api/status",
                 "/api/stream", "/api/login", "/api/logout", "/api/me"):
        assert path in spec["paths"], path
    assert "ResolveBody" in json.dumps(spec["components"])


# --- sign-in, cookies, sessions -----------------------------------------------------------------------


def test_sign_in_sets_a_signed_httponly_samesite_cookie_without_secure_over_http(web):
    res = login(web, "carol")
    assert res.status_code == 200 and res.json()["role"] == "caregiver"
    cookie = next(c for c in res.headers.get_list("set-cookie") if c.startswith("fw_session="))
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    web.cookies.clear()
    web.cookies.set("fw_session", value[:-3] + ("AAA" if not value.endswith("AAA") else "BBB"))
    assert web.get("/api/me").status_code == 401  # altered signature


def test_cookie_is_secure_under_tls(web_settings, r):
    with client_for(web_settings, r, https=True) as c:
        res = login(c, "adam")
        assert res.status_code == 200
        cookie = next(x for x in res.headers.get_list("set-cookie") if x.startswith("fw_session="))
        assert "Secure" in cookie


def test_wrong_password_is_refused_and_repeated_failures_are_throttled(web, web_settings, r, keys):
    assert login(web, "nobody", PASSWORD).status_code == 401
    for _ in range(web_settings.web.login_max_failures - 1):
        assert login(web, "carol", "wrong password!").status_code == 401
    res = login(web, "carol", PASSWORD)  # right password, but this address is throttled now
    assert res.status_code == 429 and int(res.headers["retry-after"]) > 0
    assert "too many" in res.json()["detail"]
    assert not list(r.scan_iter(match=keys.web_session("*")))


def test_login_without_its_csrf_token_is_refused(web):
    res = web.post("/api/login", json={"name": "carol", "password": PASSWORD})
    assert res.status_code == 403 and "CSRF" in res.json()["detail"]
    web.get("/api/login-token")
    res = web.post("/api/login", json={"name": "carol", "password": PASSWORD}, headers={"X-CSRF-Token": "forged"})
    assert res.status_code == 403


def test_sessions_expire_and_logout_ends_them(carol, r, keys, web_settings):
    (key,) = [k.decode() for k in r.scan_iter(match=keys.web_session("*"))]
    assert 0 < r.ttl(key) <= web_settings.web.idle_timeout_s
    r.hset(key, "created_at", repr(time.time() - web_settings.web.session_ttl_s - 1))
    assert carol.get("/api/me").status_code == 401  # past session_ttl_s, whatever the activity
    assert not r.exists(key)
    assert login(carol, "carol").status_code == 200
    assert carol.post("/api/logout").status_code == 403  # no CSRF token
    assert carol.post("/api/logout", headers=csrf(carol)).status_code == 200
    assert carol.get("/api/me").status_code == 401


# --- events: open, ack, resolve, history ---------------------------------------------------------------


def test_open_event_ack_and_resolve_record_who_when_and_source(carol, r, keys, web_settings):
    ev = fall_event(r, keys, web_settings, decided_by="edge_timeout")
    (row,) = carol.get("/api/events/open").json()
    assert row["event_id"] == ev.event_id and row["camera_name"] == "room-12" and row["active"]
    assert row["decided_words"] == "edge only: the cloud did not answer in time" and row["state"] == "new"
    before = time.time()
    acked = carol.post(f"/api/events/{ev.event_id}/ack", headers=csrf(carol)).json()
    assert acked["acknowledged_by"] == "carol" and acked["ack_source"] == "web"
    assert before <= acked["acknowledged_at"] <= time.time() and acked["state"] == "carol is going"
    res = carol.post(f"/api/events/{ev.event_id}/resolve", headers=csrf(carol),
                     json={"outcome": "false_alarm", "note": "dropped a towel"})
    assert res.status_code == 200
    stored = event_record(r, keys, ev.event_id)
    assert stored.outcome is EventOutcome.FALSE_ALARM and stored.resolved_by == "carol"
    assert stored.outcome_note == "dropped a towel" and before <= stored.resolved_at <= time.time()
    last, _ = decode(r.xrevrange(keys.alerts_stream(), count=1)[0][1], expect=AlertEvent)
    assert last.type is EventType.END and last.outcome is EventOutcome.FALSE_ALARM
    (rec,) = [decode(f, expect=OutcomeRecord)[0] for _, f in r.xrange(keys.outcomes_stream())]
    assert rec.frame_ids == ev.frame_ids and rec.by == "carol" and rec.source == "web"
    assert carol.get("/api/events/open").json() == []
    assert carol.get(f"/api/events/{ev.event_id}").json()["state"] == "resolved: false alarm"


def test_state_changes_without_the_csrf_token_get_403_and_change_nothing(carol, r, keys, web_settings):
    ev = fall_event(r, keys, web_settings)
    before = r.hgetall(keys.event(ev.event_id))
    for headers in ({}, {"X-CSRF-Token": "not-the-token"}):
        assert carol.post(f"/api/events/{ev.event_id}/ack", headers=headers).status_code == 403
        res = carol.post(f"/api/events/{ev.event_id}/resolve", headers=headers, json={"outcome": "confirmed_fall"})
        assert res.status_code == 403 and "CSRF" in res.json()["detail"]
    assert r.hgetall(keys.event(ev.event_id)) == before
    assert r.xlen(keys.outcomes_stream()) == 0


def test_bad_input_gets_a_clear_4xx_and_changes_nothing(carol, r, keys, web_settings):
    ev = fall_event(r, keys, web_settings)
    offline = offline_event(r, keys, web_settings)
    h = csrf(carol)
    alerts_len = r.xlen(keys.alerts_stream())
    assert carol.post("/api/events/nope/ack", headers=h).json() == {"detail": "no event 'nope'"}
    assert carol.post("/api/events/nope/resolve", headers=h, json={"outcome": "false_alarm"}).status_code == 404
    assert carol.get("/api/events/nope").status_code == 404
    res = carol.post(f"/api/events/{ev.event_id}/resolve", headers=h, json={"outcome": "false_alarm", "note": "x" * 1001})
    assert res.status_code == 422 and res.json()["detail"] == "note: at most 1000 characters"
    res = carol.post(f"/api/events/{ev.event_id}/resolve", headers=h, json={"outcome": "maybe"})
    assert res.status_code == 422
    res = carol.post(f"/api/events/{offline.event_id}/resolve", headers=h, json={"outcome": "false_alarm"})
    assert res.status_code == 409 and "only fall events" in res.json()["detail"]
    assert r.xlen(keys.alerts_stream()) == alerts_len and event_record(r, keys, ev.event_id).outcome is None
    assert carol.post(f"/api/events/{ev.event_id}/resolve", headers=h, json={"outcome": "confirmed_fall"}).status_code == 200
    snapshot = r.hgetall(keys.event(ev.event_id))
    res = carol.post(f"/api/events/{ev.event_id}/resolve", headers=h, json={"outcome": "false_alarm"})
    assert res.status_code == 409 and "already resolved as confirmed_fall by carol" in res.json()["detail"]
    assert r.hgetall(keys.event(ev.event_id)) == snapshot and r.xlen(keys.outcomes_stream()) == 1
    assert carol.get("/api/events?page=0").status_code == 422
    assert carol.get("/api/events?outcome=bogus").status_code == 422


def test_history_filters_and_pages(carol, r, keys, web_settings):
    t0 = time.time() - 3 * 86400
    made = []
    for i in range(5):
        cam = "room-12" if i % 2 == 0 else "room-14"
        r.delete(keys.camera_state(cam))  # each fall starts its own event
        ev = fall_event(r, keys, web_settings, camera=cam, at=t0 + i * 3600)
        made.append(ev)
        if i < 3:
            resolve(r, keys, ev.event_id, "carol", "false_alarm" if i == 0 else "confirmed_fall", 1000)
    page1 = carol.get("/api/events?size=2").json()
    assert page1["total"] == 5 and page1["pages"] == 3 and len(page1["events"]) == 2
    assert [e["event_id"] for e in page1["events"]] == [made[4].event_id, made[3].event_id]  # newest first
    page3 = carol.get("/api/events?size=2&page=3").json()
    assert [e["event_id"] for e in page3["events"]] == [made[0].event_id]
    assert {e["event_id"] for e in carol.get("/api/events?camera=room-14").json()["events"]} == {made[1].event_id, made[3].event_id}
    assert [e["event_id"] for e in carol.get("/api/events?outcome=false_alarm").json()["events"]] == [made[0].event_id]
    assert len(carol.get("/api/events?outcome=none").json()["events"]) == 2
    window = carol.get(f"/api/events?since={t0 + 1800}&until={t0 + 3 * 3600 + 1}").json()
    assert [e["event_id"] for e in window["events"]] == [made[3].event_id, made[2].event_id, made[1].event_id]


def test_resolving_a_running_event_releases_the_camera(r, keys, web_settings):
    first = fall_event(r, keys, web_settings)
    resolve(r, keys, first.event_id, "carol", "false_alarm", 1000)
    second = fall_event(r, keys, web_settings, at=time.time() + 5)
    assert second.event_id != first.event_id
    assert event_record(r, keys, first.event_id).outcome is EventOutcome.FALSE_ALARM
    with pytest.raises(EventNotFound):
        resolve(r, keys, "missing", "carol", "false_alarm", 1000)


# --- cameras, roles, admin status, snapshots ---------------------------------------------------------------


def test_cameras_show_state_and_open_event(carol, r, keys, web_settings):
    rep = StatusReporter(r, keys, "room-12", name="Room 12")
    rep.online(fps=2.0)
    r.hset(keys.camera_info("room-12"), "last_frame_at", time.time())
    ev = fall_event(r, keys, web_settings, camera="room-12")
    (cam,) = carol.get("/api/cameras").json()
    assert cam["name"] == "Room 12" and cam["online"] and cam["open_event"]["event_id"] == ev.event_id
    rep.offline("stream ended")
    (cam,) = carol.get("/api/cameras").json()
    assert cam["state"] == "offline" and not cam["online"] and cam["reason"] == "stream ended"


def test_caregivers_cannot_open_the_admin_page_or_status(carol):
    assert carol.get("/admin").status_code == 403
    assert carol.get("/api/status").json() == {"detail": "the admin role is needed"}
    assert carol.get("/api/stream?status=1").status_code == 403


def test_admin_status_reports_queue_workers_redis_and_precision(web, r, keys, web_settings):
    assert login(web, "adam").status_code == 200
    for outcome in ("confirmed_fall", "confirmed_fall", "false_alarm", "not_sure"):
        resolve(r, keys, fall_event(r, keys, web_settings, camera="room-12").event_id, "adam", outcome, 1000)
        r.delete(keys.camera_state("room-12"))  # the next event may start at once
    r.set(keys.heartbeat("edge", "e1"), repr(time.time()), ex=15)
    r.set(keys.metrics_endpoint("edge", "e1"), "127.0.0.1:9999", ex=15)
    r.hset(keys.stats(), mapping={"finals": 10, "offloaded": 4, "by:edge_timeout": 1, "by:cloud": 3})
    s = web.get("/api/status").json()
    assert s["scoring"]["offload_rate"] == 0.4 and s["timeouts"]["edge_timeout"] == 1
    assert s["queue"]["depth"] == 0 and s["queue_age_s"] is None and s["redis"]["used_memory_bytes"] > 0
    assert [w["name"] for w in s["workers"]] == ["e1"] and s["metrics_links"] == ["http://127.0.0.1:9999/metrics"]
    (day,) = s["precision"]["room-12"]
    assert (day["confirmed"], day["false_alarm"], day["not_sure"]) == (2, 1, 1)
    assert day["precision"] == pytest.approx(2 / 3)
    assert s["budget"]["mode"] == "fixed" and s["budget"]["kept_budget"] == 0
    assert s["switcher"]["version"] is None and s["switcher"]["drift"] is None
    assert web.get("/admin").status_code == 200


def test_snapshots_are_off_by_default(carol, r, keys, web_settings):
    ev = fall_event(r, keys, web_settings)
    res = carol.get(f"/api/events/{ev.event_id}/snapshot")
    assert res.status_code == 403 and "web.snapshots" in res.json()["detail"]


def test_snapshot_is_served_uncached_and_its_view_logged(web_settings, r, keys):
    on = web_settings.model_copy(update={"web": web_settings.web.model_copy(update={"snapshots": True})})
    ev = fall_event(r, keys, on)
    with client_for(on, r) as c:
        assert login(c, "carol").status_code == 200
        assert c.get(f"/api/events/{ev.event_id}/snapshot").status_code == 404  # pixels expired / never kept
        r.hset(keys.pixels(ev.frame_ids[-1]), mapping={"p0": b"\xff\xd8jpeg-bytes"})
        res = c.get(f"/api/events/{ev.event_id}/snapshot")
        assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
        assert res.content == b"\xff\xd8jpeg-bytes" and "no-store" in res.headers["cache-control"]
    ((_, entry),) = r.xrange(keys.web_audit_stream())
    assert entry[b"action"] == b"snapshot_viewed" and entry[b"user"] == b"carol"
    assert entry[b"frame_id"].decode() == ev.frame_ids[-1]


# --- configuration and commands ----------------------------------------------------------------------------


def test_plain_password_in_config_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"web": {"users": [{"name": "eve", "role": "admin", "password": "hunter2hunter2"}]}}))
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg)
    assert "plain password is refused" in str(exc.value) and "hunter2" not in str(exc.value)
    cfg.write_text(yaml.safe_dump({"web": {"users": [{"name": "eve", "password_hash": "hunter2hunter2"}]}}))
    with pytest.raises(ConfigError, match="not an argon2 hash"):
        load_settings(cfg)


def test_user_add_prompts_and_writes_only_an_argon2_hash(tmp_path):
    path = tmp_path / "users.yaml"
    runner = CliRunner()
    res = runner.invoke(cli_app, ["web", "user", "add", "nina", "--role", "caregiver", "--file", str(path)],
                        input="a long password\na long password\n")
    assert res.exit_code == 0, res.output
    (user,) = read_users_file(path)
    assert user.name == "nina" and user.role == "caregiver"
    assert user.password_hash.get_secret_value().startswith("$argon2id$")
    assert "a long password" not in path.read_text() and path.stat().st_mode & 0o077 == 0
    res = runner.invoke(cli_app, ["web", "user", "add", "otto", "--file", str(path)], input="short\nshort\n")
    assert res.exit_code == 2 and "at least 10 characters" in res.output
    res = runner.invoke(cli_app, ["web", "user", "add", "otto", "--role", "boss", "--file", str(path)],
                        input="a long password\na long password\n")
    assert res.exit_code == 2 and "role" in res.output
    assert [u.name for u in read_users_file(path)] == ["nina"]


def test_web_refuses_to_start_without_users(tmp_path, redis_url):
    res = CliRunner().invoke(cli_app, ["web"], env={"FALLWATCH_REDIS__URL": redis_url,
                                                    "FALLWATCH_WEB__USERS_FILE": str(tmp_path / "none.yaml")})
    assert res.exit_code == 2 and "no users" in res.output


def test_cli_resolve_uses_the_same_path(r, keys, web_settings, redis_url):
    ev = fall_event(r, keys, web_settings)
    env = {"FALLWATCH_REDIS__URL": redis_url}
    runner = CliRunner()
    res = runner.invoke(cli_app, ["alerts", "resolve", ev.event_id, "--outcome", "confirmed_fall", "--note", "on the floor",
                                  "--by", "night-nurse"], env=env)
    assert res.exit_code == 0, res.output
    stored = event_record(r, keys, ev.event_id)
    assert stored.outcome is EventOutcome.CONFIRMED_FALL and stored.resolved_by == "night-nurse"
    assert stored.ack_source == "cli"
    res = runner.invoke(cli_app, ["alerts", "resolve", ev.event_id, "--outcome", "false_alarm"], env=env)
    assert res.exit_code == 2 and "already resolved" in res.output
    res = runner.invoke(cli_app, ["alerts", "resolve", "nope", "--outcome", "false_alarm"], env=env)
    assert res.exit_code == 2 and "no alert event" in res.output


def test_outcomes_export_labels_frames_in_the_distill_label_field(r, keys, web_settings, redis_url, tmp_path):
    from switcher import records

    fall = fall_event(r, keys, web_settings, camera="room-12")
    resolve(r, keys, fall.event_id, "carol", "confirmed_fall", 1000)
    r.delete(keys.camera_state("room-12"))
    false = fall_event(r, keys, web_settings, camera="room-12", at=time.time() + 10)
    resolve(r, keys, false.event_id, "carol", "false_alarm", 1000)
    frames = fall.frame_ids + false.frame_ids + ["other:1"]
    dmd = tmp_path / "dmd"
    dmd.mkdir()
    records.rewrite_items(dmd, [records.DmdItem(
        id=f, path=f, label=None, edge_p_fall=0.9, edge_pred=True, cloud_p_fall=0.9, cloud_pred=True, agree=True,
        edge_time_s=0.1, cloud_time_s=1.0, edge_energy_j=None, cloud_energy_j=None, shard="s0.npy", row=i)
        for i, f in enumerate(frames)])
    out = tmp_path / "labels.jsonl"
    res = CliRunner().invoke(cli_app, ["alerts", "outcomes", "--out", str(out), "--dmd", str(dmd), "--json"],
                             env={"FALLWATCH_REDIS__URL": redis_url})
    assert res.exit_code == 0, res.output
    rows = {json.loads(line)["id"]: json.loads(line) for line in out.read_text().splitlines()}
    assert {rows[f]["label"] for f in fall.frame_ids} == {True}
    assert {rows[f]["label"] for f in false.frame_ids} == {False}
    labels = {i.id: i.label for i in records.read_items(dmd)}
    assert labels == {**{f: True for f in fall.frame_ids}, **{f: False for f in false.frame_ids}, "other:1": None}
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["room-12"][0]["confirmed"] == 1 and report["room-12"][0]["false_alarm"] == 1


def test_new_keys_are_pinned():
    k = Keys("fw")
    assert k.events_index() == "fw:events" and k.outcomes_stream() == "fw:stream:outcomes"
    assert k.web_session("s1") == "fw:web:session:s1" and k.web_secret() == "fw:web:secret"
    assert k.web_login_failures("user", "carol") == "fw:web:login-failures:user:carol"
    assert k.web_audit_stream() == "fw:stream:web-audit"


def test_up_runs_the_web_role_only_when_users_exist(tmp_path, users_file):
    from fallwatch.cli import role_specs

    with_users = Settings(web={"users_file": str(users_file)})
    without = Settings(web={"users_file": str(tmp_path / "missing.yaml")})
    assert "web" in [s.name for s in role_specs(with_users, 1, True, True, web=True)]
    assert "web" not in [s.name for s in role_specs(with_users, 1, True, True, web=False)]
    assert "web" not in [s.name for s in role_specs(without, 1, True, True, web=True)]
    off = Settings(web={"users_file": str(users_file), "enabled": False})
    assert "web" not in [s.name for s in role_specs(off, 1, True, True, web=True)]


def test_throttling_counts_per_user_name_across_addresses_and_per_address(r, keys, web_settings):
    from web.sessions import Sessions

    s = Sessions(r, keys, web_settings.web, "k")
    n = web_settings.web.login_max_failures
    for i in range(n):
        assert s.throttled("carol", f"10.0.0.{i}") is None
        s.failed("carol", f"10.0.0.{i}")
    assert s.throttled("Carol", "10.9.9.9") is not None  # the name, from a fresh address
    assert s.throttled("cara", "10.9.9.9") is None
    s.succeeded("carol")
    assert s.throttled("carol", "10.9.9.9") is None
    assert 0 < r.ttl(keys.web_login_failures("addr", "10.0.0.0")) <= web_settings.web.login_window_s

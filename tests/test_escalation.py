"""Latching fall alarms and their escalation tiers, on a real Redis with an injected clock; resolve;
an alerts process SIGKILLed while a tier is due fires it once after the restart."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis
import yaml
from typer.testing import CliRunner

from alerts.escalation import Escalator
from alerts.notify import Delivery, Notifier, channel_id
from alerts.service import AlertsService
from alerts.store import BadTransition, EventNotFound, acknowledge, load_event, resolve
from fallwatch.keys import Keys
from fallwatch.schemas import (
    decode,
    AlertEvent,
    CameraState,
    CameraStatus,
    EventKind,
    EventOutcome,
    EventType,
)
from fallwatch.settings import ConfigError, Settings, load_settings
from fallwatch.status import gather, render
from fallwatch.webhook import WebhookReceiver
from tests.helpers import FakeClock, edge_verdict, plant, read_all, wait_for

T0 = 1_700_000_000.0
ROOM_URL, LEAD_URL, ONCALL_URL = ("json://127.0.0.1:9/room", "json://127.0.0.1:9/lead", "json://127.0.0.1:9/oncall")
TIERS = [{"name": "carers", "after_s": 0, "urls": [ROOM_URL]},
         {"name": "shift lead", "after_s": 120, "urls": [LEAD_URL]},
         {"name": "on-call", "after_s": 300, "urls": [ONCALL_URL]}]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


def make_settings(redis_url: str, tiers=TIERS, **alerts) -> Settings:
    return Settings(redis={"url": redis_url}, alerts={"escalation": tiers, "quiet_s": 10, **alerts},
                    notifications={"urls": ["json://127.0.0.1:9/desk"]},
                    cameras=[{"id": "room12", "name": "Room 12", "url": "rtsp://cam.local/12"}])


@pytest.fixture
def cfg(redis_url: str, r: redis.Redis) -> Settings:
    return make_settings(redis_url, offline_grace_s=0)


def alert_events(r: redis.Redis, keys: Keys) -> list[AlertEvent]:
    return [m for m in read_all(r, keys.alerts_stream()) if isinstance(m, AlertEvent)]


def outbox(r: redis.Redis, keys: Keys) -> list[Delivery]:
    return [decode(f, expect=Delivery)[0] for _, f in r.xrange(keys.notify_outbox_stream())]


def tier_updates(r: redis.Redis, keys: Keys, tier: int) -> list[AlertEvent]:
    return [e for e in alert_events(r, keys) if e.type is EventType.UPDATE and e.escalation_tier == tier]


def start_fall(svc: AlertsService, r: redis.Redis, keys: Keys, at: float = T0) -> AlertEvent:
    plant(r, keys.verdicts_stream(), edge_verdict("room12:0", at, 0.9), edge_verdict("room12:1", at + 1, 0.95))
    [start] = svc.step().events
    assert start.type is EventType.START and start.kind is EventKind.FALL
    return start


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize("tiers, message", [
    ([{"name": "carers", "after_s": 30}], "notified at once"),
    ([{"name": "a", "after_s": 0}, {"name": "b", "after_s": 300}, {"name": "c", "after_s": 120}], "increasing"),
])
def test_tiers_must_start_at_once_and_increase(tmp_path, tiers, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"alerts": {"escalation": tiers}}))
    with pytest.raises(ConfigError) as exc:
        load_settings(path)
    assert exc.value.errors[0][0] == "alerts.escalation" and message in exc.value.errors[0][1]


def test_a_camera_overrides_the_site_tiers_and_key_format_is_pinned(redis_url):
    cfg = make_settings(redis_url)
    cam = cfg.cameras[0].model_copy(update={"escalation": cfg.alerts.escalation[:1]})
    own = cfg.model_copy(update={"cameras": [cam]})
    assert [t.name for t in own.escalation_for("room12")] == ["carers"]
    assert [t.name for t in own.escalation_for("hall")] == ["carers", "shift lead", "on-call"]
    assert Keys("fw").escalations() == "fw:escalations"


# --- escalation -------------------------------------------------------------------------------


def test_no_ack_escalates_to_tier_2_and_3_and_each_says_tier_and_time_open(cfg, r, keys, clock):
    svc = AlertsService(cfg, r, keys, name="a", clock=clock)
    start = start_fall(svc, r, keys)
    assert (start.escalation_tier, start.escalation_tiers, start.escalation_name) == (1, 3, "carers")
    assert start.next_escalation_at == T0 + 120 and start.still_seen is True
    first = outbox(r, keys)
    assert {d.channel for d in first} == {channel_id("json://127.0.0.1:9/desk"), channel_id(ROOM_URL)}
    assert all(d.tier == 1 and "Tier 1 of 3 (carers): open for 0 s." in d.body for d in first)
    clock.advance(119)
    svc.step()
    assert tier_updates(r, keys, 2) == []  # the fall is no longer seen by now, but nobody acked: wait
    clock.advance(2)
    svc.step()
    [tier2] = tier_updates(r, keys, 2)
    assert (tier2.escalation_name, tier2.next_escalation_at, tier2.acknowledged) == ("shift lead", T0 + 300, False)
    notes = outbox(r, keys)[len(first):]
    assert [(d.channel, d.tier) for d in notes] == [(channel_id(LEAD_URL), 2)]
    assert "Tier 2 of 3 (shift lead): open for 2 min 1 s, not acknowledged." in notes[0].body
    assert notes[0].title == "Fall not acknowledged (tier 2): Room 12"
    clock.advance(180)
    svc.step()
    [tier3] = tier_updates(r, keys, 3)
    assert tier3.next_escalation_at is None and r.zcard(keys.escalations()) == 0
    assert "Tier 3 of 3 (on-call): open for 5 min 1 s" in outbox(r, keys)[-1].body
    clock.advance(3600)
    svc.step()
    assert len(outbox(r, keys)) == 4 and len(tier_updates(r, keys, 3)) == 1  # nothing beyond the last tier
    assert r.hget(keys.event(start.event_id), "active") == b"1"  # and still open


def test_an_ack_between_tiers_stops_the_escalation(cfg, r, keys, clock):
    svc = AlertsService(cfg, r, keys, name="a", clock=clock)
    start = start_fall(svc, r, keys)
    clock.advance(130)
    svc.step()
    assert len(tier_updates(r, keys, 2)) == 1
    ack = acknowledge(r, keys, start.event_id, "shift lead", maxlen=1000, clock=clock, source="cli")
    assert (ack.acknowledged_at, ack.ack_source, ack.next_escalation_at) == (T0 + 130, "cli", None)
    assert r.zcard(keys.escalations()) == 0
    clock.advance(600)
    svc.step()
    assert tier_updates(r, keys, 3) == [] and len(outbox(r, keys)) == 3
    assert load_event(r, keys, start.event_id).escalation_tier == 2
    assert r.hget(keys.event(start.event_id), "active") == b"1"  # acknowledged is not resolved


def test_an_ack_that_misses_the_set_still_stops_the_tier(cfg, r, keys, clock):
    """A due member whose event was acknowledged (or ended) is dropped, not fired."""
    svc = AlertsService(cfg, r, keys, name="a", clock=clock)
    start = start_fall(svc, r, keys)
    acknowledge(r, keys, start.event_id, "ann", maxlen=1000, clock=clock)
    r.zadd(keys.escalations(), {start.event_id: T0 + 120})  # as if written before the ack
    clock.advance(200)
    svc.step()
    assert tier_updates(r, keys, 2) == [] and r.zcard(keys.escalations()) == 0


def test_several_alerts_processes_fire_a_due_tier_once(cfg, r, keys, clock, redis_url):
    svc = AlertsService(cfg, r, keys, name="a", clock=clock)
    start_fall(svc, r, keys)
    clock.advance(121)
    clients = [redis.Redis.from_url(redis_url) for _ in range(6)]
    escalators = [Escalator(c, keys, cfg, clock) for c in clients]
    gate, fired = threading.Barrier(len(escalators)), []

    def race(esc: Escalator) -> None:
        gate.wait()
        fired.extend(esc.fire_due())

    threads = [threading.Thread(target=race, args=(e,)) for e in escalators]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [e.escalation_tier for e in fired] == [2]
    assert len(tier_updates(r, keys, 2)) == 1 and sum(d.tier == 2 for d in outbox(r, keys)) == 1
    for c in clients:
        c.close()


def test_every_tier_is_delivered_even_to_a_channel_of_an_earlier_tier_within_its_cooldown(redis_url, r, keys, clock):
    with WebhookReceiver() as hook:
        tiers = [{"name": "carers", "after_s": 0, "urls": [hook.url()]},
                 {"name": "everyone", "after_s": 60, "urls": [hook.url()]}]
        cfg = Settings(redis={"url": redis_url}, alerts={"escalation": tiers},
                       notifications={"cooldown_s": 3600},  # holds back repeats, never an escalation
                       cameras=[{"id": "room12", "name": "Room 12", "url": "rtsp://cam.local/12"}])
        svc = AlertsService(cfg, r, keys, name="a", clock=clock)
        notifier = Notifier(cfg, r, keys, "n")
        start_fall(svc, r, keys)
        notifier.step()
        clock.advance(61)
        svc.step()
        notifier.step()
        notifier.step()
        assert wait_for(lambda: hook.count() == 2, 10)
    bodies = [m.get("message", "") for m in hook.received]
    assert "Tier 1 of 2 (carers)" in bodies[0] and "Tier 2 of 2 (everyone): open for 1 min 1 s" in bodies[1]


def test_without_tiers_a_fall_is_tier_1_of_1_to_the_usual_urls(redis_url, r, keys, clock):
    cfg = make_settings(redis_url, tiers=[])
    start = start_fall(AlertsService(cfg, r, keys, name="a", clock=clock), r, keys)
    assert (start.escalation_tier, start.escalation_tiers, start.next_escalation_at) == (1, 1, None)
    assert [d.channel for d in outbox(r, keys)] == [channel_id("json://127.0.0.1:9/desk")]
    assert r.zcard(keys.escalations()) == 0


# --- latching and resolve ---------------------------------------------------------------------


def test_event_stays_open_when_no_longer_seen_and_closes_only_on_resolve(cfg, r, keys, clock):
    svc = AlertsService(cfg, r, keys, name="a", clock=clock)
    sub = r.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(keys.alerts_channel())
    start = start_fall(svc, r, keys)
    plant(r, keys.verdicts_stream(), *(edge_verdict(f"room12:{i}", T0 + i, 0.05) for i in range(2, 8)))
    svc.step()
    clock.advance(20)
    svc.step()
    [unseen] = [e for e in alert_events(r, keys) if e.still_seen is False]
    assert (unseen.type, unseen.seen_until) == (EventType.UPDATE, T0 + 1)
    assert r.hget(keys.event(start.event_id), "active") == b"1"
    clock.advance(86400)
    svc.step()
    assert all(e.type is not EventType.END for e in alert_events(r, keys))
    end = resolve(r, keys, start.event_id, "nurse-ann", EventOutcome.FALSE_ALARM, maxlen=1000,
                  note="resting on the floor mat", source="web", cooldown_s=60, clock=clock)
    assert (end.type, end.outcome, end.outcome_note, end.resolved_by) == (
        EventType.END, EventOutcome.FALSE_ALARM, "resting on the floor mat", "nurse-ann")
    assert end.resolved_at == clock.t and end.acknowledged and end.ack_source == "web"
    assert r.hget(keys.event(start.event_id), "active") == b"0"
    assert r.smembers(keys.alert_cameras()) == set() and r.zcard(keys.escalations()) == 0
    got = []
    assert wait_for(lambda: got.extend(m for m in iter(lambda: sub.get_message(timeout=0.05), None)) or
                    any(AlertEvent.from_json(m["data"]) == end for m in got), 5)
    sub.close()
    with pytest.raises(BadTransition):
        resolve(r, keys, start.event_id, "x", "not_sure", maxlen=1000)
    with pytest.raises(EventNotFound):
        resolve(r, keys, "no-such-event", "x", "not_sure", maxlen=1000)
    # within the cooldown after the resolve nothing starts; after it a new event does
    plant(r, keys.verdicts_stream(), *(edge_verdict(f"room12:{i}", clock.t + i, 0.9) for i in (10, 11)))
    assert svc.step().events == ()
    plant(r, keys.verdicts_stream(), *(edge_verdict(f"room12:{i}", clock.t + i, 0.9) for i in (70, 71)))
    assert [e.type for e in svc.step().events] == [EventType.START]


def test_resolving_a_camera_offline_event_and_offline_events_still_end_by_themselves(cfg, r, keys, clock):
    svc = AlertsService(cfg, r, keys, name="a", clock=clock)
    plant(r, keys.camera_status_stream(), CameraStatus(camera_id="room12", state=CameraState.OFFLINE, at=T0))
    [off] = svc.step().events
    assert off.escalation_tier == 0 and r.zcard(keys.escalations()) == 0  # offline events do not escalate
    plant(r, keys.camera_status_stream(), CameraStatus(camera_id="room12", state=CameraState.ONLINE, at=T0 + 5))
    assert [e.type for e in svc.step().events] == [EventType.END]
    plant(r, keys.camera_status_stream(), CameraStatus(camera_id="room12", state=CameraState.OFFLINE, at=T0 + 9))
    [again] = svc.step().events
    with pytest.raises(BadTransition, match="only fall events take an outcome"):
        resolve(r, keys, again.event_id, "tech", "not_sure", maxlen=1000, clock=clock)
    plant(r, keys.camera_status_stream(), CameraStatus(camera_id="room12", state=CameraState.ONLINE, at=T0 + 12))
    assert [e.type for e in svc.step().events] == [EventType.END] and r.smembers(keys.alert_cameras()) == set()


def test_resolve_command_and_status(cfg, r, keys, clock, redis_url):
    from alerts.cli import register
    from fallwatch.cli import app

    if "alerts" not in {g.name for g in app.registered_groups}:
        register(app)
    svc = AlertsService(cfg, r, keys, name="a", clock=clock)
    start = start_fall(svc, r, keys, at=time.time())
    snap = gather(r, cfg, 5)
    row = snap.events[0]
    assert (row.escalation_tier, row.escalation_tiers, row.still_seen) == (1, 3, True)
    assert snap.escalations_pending == 1
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render(snap))
    text = console.export_text()
    assert re.search(r"1/3, next in 1[12]\ds", text) and "1 escalations pending" in text
    env = {"FALLWATCH_REDIS__URL": redis_url}
    res = CliRunner().invoke(app, ["alerts", "resolve", start.event_id, "--outcome", "confirmed_fall",
                                   "--by", "night shift", "--note", "helped up"], env=env)
    assert res.exit_code == 0, res.output
    assert "resolved confirmed_fall by night shift" in res.output
    assert load_event(r, keys, start.event_id).outcome is EventOutcome.CONFIRMED_FALL
    assert gather(r, cfg, 5).events[0].outcome == "confirmed_fall"
    for args, message in (([start.event_id, "--outcome", "not_sure"], "already resolved as confirmed_fall"),
                          (["nope", "--outcome", "not_sure"], "no alert event 'nope'"),
                          ([start.event_id, "--outcome", "maybe"], "maybe")):
        bad = CliRunner().invoke(app, ["alerts", "resolve", *args], env=env)
        assert bad.exit_code == 2 and message in bad.output, bad.output


# --- a real alerts process killed while a tier is due -------------------------------------------


def alerts_process(config, name: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fallwatch", "--config", str(config), "alerts", "--name", name,
                             "--no-notify"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_alerts_killed_while_a_tier_is_due_fires_it_once_after_restart(redis_url, r, keys, tmp_path):
    config = tmp_path / "fallwatch.yaml"
    tiers = [{"name": "carers", "after_s": 0, "urls": [ROOM_URL]}, {"name": "shift lead", "after_s": 12, "urls": [LEAD_URL]}]
    config.write_text(yaml.safe_dump({"alerts": {"escalation": tiers, "quiet_s": 300},
                                      "metrics": {"enabled": False, "heartbeat_s": 0.5},
                                      "cameras": [{"id": "room12", "url": "rtsp://cam.local/12"}]}))
    env = {**os.environ, "FALLWATCH_REDIS__URL": redis_url, "FALLWATCH_LOGGING__FORMAT": "json"}
    first = alerts_process(config, "alerts-1", env)
    procs = [first]
    try:
        assert wait_for(lambda: r.exists(keys.heartbeat("alerts", "alerts-1")), 60), first.stderr
        t_fall = time.time()
        plant(r, keys.verdicts_stream(), edge_verdict("room12:0", t_fall, 0.9), edge_verdict("room12:1", t_fall, 0.9))
        assert wait_for(lambda: any(e.type is EventType.START for e in alert_events(r, keys)), 30)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert tier_updates(r, keys, 2) == []  # killed before the tier was due
        [(_, due)] = r.zrange(keys.escalations(), 0, -1, withscores=True)
        assert due == pytest.approx(t_fall + 12)
        assert wait_for(lambda: time.time() > due + 0.5, 30)
        assert tier_updates(r, keys, 2) == []  # nobody running: due but not fired, and not lost
        procs += [alerts_process(config, f"alerts-{i}", env) for i in (2, 3)]  # the restart, twice over
        assert wait_for(lambda: tier_updates(r, keys, 2), 60), procs[1].stderr
        assert wait_for(lambda: all(r.exists(keys.heartbeat("alerts", f"alerts-{i}")) for i in (2, 3)), 60)
        assert r.zcard(keys.escalations()) == 0  # the last tier: nothing left that could repeat it
        assert len(tier_updates(r, keys, 2)) == 1
        assert [d.channel for d in outbox(r, keys) if d.tier == 2] == [channel_id(LEAD_URL)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()

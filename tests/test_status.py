"""fallwatch.status: a snapshot of a real Redis filled the way the roles fill it."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from typer.testing import CliRunner

from fallwatch.cli import app
from fallwatch.keys import Keys
from fallwatch.redis import EmbeddedRedis
from fallwatch.schemas import AlertEvent, Decider, EventKind, EventType, FrameMessage, encode
from fallwatch.settings import Settings
from fallwatch.status import gather, render

NOW = 1_800_000_000.0


def frame_fields(camera: str, seq: int) -> dict[bytes, bytes]:
    msg = FrameMessage.make(camera, seq, captured_at=NOW, width=4, height=4)
    return encode(msg, [b"\xff\xd8jpeg\xff\xd9"])


def fill(r: redis.Redis, keys: Keys, settings: Settings, now: float = NOW) -> None:
    """Cameras, streams with groups, an RQ queue with a failed job, heartbeats, events and stats."""
    r.hset(keys.camera_info("cam1"), mapping={"state": "online", "name": "Room 12", "fps": 25.0, "sample_fps": 2.0,
                                              "last_frame_at": now - 3, "reason": ""})
    r.hset(keys.camera_info("cam2"), mapping={"state": "offline", "name": "cam2", "fps": "",
                                              "reason": "no frame for 5 s", "last_frame_at": now - 600})
    r.hset(keys.camera_info("cam3"), mapping={"state": "online", "name": "Hall", "last_frame_at": now - 3600})
    frames = keys.frames_stream()
    for i in range(5):
        r.xadd(frames, frame_fields("cam1", i))
    r.xgroup_create(frames, keys.edge_group(), id="0")
    got = r.xreadgroup(keys.edge_group(), "edge-a", {frames: ">"}, count=3)
    r.xack(frames, keys.edge_group(), got[0][1][0][0])  # 3 delivered, 1 acked: 2 pending, 2 undelivered
    for i, (etype, ack) in enumerate([(EventType.START, False), (EventType.UPDATE, True)]):
        ev = AlertEvent(event_id="ev1", type=etype, kind=EventKind.FALL, camera_id="cam1", camera_name="Room 12",
                        started_at=now - 10, at=now - 10 + i, confidence=0.93, decided_by=Decider.CLOUD,
                        acknowledged=ack, acknowledged_by="nurse" if ack else None)
        r.xadd(keys.alerts_stream(), encode(ev))
    r.xadd(keys.alerts_stream(), {b"t": b"alert", b"v": b"1", b"m": b"{not json"})
    r.xadd(keys.dead_letter_stream(), {b"t": b"x"})
    r.hset(keys.stats(), mapping={"finals": 40, "offloaded": 10, "by:edge": 30, "by:cloud": 9, "by:edge_timeout": 1})
    r.set(keys.heartbeat("edge", "edge-a"), str(now - 1), ex=15)
    r.set(keys.metrics_endpoint("edge", "edge-a"), "box1:9108", ex=15)
    r.set(keys.heartbeat("alerts", "al-1"), str(now - 2), ex=15)
    q = Queue(keys.cloud_queue(settings.cloud.queue), connection=r, serializer=JSONSerializer)
    failed = Job.create("json.loads", args=("{broken",), connection=r, serializer=JSONSerializer, origin=q.name)
    failed.save()
    q.failed_job_registry.add(failed, exc_string="JSONDecodeError")
    for i in range(3):
        q.enqueue("json.loads", "[]")


@pytest.fixture
def snap(r, keys, settings):
    fill(r, keys, settings)
    return gather(r, settings, events=5, now=NOW)


def test_cameras(snap):
    cams = {c.id: c for c in snap.cameras}
    assert list(cams) == ["cam1", "cam2", "cam3"]
    assert cams["cam1"].online and not cams["cam1"].stale and cams["cam1"].name == "Room 12"
    assert cams["cam1"].fps == 25.0 and cams["cam1"].sample_fps == 2.0
    assert cams["cam1"].last_frame_age_s == pytest.approx(3)
    assert not cams["cam2"].online and cams["cam2"].state == "offline" and cams["cam2"].reason == "no frame for 5 s"
    assert cams["cam2"].fps is None
    assert cams["cam3"].stale and not cams["cam3"].online  # says online, but silent for an hour


def test_configured_camera_never_seen_is_listed(r, keys, redis_url, tmp_path):
    settings = Settings(redis={"url": redis_url}, cameras=[{"id": "lobby", "name": "Lobby", "url": "/dev/null"}])
    snap = gather(r, settings, now=NOW)
    assert [(c.id, c.name, c.state, c.configured, c.online) for c in snap.cameras] == \
        [("lobby", "Lobby", "unknown", True, False)]


def test_streams_groups_and_pending(snap, keys):
    streams = {s.name: s for s in snap.streams}
    assert streams["frames"].key == keys.frames_stream() and streams["frames"].length == 5
    (group,) = streams["frames"].groups
    assert (group.name, group.consumers, group.pending) == ("edge", 1, 2)
    if snap.redis.version >= "7":
        assert group.lag == 2
    else:
        assert group.lag is None  # Redis 6.2 does not report lag for a group behind the stream
    assert streams["alerts"].length == 3 and streams["alerts"].groups == []
    assert streams["dead-letter"].length == 1
    assert streams["verdicts"].length == 0 and streams["final"].length == 0


def test_queue_workers_events_scoring(snap):
    assert snap.queue.name.endswith("-cloud")
    assert (snap.queue.depth, snap.queue.failed, snap.queue.started, snap.queue.workers) == (3, 1, 0, 0)
    workers = {(w.role, w.name): w for w in snap.workers}
    assert set(workers) == {("edge", "edge-a"), ("alerts", "al-1")}
    assert workers[("edge", "edge-a")].metrics == "box1:9108"
    assert workers[("edge", "edge-a")].last_beat_at == NOW - 1
    assert 0 < workers[("alerts", "al-1")].ttl_s <= 15 and workers[("alerts", "al-1")].metrics is None
    assert [(e.type, e.acknowledged) for e in snap.events] == [("update", True), ("start", False)]  # newest first
    assert snap.events[0].camera_name == "Room 12" and snap.events[0].decided_by == "cloud"
    assert len(snap.problems) == 1 and "alerts entry" in snap.problems[0]
    assert snap.scoring.finals == 40 and snap.scoring.offload_rate == pytest.approx(0.25)
    assert snap.scoring.by_decider == {"cloud": 9, "edge": 30, "edge_timeout": 1}


def test_gather_writes_nothing(r, keys, settings):
    fill(r, keys, settings)
    before = {k: r.type(k) for k in r.scan_iter(count=1000)}
    dump = {k: r.dump(k) for k in before}
    gather(r, settings, now=NOW)
    assert {k: r.type(k) for k in r.scan_iter(count=1000)} == before
    assert all(r.dump(k) == v for k, v in dump.items())


def test_empty_redis(r, settings):
    snap = gather(r, settings, now=NOW)
    assert snap.cameras == [] and snap.workers == [] and snap.events == []
    assert all(s.length == 0 for s in snap.streams)
    assert snap.scoring.offload_rate is None and snap.queue.depth == 0


def test_cli_json_and_tables(r, keys, settings, redis_url, monkeypatch):
    fill(r, keys, settings, now=time.time())
    monkeypatch.setenv("FALLWATCH_REDIS__URL", redis_url)
    monkeypatch.delenv("FALLWATCH_CONFIG", raising=False)
    runner = CliRunner()
    res = runner.invoke(app, ["status", "--json", "--events", "2"])  # the newest entry is unreadable
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert [c["id"] for c in data["cameras"]] == ["cam1", "cam2", "cam3"]
    assert data["queue"]["depth"] == 3 and len(data["events"]) == 1 and len(data["problems"]) == 1
    assert data["scoring"]["offload_rate"] == pytest.approx(0.25)
    monkeypatch.setenv("COLUMNS", "200")  # rich sizes tables from it; narrower would wrap cells
    res = runner.invoke(app, ["status", "--once"])
    assert res.exit_code == 0, res.output
    for text in ("Room 12", "online (stale)", "no frame for 5 s", "box1:9108", "3 waiting", "1 failed", "25.0%"):
        assert text in res.output


def test_cli_reports_unreachable_redis(monkeypatch, tmp_path):
    monkeypatch.setenv("FALLWATCH_REDIS__URL", f"unix://{tmp_path}/none.sock")
    monkeypatch.setenv("FALLWATCH_REDIS__RETRY_ATTEMPTS", "0")
    res = CliRunner().invoke(app, ["status", "--json"])
    assert res.exit_code == 2 and "cannot reach Redis at" in res.output and len(res.output.splitlines()) == 1


def test_render_has_every_section(snap):
    from rich.console import Console

    console = Console(width=160, record=True)
    console.print(render(snap))
    text = console.export_text()
    for title in ("Cameras", "Streams", "Workers and queue", "Recent events", "Hall"):
        assert title in text


@pytest.mark.skipif(not Path("/usr/bin/redis-server").exists(), reason="needs Debian's redis-server 7 for lag")
def test_lag_on_redis_7(settings):
    data_dir = Path(tempfile.mkdtemp(prefix="fw-r7-"))
    server = EmbeddedRedis(data_dir, appendonly=False, executable="/usr/bin/redis-server").start()
    try:
        client = redis.Redis.from_url(server.url)
        keys = Keys(settings.redis.key_prefix)
        frames = keys.frames_stream()
        for i in range(6):
            client.xadd(frames, frame_fields("cam1", i))
        client.xgroup_create(frames, keys.edge_group(), id="0")
        client.xreadgroup(keys.edge_group(), "edge-a", {frames: ">"}, count=4)
        snap = gather(client, settings, now=time.time())
        if not snap.redis.version.startswith(("7", "8")):
            pytest.skip(f"/usr/bin/redis-server is {snap.redis.version}")
        (group,) = next(s for s in snap.streams if s.name == "frames").groups
        assert (group.pending, group.lag) == (4, 2)
        client.close()
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_out_of_memory_is_a_problem_line_with_the_frames_dropped():
    from fallwatch.status import CameraRow, RedisInfo, memory_problem

    cam = CameraRow(id="hall", name="Hall", configured=True, state="online", online=True, stale=False, dropped_oom=7)
    full = RedisInfo(version="7.0", used_memory_bytes=16 * 2**20, connected_clients=3, maxmemory_bytes=16 * 2**20,
                     maxmemory_policy="noeviction", out_of_memory=True)
    [line] = memory_problem(full, [cam])
    assert line.startswith("Redis out of memory: 16.0 MiB used of maxmemory 16.0 MiB") and "(7 counted so far)" in line
    assert memory_problem(full.model_copy(update={"out_of_memory": False}), [cam]) == []

"""Nothing lost, nobody in: faults injected into real ``python -m fallwatch ROLE`` processes.

Each test runs the roles it needs against a private redis-server (AOF everysec), injects one
fault (SIGKILL of a worker, a Redis crash, a notifier outage, poison input, overload, a camera
that stalls) and then counts: frames in against final verdicts out, lost, duplicates,
dead-lettered, dropped by design, time to recover. The figures go to $FALLWATCH_FAULT_REPORT
(see tests/faults.py and docs/reliability.md).
"""

from __future__ import annotations

import re
import shutil
import signal
import time
from collections.abc import Iterator

import pytest
import redis
from rq import Queue
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from alerts.notify import channel_id, notifies
from tests.helpers import edge_verdict, free_port, plant, wait_for
from fallwatch.offload import OFFLOAD_JOB
from fallwatch.keys import Keys
from fallwatch.redis import EmbeddedRedis
from fallwatch.schemas import CameraState, CameraStatus, Decider, EventKind, EventType, FrameMessage, encode
from fallwatch.webhook import WebhookReceiver
from tests.faults import (FaultFigures, Roles, StallingCamera, Tally, Tripwire, beat_again, dead_letters, events,
                          finals, frame_ids_in, mpegts_clip, nothing_owed, private_redis, record, restart,
                          upstream_repeats, wait_new_final, wait_up)
from tests.frames import frame_entry, jpeg, push_frames
from tests.ingest_media import write_mp4, write_yolo
from tests.test_edge_worker import _bomb

pytestmark = [pytest.mark.fault, pytest.mark.slow]

KEYS = Keys()


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    srv = private_redis()
    yield srv
    srv.stop()
    shutil.rmtree(srv.data_dir, ignore_errors=True)


@pytest.fixture
def client(server: EmbeddedRedis) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(server.url, socket_timeout=10)
    yield c
    c.close()


def consumer_pending(client: redis.Redis, consumer: str) -> int:
    rows = client.xpending_range(KEYS.frames_stream(), KEYS.edge_group(), "-", "+", 1000, consumername=consumer)
    return len(rows)


def all_decided(client: redis.Redis, sent: list[str]) -> bool:
    return {v.frame_id for v in finals(client, KEYS)} >= set(sent)


def assert_clean_exit(codes: dict[str, int], roles: Roles, killed: tuple[str, ...] = ()) -> None:
    bad = {name: code for name, code in codes.items() if name not in killed and code != 0}
    assert not bad, f"roles did not stop cleanly: {bad}\n{roles.logs()}"


# --- 1. an edge worker SIGKILLed mid-batch -----------------------------------------------------------


def pause_while_holding(client: redis.Redis, role, consumer: str, timeout: float = 60.0) -> int:
    """SIGSTOP the worker at a moment it holds read-but-unacknowledged entries; how many it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if consumer_pending(client, consumer):
            role.signal(signal.SIGSTOP)
            held = consumer_pending(client, consumer)
            if held:
                return held
            role.signal(signal.SIGCONT)
        time.sleep(0.002)
    raise AssertionError(f"{consumer} never held pending entries within {timeout}s")


def test_edge_worker_killed_mid_batch(server, client, tmp_path) -> None:
    started = time.monotonic()
    with Roles(server.url, tmp_path, edge__claim_idle_ms=1000, edge__batch_size=8) as roles:
        roles.start("edge-a", "edge", "--name", "edge-a")
        roles.start("edge-b", "edge", "--name", "edge-b")
        roles.start("alerts", "alerts", "--name", "alerts-1", "--no-notify")
        wait_up(client, KEYS, roles, ("edge", "edge-a"), ("edge", "edge-b"), ("alerts", "alerts-1"))
        sent = push_frames(client, KEYS, 160, camera="cam1", size=(320, 240))
        held = pause_while_holding(client, roles["edge-a"], "edge-a")
        roles["edge-a"].kill()
        killed_at = time.monotonic()
        assert wait_for(lambda: consumer_pending(client, "edge-a") == 0, 60), roles.logs()
        recover_s = time.monotonic() - killed_at
        assert wait_for(lambda: all_decided(client, sent), 90), roles.logs()
        time.sleep(1.0)  # room for a late duplicate to show up
        codes = roles.stop_all()
    got = finals(client, KEYS)
    tally = Tally.of(sent, got)
    repeats = upstream_repeats(client, KEYS)
    record(FaultFigures(
        fault="1. edge worker SIGKILLed mid-batch", unit="frames", items_in=tally.frames_in,
        delivered=tally.final_verdicts, lost=len(tally.lost), duplicates=tally.duplicates, deduplicated=repeats,
        dead_lettered=len(dead_letters(client, KEYS)), recover_s=recover_s, test_s=time.monotonic() - started,
        notes=f"{held} entries held by the killed worker, claimed by the other after claim_idle_ms=1000"))
    assert tally.lost == () and tally.duplicates == 0 and tally.unexpected == ()
    assert client.xpending(KEYS.frames_stream(), KEYS.edge_group())["pending"] == 0
    assert_clean_exit(codes, roles, killed=("edge-a",))
    assert "edge_worker_stopped" in roles["edge-b"].output()


# --- 2. a cloud worker SIGKILLed mid-job -------------------------------------------------------------


def cloud_queue(client: redis.Redis, name: str | None = None) -> Queue:
    return Queue(name or KEYS.cloud_queue(), connection=client, serializer=JSONSerializer)


def pause_mid_job(client: redis.Redis, role, worker: str, timeout: float = 60.0) -> tuple[str, str]:
    """SIGSTOP the cloud worker while it runs a job (on any offload queue); that job's id and queue."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in KEYS.offload_queues():
            started = StartedJobRegistry(name, connection=client, serializer=JSONSerializer)
            for job in cloud_queue(client, name).job_class.fetch_many(started.get_job_ids(), connection=client,
                                                                      serializer=JSONSerializer):
                if job is not None and job.worker_name == worker:
                    role.signal(signal.SIGSTOP)
                    if job.get_status(refresh=True) == "started":
                        return job.id, name
                    role.signal(signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError(f"{worker} never ran a job within {timeout}s")


def test_cloud_worker_killed_mid_job(server, client, tmp_path) -> None:
    started = time.monotonic()
    timeout_s = 8.0
    settings = dict(switcher__offload_all=True, cloud__batch_size=8, alerts__cloud_timeout_s=timeout_s)
    with Roles(server.url, tmp_path, **settings) as roles:
        roles.start("edge", "edge", "--name", "edge-1")
        roles.start("cloud-a", "cloud", "--name", "cloud-a")
        roles.start("cloud-b", "cloud", "--name", "cloud-b")
        roles.start("alerts", "alerts", "--name", "alerts-1", "--no-notify")
        wait_up(client, KEYS, roles, ("edge", "edge-1"), ("cloud", "cloud-a"), ("cloud", "cloud-b"),
                ("alerts", "alerts-1"))
        sent = push_frames(client, KEYS, 48, camera="cam2", size=(320, 240))
        job_id, queue_name = pause_mid_job(client, roles["cloud-a"], "cloud-a")
        roles["cloud-a"].kill()
        killed_at = time.monotonic()
        assert wait_for(lambda: all_decided(client, sent), 60), roles.logs()
        recover_s = time.monotonic() - killed_at
        job = cloud_queue(client, queue_name).fetch_job(job_id)
        orphaned = [r["frame_id"] for r in job.args[0]]
        assert job.get_status() == "started"  # RQ does not know yet: the worker's heartbeat has not expired
        # RQ's maintenance would find the job abandoned once its heartbeat TTL (job timeout + 60 s) is over:
        StartedJobRegistry(queue_name, connection=client, serializer=JSONSerializer).cleanup(
            timestamp=time.time() + 600)
        assert wait_for(lambda: job.get_status(refresh=True) == "finished", 60), roles.logs()  # retried by cloud-b
        # ... and cloud-b, given the retry after the deadline, does not spend the model on it
        assert job.latest_result().return_value == {"scored": 0, "failed": 0, "expired": len(orphaned)}
        time.sleep(1.0)
        codes = roles.stop_all()
    got = finals(client, KEYS)
    tally = Tally.of(sent, got)
    by_frame = {v.frame_id: v for v in got}
    record(FaultFigures(
        fault="2. cloud worker SIGKILLed mid-job", unit="frames", items_in=tally.frames_in,
        delivered=tally.final_verdicts, lost=len(tally.lost), duplicates=tally.duplicates,
        deduplicated=upstream_repeats(client, KEYS), dead_lettered=len(dead_letters(client, KEYS)),
        recover_s=recover_s, test_s=time.monotonic() - started,
        notes=f"the killed job's {len(orphaned)} frames fell back to the edge verdict at cloud_timeout_s="
              f"{timeout_s:g}; RQ's abandoned-job retry came after the deadline and was skipped"))
    assert tally.lost == () and tally.duplicates == 0 and tally.unexpected == ()
    assert {by_frame[f].decided_by for f in orphaned} == {Decider.EDGE_TIMEOUT}
    assert all(by_frame[f].decided_at - by_frame[f].captured_at >= timeout_s for f in orphaned)
    # the others: the cloud, a timeout, or kept on the edge at once when the one live worker was too far behind
    assert ({v.decided_by for f, v in by_frame.items() if f not in orphaned}
            <= {Decider.CLOUD, Decider.EDGE_TIMEOUT, Decider.EDGE_SHED})
    assert_clean_exit(codes, roles, killed=("cloud-a",))


# --- 3. Redis crashes and restarts mid-stream -------------------------------------------------------


def event_keys(client: redis.Redis) -> set[tuple[str, str]]:
    return {(e.event_id, e.type.value) for e in events(client, KEYS)}


def test_redis_killed_and_restarted_mid_stream(server, client, tmp_path) -> None:
    started = time.monotonic()
    write_yolo(tmp_path / "ds", "valid", [0, 1, None, 1, 0, 1, 1, None])
    with WebhookReceiver() as hook:
        settings = dict(switcher__offload_all=True, cloud__batch_size=4, alerts__cloud_timeout_s=10,
                        alerts__debounce_k=1, alerts__debounce_n=1, alerts__cooldown_s=0, alerts__quiet_s=2,
                        notifications__urls=[hook.url()], notifications__retry_base_s=0.2,
                        notifications__retry_cap_s=1.0, alerts__offline_grace_s=0)
        with Roles(server.url, tmp_path, **settings) as roles:
            roles.start("edge", "edge", "--name", "edge-1")
            roles.start("cloud", "cloud", "--name", "cloud-1")
            roles.start("alerts", "alerts", "--name", "alerts-1")
            wait_up(client, KEYS, roles, ("edge", "edge-1"), ("cloud", "cloud-1"), ("alerts", "alerts-1"))
            roles.start("replay", "replay", "--dataset", str(tmp_path / "ds"), "--loop", "--fps", "4",
                        "--camera-id", "cam3")
            assert wait_for(lambda: len(finals(client, KEYS)) >= 8, 60), roles.logs()
            plant(client, KEYS.camera_status_stream(), CameraStatus(camera_id="cam9", state=CameraState.OFFLINE))
            assert wait_for(lambda: hook.count() >= 2, 30), roles.logs()  # the fall and the camera offline
            before_finals = {v.frame_id for v in finals(client, KEYS)}
            before_events = event_keys(client)
            time.sleep(1.5)  # older than one AOF fsync period
            restart(server, signal.SIGKILL, down_s=2.0)
            restarted, restarted_wall = time.monotonic(), time.time()
            kept_finals = {v.frame_id for v in finals(client, KEYS)}
            kept_events = event_keys(client)
            recover_s = wait_new_final(client, KEYS, roles, restarted_wall) - restarted
            beat_again(client, KEYS, roles, ("edge", "edge-1"), ("cloud", "cloud-1"), ("alerts", "alerts-1"))
            n_after = client.xlen(KEYS.frames_stream())
            assert wait_for(lambda: client.xlen(KEYS.frames_stream()) >= n_after + 8, 60), roles.logs()
            assert roles["replay"].stop() == 0, roles.logs()
            sent = frame_ids_in(client, KEYS)
            assert wait_for(lambda: all_decided(client, sent) and nothing_owed(client, KEYS), 60), roles.logs()
            time.sleep(0.5)  # room for a late repeat
            codes = roles.stop_all()
        notified = hook.count()
    replayed = int(re.search(r"replayed (\d+) items", roles["replay"].output()).group(1))
    got = finals(client, KEYS)
    tally = Tally.of(sent, got)
    owed = [e for e in events(client, KEYS) if notifies(e)]
    record(FaultFigures(
        fault="3. Redis SIGKILLed mid-stream, restarted 2 s later (AOF everysec)", unit="frames",
        items_in=tally.frames_in, delivered=tally.final_verdicts, lost=len(tally.lost), duplicates=tally.duplicates,
        deduplicated=upstream_repeats(client, KEYS) + len(sent) - tally.frames_in,
        dead_lettered=len(dead_letters(client, KEYS)), dropped_by_design=replayed - tally.frames_in,
        recover_s=recover_s, test_s=time.monotonic() - started,
        notes=f"{len(before_finals)} final verdicts and {len(before_events)} alert events older than 1 s all kept; "
              f"replay sent {replayed}; every role reconnected; {notified} notifications for {len(owed)} events"))
    assert before_finals <= kept_finals and before_events <= kept_events
    assert tally.lost == () and tally.duplicates == 0 and tally.unexpected == ()
    assert replayed == tally.frames_in  # nothing the replay was told was written went missing
    assert notified == len(owed) == 2     # one notification per event: none lost, none repeated
    assert_clean_exit(codes, roles)


# --- 5. poison input ------------------------------------------------------------------------------


def test_poison_input_is_dead_lettered_and_workers_carry_on(server, client, tmp_path) -> None:
    started = time.monotonic()
    settings = dict(switcher__offload_all=True, cloud__batch_size=4, edge__max_image_bytes=100_000,
                    edge__max_image_pixels=1_000_000)
    tripwire = tmp_path / "unpickled"
    queue = cloud_queue(client)
    Queue(queue.name, connection=client).enqueue(OFFLOAD_JOB, [Tripwire(tripwire)])  # pickle: must never load
    garbage = queue.enqueue(OFFLOAD_JOB, [{}])
    client.hset(garbage.key, "data", b"\x80\x05garbage")
    stream = KEYS.frames_stream()
    good = frame_entry("cam5", 1)
    client.xadd(stream, {**good, b"p0": b"\xff\xd8\xff\xe0 this is not a jpeg"})          # corrupt JPEG
    client.xadd(stream, {b"junk": b"\x00\x01"})                                            # garbage entry
    client.xadd(stream, {b"t": b"frame", b"v": b"1", b"m": b"{\"frame_id\": "})            # truncated JSON
    client.xadd(stream, {**good, b"v": b"9"})                                              # wrong version
    big = FrameMessage.make("cam5", 2, captured_at=time.time(), width=600, height=600)
    client.xadd(stream, encode(big, [jpeg(600, 600, seed=5, quality=95)]))                 # oversized bytes
    bomb = FrameMessage.make("cam5", 3, captured_at=time.time(), width=96, height=80)
    client.xadd(stream, encode(bomb, [_bomb()]))                                           # decompression bomb
    sent = push_frames(client, KEYS, 12, camera="cam5", start=10)
    with Roles(server.url, tmp_path, **settings) as roles:
        edge = roles.start("edge", "edge", "--name", "edge-1")
        cloud = roles.start("cloud", "cloud", "--name", "cloud-1")
        roles.start("alerts", "alerts", "--name", "alerts-1", "--no-notify")
        assert wait_for(lambda: all_decided(client, sent), 90), roles.logs()
        pids = (edge.pid, cloud.pid)
        assert edge.alive and cloud.alive
        time.sleep(0.5)
        codes = roles.stop_all()
    got = finals(client, KEYS)
    tally = Tally.of(sent, got)
    letters = dead_letters(client, KEYS)
    reasons = sorted(d.reason for d in letters)
    record(FaultFigures(
        fault="5. poison input (bad JPEG, garbage/truncated entries, wrong version, oversized, bomb, "
              "pickled and garbage RQ jobs)", unit="frames", items_in=tally.frames_in,
        delivered=tally.final_verdicts, lost=len(tally.lost), duplicates=tally.duplicates,
        dead_lettered=len(letters), test_s=time.monotonic() - started,
        notes="6 poison frames and 2 poison jobs dead-lettered with a reason; nothing unpickled; "
              "the same edge and cloud processes scored every good frame"))
    assert reasons == ["bad_image", "bad_job", "bad_job", "bad_message", "bad_message", "bad_message",
                       "oversized", "oversized"], letters
    assert not tripwire.exists()
    assert tally.lost == () and tally.duplicates == 0
    assert {v.decided_by for v in got if v.frame_id in sent} == {Decider.CLOUD}  # the cloud carried on
    assert (edge.pid, cloud.pid) == pids
    assert_clean_exit(codes, roles)


# --- 6. backpressure: ingest faster than the edge ----------------------------------------------------


def counter(client: redis.Redis, name: str) -> int:
    return int(client.get(KEYS.counter(name)) or 0)


def accounted(client: redis.Redis) -> dict[str, int]:
    """Where the camera's frames went: final verdicts, or trimmed unread, or trimmed while pending."""
    out = {"final": len({v.frame_id for v in finals(client, KEYS)}), "trimmed": counter(client, "ingest:hall:trimmed"),
           "trimmed_pending": counter(client, "frames_trimmed_pending")}
    return {**out, "total": sum(out.values()), "in_stream": client.xlen(KEYS.frames_stream()),
            "pending": client.xpending(KEYS.frames_stream(), KEYS.edge_group())["pending"]}


def test_overload_drops_oldest_frames_and_counts_every_one(tmp_path) -> None:
    started = time.monotonic()
    server = private_redis()
    client = redis.Redis.from_url(server.url, socket_timeout=10)
    video = write_mp4(tmp_path / "hall.mp4", frames=600, fps=20, bframes=False)
    settings = dict(cameras=[{"id": "hall", "url": str(video)}], ingest__fps=20, ingest__stream_maxlen=20,
                    edge__claim_idle_ms=1000, edge__batch_size=4)
    try:
        with Roles(server.url, tmp_path, **settings) as roles:
            roles.start("edge-a", "edge", "--name", "edge-a")
            roles.start("edge-b", "edge", "--name", "edge-b")
            roles.start("alerts", "alerts", "--name", "alerts-1", "--no-notify")
            wait_up(client, KEYS, roles, ("edge", "edge-a"), ("edge", "edge-b"), ("alerts", "alerts-1"))
            roles.start("ingest", "ingest")
            assert wait_for(lambda: len(finals(client, KEYS)) >= 20, 60), roles.logs()
            pause_while_holding(client, roles["edge-a"], "edge-a")          # the edge stops keeping up ...
            roles["edge-b"].signal(signal.SIGSTOP)
            time.sleep(4.0)                                                 # ... while ingest goes on at 20 fps
            roles["edge-a"].kill()
            # What the killed worker holds, counted once its connection is gone: a stopped client's blocked
            # read is still served by the server, so a count taken at SIGSTOP can be a batch short.
            held = consumer_pending(client, "edge-a")
            roles["edge-b"].signal(signal.SIGCONT)
            resumed = time.monotonic()
            assert wait_for(lambda: counter(client, "frames_trimmed_pending") >= held, 30), roles.logs()
            recover_s = time.monotonic() - resumed
            time.sleep(1.0)
            assert roles["ingest"].stop() == 0, roles.logs()
            items = counter(client, "ingest:hall:items")
            assert wait_for(lambda: accounted(client)["total"] >= items, 60), (items, accounted(client), roles.logs())
            time.sleep(1.0)
            codes = roles.stop_all()
        got = finals(client, KEYS)
        trimmed, trimmed_pending = counter(client, "ingest:hall:trimmed"), counter(client, "frames_trimmed_pending")
        trimmed_total = counter(client, "frames_trimmed_unread")
        seqs = sorted(int(v.frame_id.rsplit(":", 1)[1]) for v in got)
        lost = sorted(set(range(items)) - set(seqs))
    finally:
        client.close()
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)
    record(FaultFigures(
        fault="6. overload: edge stalls 4 s while ingest writes 20 fps, stream_maxlen=20", unit="frames", items_in=items,
        delivered=len(set(seqs)), lost=items - len(set(seqs)) - trimmed - trimmed_pending,
        duplicates=len(seqs) - len(set(seqs)), dropped_by_design=trimmed + trimmed_pending, recover_s=recover_s,
        test_s=time.monotonic() - started,
        notes=f"{trimmed} trimmed unread (ingest:hall:trimmed), {trimmed_pending} trimmed while a killed "
              f"worker held them (frames_trimmed_pending); all counted"))
    # edge-b may hold entries too when it is stopped (and lose its blocked read's reply to the socket
    # timeout on resuming): those are trimmed while pending as well, and counted the same way.
    assert trimmed > 0 and trimmed_pending >= held > 0 and trimmed_total == trimmed
    assert len(set(seqs)) + trimmed + trimmed_pending == items == len(lost) + len(set(seqs))
    assert len(seqs) == len(set(seqs))
    assert max(lost) < max(seqs) and seqs[-10:] == list(range(items - 10, items))  # the freshest are kept
    assert_clean_exit(codes, roles, killed=("edge-a",))


# --- 4. the notifier is down ----------------------------------------------------------------------


def test_notifier_down_then_back_delivers_once_per_event_and_channel(server, client, tmp_path) -> None:
    started = time.monotonic()
    ports = [free_port(), free_port()]
    urls = [f"json://127.0.0.1:{p}/hook" for p in ports]
    settings = dict(notifications__urls=urls, notifications__retry_base_s=0.2, notifications__retry_cap_s=1.0,
                    notifications__timeout_s=0.5, alerts__debounce_k=1, alerts__debounce_n=1,
                    alerts__cooldown_s=0, alerts__quiet_s=1.0)
    hooks: list[WebhookReceiver] = []
    try:
        with Roles(server.url, tmp_path, **settings) as roles:
            roles.start("alerts-a", "alerts", "--name", "alerts-a")
            wait_up(client, KEYS, roles, ("alerts", "alerts-a"))
            now = time.time()
            plant(client, KEYS.verdicts_stream(), edge_verdict("cam1:0", now, 0.95), edge_verdict("cam2:0", now, 0.9))
            assert wait_for(lambda: client.xlen(KEYS.notify_outbox_stream()) == 4, 30), roles.logs()
            assert wait_for(lambda: "notification_failed" in roles["alerts-a"].output(), 30)
            time.sleep(1.5)                       # a few failed attempts with backoff
            roles["alerts-a"].kill()              # and the notifier dies during the outage
            roles.start("alerts-b", "alerts", "--name", "alerts-b")
            wait_up(client, KEYS, roles, ("alerts", "alerts-b"))
            time.sleep(1.0)
            hooks = [WebhookReceiver(port=p).start() for p in ports]
            back_at = time.monotonic()
            assert wait_for(lambda: client.xlen(KEYS.notify_outbox_stream()) == 0, 60), roles.logs()
            recover_s = time.monotonic() - back_at
            time.sleep(2.0)                       # any repeat would arrive by now
            codes = roles.stop_all()
        received = [h.count() for h in hooks]
    finally:
        for h in hooks:
            h.stop()
    starts = [e for e in events(client, KEYS) if e.type is EventType.START]
    delivered = sum(bool(client.exists(KEYS.delivered(e.event_id, channel_id(u)))) for e in starts for u in urls)
    failures = roles["alerts-a"].output().count("notification_failed")
    record(FaultFigures(
        fault="4. notifier down (closed port), notifier SIGKILLed during the outage", unit="notifications",
        items_in=2 * len(starts), delivered=sum(received), lost=2 * len(starts) - delivered,
        duplicates=sum(received) - delivered, dead_lettered=len(dead_letters(client, KEYS)), recover_s=recover_s,
        test_s=time.monotonic() - started,
        notes=f"2 events x 2 channels; {failures} failed attempts kept in the outbox, delivered by a new process"))
    assert len(starts) == 2 and received == [2, 2] and delivered == 4
    assert failures >= 2
    assert_clean_exit(codes, roles, killed=("alerts-a",))


# --- 7. a camera stream stalls ------------------------------------------------------------------------


def test_camera_stall_raises_an_offline_alert_that_ends_when_it_recovers(server, client, tmp_path) -> None:
    started = time.monotonic()
    with StallingCamera(mpegts_clip(frames=600, fps=10), clip_s=60, stalls=1) as camera:
        cams = [{"id": "hall", "name": "Hall", "url": camera.url}]
        settings = dict(cameras=cams, ingest__fps=2, ingest__read_timeout_s=1.5, ingest__open_timeout_s=5,
                        ingest__reconnect_base_s=0.5, alerts__offline_grace_s=0)
        with Roles(server.url, tmp_path, **settings) as roles:
            roles.start("alerts", "alerts", "--name", "alerts-1", "--no-notify")
            roles.start("ingest", "ingest")
            assert wait_for(lambda: camera.stalled_at, 60), roles.logs()
            stalled = camera.stalled_at[0]
            kinds = lambda: [(e.kind, e.type) for e in events(client, KEYS)]  # noqa: E731
            offline = (EventKind.CAMERA_OFFLINE, EventType.START)
            online = (EventKind.CAMERA_OFFLINE, EventType.END)
            assert wait_for(lambda: offline in kinds(), 30), roles.logs()
            assert wait_for(lambda: online in kinds(), 30), roles.logs()
            got = events(client, KEYS)
            codes = roles.stop_all()
    start = next(e for e in got if (e.kind, e.type) == offline)
    end = next(e for e in got if (e.kind, e.type) == online)
    items = int(client.get(KEYS.counter("ingest:hall:items")) or 0)
    record(FaultFigures(
        fault="7. camera stream stalls (no data, connection open)", unit="status changes", items_in=2,
        delivered=sum(1 for e in got if e.kind is EventKind.CAMERA_OFFLINE), lost=0, duplicates=0,
        recover_s=end.at - stalled, test_s=time.monotonic() - started,
        notes=f"offline alert {start.at - stalled:.1f} s after the stall (read_timeout_s=1.5), "
              f"ended on reconnect; {items} frames ingested"))
    assert start.event_id == end.event_id and "stalled" in (start.description or "")
    assert start.at - stalled >= 1.5
    assert sum(1 for e in got if e.kind is EventKind.CAMERA_OFFLINE and e.type is EventType.START) == 1
    assert camera.connections >= 2 and items > 0
    assert_clean_exit(codes, roles)

"""Fault 11: Redis reaches ``maxmemory`` under ``noeviction`` and refuses every write that adds data.

A private redis-server with a small ``maxmemory`` is filled by a big key while a camera, an edge
worker and the alerts service (with a webhook) run. Ingest drops and counts new frames, no role
crashes, an alert event that comes due meanwhile is retried, ``fallwatch status`` and the metrics
say so; once the key is deleted everything resumes and every frame is accounted for.
"""

from __future__ import annotations

import shutil
import signal
import time
import urllib.request

import pytest
import redis

from fallwatch.keys import Keys
from fallwatch.schemas import CameraState, CameraStatus, EventKind, EventType
from fallwatch.settings import Settings
from fallwatch.status import gather
from fallwatch.webhook import WebhookReceiver
from tests.faults import FaultFigures, Roles, events, finals, record, wait_new_final, wait_up
from tests.helpers import free_port, plant, wait_for
from tests.ingest_media import write_mp4
from tests.sentinel import fill, small_redis

pytestmark = [pytest.mark.fault, pytest.mark.slow]

KEYS = Keys()
FILLER = "test:filler"  # not a fallwatch key: the test's own


def count(client: redis.Redis, name: str) -> int:
    return int(client.get(KEYS.camera_counter("hall", name)) or 0)


def metric(port: int, name: str) -> float:
    """The sum of a metric's samples on a role's /metrics page (0 when absent or unreachable)."""
    try:
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines() if line.startswith(f"fallwatch_{name}"))


def kept_full(client: redis.Redis) -> bool:
    """Fill again what trims and acknowledgements freed; True."""
    fill(client, FILLER)
    return True


def offline_event(client: redis.Redis, camera: str) -> bool:
    return any(e.kind is EventKind.CAMERA_OFFLINE and e.camera_id == camera and e.type is EventType.START
               for e in events(client, KEYS))


def test_out_of_memory_drops_frames_counted_and_everything_resumes(tmp_path) -> None:
    started = time.monotonic()
    server = small_redis(maxmemory_mb=16)
    client = redis.Redis.from_url(server.url, socket_timeout=10)
    video = write_mp4(tmp_path / "hall.mp4", frames=600, fps=20, bframes=False)
    port = free_port()
    try:
        with WebhookReceiver() as hook:
            settings = dict(cameras=[{"id": "hall", "url": str(video)}], ingest__fps=10,
                            edge__batch_size=4, alerts__quiet_s=1,
                            notifications__urls=[hook.url()], notifications__retry_base_s=0.2,
                            notifications__retry_cap_s=1.0)
            with Roles(server.url, tmp_path, **settings) as roles:
                roles.start("edge", "edge", "--name", "edge-1")
                roles.start("alerts", "alerts", "--name", "alerts-1")
                wait_up(client, KEYS, roles, ("edge", "edge-1"), ("alerts", "alerts-1"))
                roles.start("ingest", "ingest", metrics__enabled=True, metrics__port=port)
                assert wait_for(lambda: len(finals(client, KEYS)) >= 5, 60), roles.logs()
                roles["alerts"].signal(signal.SIGSTOP)  # a camera goes offline just as memory runs out
                plant(client, KEYS.camera_status_stream(), CameraStatus(camera_id="cam9", state=CameraState.OFFLINE))
                filled = fill(client, FILLER)
                full_at, full_wall = time.monotonic(), time.time()
                roles["alerts"].signal(signal.SIGCONT)
                refused = _refused(lambda: client.set("test:probe", b"x"))
                # Kept full: what trims and acknowledgements free is filled again at once.
                assert wait_for(lambda: kept_full(client) and metric(port, "frames_dropped_oom_total") >= 20
                                and "maxmemory" in roles["alerts"].output(), 30), roles.logs()  # event retried
                event_during = offline_event(client, "cam9")
                fill(client, FILLER)
                snap = gather(client, Settings(redis={"url": server.url}))
                oom_line = next((p for p in snap.problems if p.startswith("Redis out of memory")), "")
                gauge = metric(port, "redis_out_of_memory")
                alive = {r.name: r.alive for r in roles.roles.values()}
                client.delete(FILLER)
                freed_at, freed_wall = time.monotonic(), time.time()
                recover_s = wait_new_final(client, KEYS, roles, freed_wall) - freed_at
                assert wait_for(lambda: count(client, "oom") > 0, 30), roles.logs()
                assert wait_for(lambda: offline_event(client, "cam9") and hook.count() >= 1, 30), roles.logs()
                roles["ingest"].signal(signal.SIGTERM)
                assert roles["ingest"].wait(30) == 0, roles.logs()
                items, oom = count(client, "items"), count(client, "oom")
                assert wait_for(lambda: len({v.frame_id for v in finals(client, KEYS)}) >= items, 60), roles.logs()
                time.sleep(0.5)
                codes = roles.stop_all()
            logs = roles.all_output()
        got = finals(client, KEYS)
        seqs = {int(v.frame_id.rsplit(":", 1)[1]) for v in got}
        oom_during = [v for v in got if full_wall < v.captured_at < freed_wall]
    finally:
        client.close()
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)
    frames_in = items + oom
    record(FaultFigures(
        fault="11. Redis out of memory (maxmemory 16 MB, noeviction) for a few seconds", unit="frames",
        items_in=frames_in, delivered=len(seqs), lost=frames_in - len(seqs) - oom,
        duplicates=len(got) - len(seqs), dropped_by_design=oom, recover_s=recover_s,
        test_s=time.monotonic() - started,
        notes=f"{filled / 2**20:.1f} MB filler; {oom} frames dropped by ingest while Redis refused writes, counted "
              f"(ingest:hall:oom, frames_dropped_oom); {len(oom_during)} frames got in between; no role crashed; "
              f"`status` said \"Redis out of memory\"; a camera-offline event refused meanwhile was retried and "
              f"written when memory came back {freed_at - full_at:.1f} s later, notified once"))
    assert refused and not event_during and all(alive.values()), (refused, event_during, alive, logs[-4000:])
    assert oom_line and gauge == 1.0 and snap.redis.out_of_memory, (oom_line, gauge)
    assert "redis_out_of_memory" in logs and "Traceback" not in logs
    assert len(seqs) + oom == frames_in and len(got) == len(seqs)
    assert hook.unique() == hook.count() >= 1
    assert {name: code for name, code in codes.items() if code != 0} == {}, roles.logs()


def _refused(write) -> bool:
    """True when ``write`` is refused for lack of memory."""
    try:
        write()
    except redis.exceptions.OutOfMemoryError:
        return True
    return False

"""The benchmark suite's own plumbing: roles stop side by side, the behaviour sections pair up only
with --quick, drawn frames are shared between sections without being shared mutably, and the live
DMD producer never runs further ahead of the final verdicts than it may, and the upfall features'
caregiver station signs in to a real web role and reads its live stream."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from pathlib import Path

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_e2e  # noqa: E402
import bench_live_dmd  # noqa: E402
import bench_upfall  # noqa: E402
import common  # noqa: E402
import run  # noqa: E402
from alerts.store import write_event  # noqa: E402
from fallwatch.keys import Keys  # noqa: E402
from fallwatch.redis import EmbeddedRedis  # noqa: E402
from fallwatch.schemas import AlertEvent, Decider, EventKind, EventType  # noqa: E402

# a role stand-in that takes 1.5 s to shut down after SIGTERM, like a worker finishing its batch
SLOW_STOP = """
import signal, sys, time
def stop(*_):
    time.sleep(1.5)
    sys.exit(3)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def test_roles_stop_side_by_side() -> None:
    procs = [subprocess.Popen([sys.executable, "-c", SLOW_STOP], stdout=subprocess.PIPE) for _ in range(3)]
    for proc in procs:
        assert proc.stdout.readline().strip() == b"ready"
    start = time.monotonic()
    bench_e2e.stop_roles(procs)
    elapsed = time.monotonic() - start
    assert [p.returncode for p in procs] == [3, 3, 3]  # each ran its own shutdown, none was killed
    assert 1.5 <= elapsed < 3.0  # one after another would take 4.5 s


def test_behaviour_sections_pair_up_only_with_quick() -> None:
    everything = list(run.SECTIONS)
    assert run.beside_of(everything, quick=True) == {"live_dmd": "budget"}
    assert run.beside_of(everything, quick=False) == {}
    assert run.beside_of(["edge", "budget"], quick=True) == {}


def test_drawn_frames_are_shared_but_not_mutably() -> None:
    first = common.scene_jpegs(2, size=64)
    first.append(b"not a frame")
    again = common.scene_jpegs(2, size=64)
    assert len(again) == 2 and again == first[:2]
    assert all(j[:2] == b"\xff\xd8" for j in again)  # JPEG


def test_budget_cases_side_by_side_keep_their_names_and_overlap() -> None:
    import bench_budget

    def case(name: str, seconds: float):
        return lambda: (time.sleep(seconds), {"case": name})[1]

    start = time.monotonic()
    done = bench_budget.side_by_side({"hard": case("hard", 0.6), "priority": case("priority", 0.3)})
    elapsed = time.monotonic() - start
    assert done == {"hard": {"case": "hard"}, "priority": {"case": "priority"}}
    assert 0.6 <= elapsed < 0.85  # one after the other would take 0.9 s


def test_live_dmd_producer_holds_while_the_pipeline_is_behind(r: redis.Redis) -> None:
    keys = Keys("hold")
    traffic = bench_live_dmd.make_traffic(100, 100, 0)
    producer = bench_live_dmd.Producer(r, keys, 4, 400, traffic, ahead=40)  # chunks of 20 frames
    producer.upto = 200
    thread = threading.Thread(target=producer.run, daemon=True)
    thread.start()
    try:
        assert until(lambda: producer.held_s > 0.1) and producer.pushed == 40  # no final verdict yet
        for i in range(30):
            r.xadd(keys.final_stream(), {"n": i})
        assert until(lambda: producer.pushed == 80)  # 30 decided: 40 may wait, in whole chunks
        time.sleep(0.3)
        assert producer.pushed == 80 and r.xlen(keys.frames_stream()) == 80
    finally:
        producer.stop.set()
        thread.join(5)


def until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_station_signs_in_and_reads_the_live_stream() -> None:
    work = Path(tempfile.mkdtemp(prefix="fw-st-"))  # short: the Redis socket lives here
    port = bench_upfall.free_port()
    with EmbeddedRedis(work / "redis", appendonly=False) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FALLWATCH_")}
        env.update({"FALLWATCH_REDIS__URL": server.url, "FALLWATCH_WEB__PORT": str(port),
                    "FALLWATCH_WEB__USERS_FILE": str(bench_upfall.station_users(work)), "FALLWATCH_METRICS__PORT": "0"})
        with (work / "web.log").open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "fallwatch", "web"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(server.url)
        try:
            station = bench_upfall.Station(f"http://127.0.0.1:{port}", bench_upfall.STATION_USER,
                                           bench_upfall.STATION_PASSWORD).start()
            assert station.events == 1  # the stream's hello
            now = time.time()
            event = AlertEvent(type=EventType.START, kind=EventKind.FALL, camera_id="room-1", camera_name="Room 1",
                               started_at=now, at=now, confidence=0.9, decided_by=Decider.EDGE_TIMEOUT,
                               frame_ids=["room-1:1"])
            with client.pipeline(transaction=True) as pipe:
                write_event(pipe, Keys(), event, active=True, maxlen=100)
                pipe.execute()
            assert until(lambda: station.events >= 2), (work / "web.log").read_text()[-2000:]
            wrong = bench_upfall.Station(f"http://127.0.0.1:{port}", bench_upfall.STATION_USER, "not the password")
            with pytest.raises(urllib.error.HTTPError, match="401"):  # refused at once, not retried
                wrong.start()
        finally:
            proc.terminate()
            proc.wait(15)
            client.close()
    shutil.rmtree(work, ignore_errors=True)

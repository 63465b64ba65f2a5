"""The benchmark suite's own plumbing: roles stop side by side, the behaviour sections pair up only
with --quick, and drawn frames are shared between sections without being shared mutably."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_e2e  # noqa: E402
import common  # noqa: E402
import run  # noqa: E402

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

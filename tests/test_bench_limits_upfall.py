"""The limits and upfall benchmarks' own code on tiny inputs: FLOPs counted on the tiny ViLT agree
with torch's flop counter, the GEMM bound is positive in every mode, the fall share reads the
camera logs right, and missing footage skips the upfall rows with the reason."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_limits  # noqa: E402
import bench_upfall  # noqa: E402
from common import Machine  # noqa: E402


def frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(n)]


def test_products_are_counted_and_bounded_in_every_mode(tiny_edge) -> None:
    products, counted = bench_limits.record_products(tiny_edge, frames(2))
    assert {p.op for p in products} >= {"linear", "matmul", "conv2d"}
    assert sum(p.flops for p in products) == counted > 0
    for mode in bench_limits.GEMM_MODES:
        bound = bench_limits.mode_bound(products, mode, 2, 0.003)
        assert bound.bound_frames_per_s > 0 and bound.gemm_gflops > 0


def test_fall_share_counts_frames_that_reached_the_edge() -> None:
    log = bench_upfall.CameraLog("ffall1")
    # (captured_at, fall, changed, published): a still lead-in, then four fall frames, one gated
    log.frames = [(1.0, False, False, True), (2.0, True, True, True), (3.0, True, True, True),
                  (4.0, True, False, False), (5.0, True, False, True)]
    ids = {"ffall1:1": 1.0, "ffall1:2": 2.0, "ffall1:3": 3.0, "ffall1:4": 5.0}
    finals = {"ffall1:2": (100.0, 2.5), "ffall1:3": (100.0, 3.5), "ffall1:4": (100.0, 5.5)}
    share = bench_upfall.fall_share([log], finals, ids)["ffall1"]
    assert share["fall_frames"] == 4 and share["reached_edge"] == 3
    assert share["changed"] == 2 and share["share_changed_reached"] == 1.0
    assert share["first_fall_frame_to_verdict_s"] == pytest.approx(0.5)


def test_missing_footage_skips_the_rows_with_the_reason(tmp_path: Path) -> None:
    bench = bench_upfall.run_upfall(tmp_path, tmp_path, True, "int8", 4, folder=tmp_path / "nowhere")
    assert "no UP-Fall folder" in bench.skipped
    rows = bench_upfall.figures(bench, Machine("cpu", 2, "t", "p", "g"))
    assert rows[0].value is None and "nowhere" in rows[0].details["skipped"]


def test_camera_counts_step_up_halve_then_bisect_to_within_two() -> None:
    def search(first: int, capacity: int) -> list[int]:
        tried = [first]
        kept, failed = (first, None) if first <= capacity else (0, first)
        while (n := bench_upfall.next_count(kept, failed)) is not None:
            tried.append(n)
            kept, failed = (n, failed) if n <= capacity else (kept, n)
        return tried

    assert search(24, 19) == [24, 12, 18, 21, 19]  # halve once, then bisect
    assert search(8, 30) == [8, 16, 24, 32, 28, 30]  # up by 8 until one fails
    assert search(4, 0) == [4, 2, 1]  # nothing kept: halve down to one camera


def test_quick_plays_the_fall_cameras_faster_on_the_same_frames() -> None:
    still, fall = [bench_upfall.Frame(f, False) for f in frames(3)], [bench_upfall.Frame(f, True) for f in frames(5)]
    shots = {"standing": still, "walking": still, "fall1": fall, "fall2": fall[:4]}
    plan = bench_upfall.camera_plan(shots, 4, "q", falls=True, fall_fps=2.0)
    assert [(c, fps) for c, _f, fps in plan] == [("qcam00", 1.0), ("qcam01", 1.0), ("qcam02", 1.0), ("qcam03", 1.0),
                                                ("qfall1", 2.0), ("qfall2", 2.0)]
    assert plan[4][1] == fall and plan[5][1] == fall[:4]  # every fall frame, in order
    assert [len(f) for _c, f, _fps in bench_upfall.camera_plan(shots, 2, "f", falls=False)] == [3, 3]

"""The limits and upfall benchmarks' own code on tiny inputs: FLOPs counted on the tiny ViLT agree
with torch's flop counter, the GEMM bound is positive in every mode, the fall share reads the
camera logs right, missing footage skips the upfall rows with the reason, the features' figures pool
their trials and try 95% of the cameras only when needed, and the ceiling is what the split leaves."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

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


def run(cameras: int, latencies: list[float], kept: bool = True, cpu: dict | None = None) -> bench_upfall.UpfallRun:
    p99 = float(np.percentile(latencies, 99))
    return bench_upfall.UpfallRun(cameras, True, False, 20.0, 0, len(latencies), len(latencies), 1.0, p99, 1.0, 1.0,
                                  1.0, 1.0, 0.0, kept, None, 0.0, cpu_s=cpu or {}, cpu_wall_s=25.0,
                                  latencies_ms=tuple(latencies))


def test_features_p99_pools_every_pair_before_the_percentile() -> None:
    # one plain trial with a slow tail: pairwise ratios swing (0.5 and 2.0), the pooled p99 does not
    calm, tail = [100.0] * 98 + [200.0, 200.0], [100.0] * 98 + [400.0, 400.0]
    pairs = ((run(30, tail, cpu={"edge": 30.0}), run(30, calm, cpu={"edge": 30.0, "cloud": 0.4})),
             (run(30, calm, cpu={"edge": 30.0}), run(30, tail, cpu={"edge": 30.0, "cloud": 0.4})))
    row = bench_upfall.features_p99_figure(pairs, Machine("cpu", 2, "t", "p", "g"))
    assert row.value == 1.0 and row.met and row.details["pairwise_p99_ratios"] == [0.5, 2.0]
    assert row.details["frames"] == [200, 200] and row.details["cpu_s_features"] == {"edge": 60.0, "cloud": 0.8}
    # the extra CPU over the whole trials it was counted in (2 x 25 s), not their 20 s windows
    assert row.details["features_share_of_box_cpu"] == pytest.approx(0.8 / (50.0 * 2), abs=1e-4)
    assert "latencies_ms" not in row.details["pairs"][0][0]
    slower = ((run(30, calm), run(30, [110.0] * 98 + [220.0, 220.0])),)
    assert bench_upfall.features_p99_figure(slower, Machine("cpu", 2, "t", "p", "g")).met is False


def test_features_p99_ratio_comes_with_how_far_another_run_could_move_it() -> None:
    rng = np.random.default_rng(1)
    draw = lambda scale: list(rng.exponential(scale, 400))  # noqa: E731
    steady = [(draw(100.0), draw(100.0)) for _ in range(4)]
    low, high = bench_upfall.ratio_interval(steady)
    assert low < 1.0 < high  # the same machine, the same distribution: 1 is inside
    # the machine slows in one pair's plain trial only: the interval widens to take that in
    swinging = steady[:3] + [(draw(300.0), steady[3][1])]
    wide = bench_upfall.ratio_interval(swinging)
    assert wide[0] < low and wide[1] - wide[0] > high - low
    slower = bench_upfall.ratio_interval([(a, [1.5 * v for v in b]) for a, b in steady])
    assert slower[0] > 1.1  # half as slow again in every pair: clearly outside


def test_features_cameras_ratio_tries_95_percent_only_when_the_features_fall_behind(monkeypatch) -> None:
    tried = []
    plain, rich = SimpleNamespace(name="plain", features=False), SimpleNamespace(name="rich", features=True)

    def alone(roles, shots, spec, tag):
        tried.append((roles.name, spec.cameras, spec.window_s))
        return run(spec.cameras, [100.0] * 10, kept=not roles.features or spec.cameras <= 38)

    monkeypatch.setattr(bench_upfall, "alone", alone)
    spec = bench_upfall.Trial(40, True, 5.0, 30.0)
    at_most, load = bench_upfall.feature_trials(plain, rich, {}, spec, quick=False)
    assert tried[:4] == [("plain", 40, 30.0), ("rich", 40, 30.0), ("plain", 38, 30.0), ("rich", 38, 30.0)]
    assert [(r, c) for r, c, _w in tried[4:]] == [("plain", 30), ("rich", 30)] * bench_upfall.FEATURE_PAIRS
    assert len(load) == bench_upfall.FEATURE_PAIRS and all(w == 20.0 for _r, _c, w in tried[4:])
    row = bench_upfall.features_cameras_figure(at_most, Machine("cpu", 2, "t", "p", "g"))
    assert row.value == 0.95 and row.met
    tried.clear()
    at_most, _load = bench_upfall.feature_trials(plain, rich, {}, replace(spec, cameras=36), quick=True)
    assert len(at_most) == 1 and len(tried) == 4  # kept up at the most: no 95% pair; one load pair with --quick
    assert bench_upfall.features_cameras_figure(at_most, Machine("cpu", 2, "t", "p", "g")).value == 1.0
    behind = ((run(50, [900.0] * 10, kept=False), run(50, [900.0] * 10, kept=False)),)
    row = bench_upfall.features_cameras_figure(behind, Machine("cpu", 2, "t", "p", "g"))
    assert row.value is None and row.met is False  # no ratio when the plain configuration fell behind too


def test_the_ceiling_leaves_preprocessing_and_the_worker_outside_the_model() -> None:
    split = {"bound_s": 0.030, "preprocess_s": 0.003, "outside_model_s": 0.002, "other_ops_s": 0.009}
    lim = bench_limits.Limits("int8", 8, (), 1, 1, (), ((30.0, 20.0),), 0.04, 0.667, split, 2, ((60.0, 38.0),))
    assert lim.ceiling == round(0.030 / 0.035, 3)
    rows = {r.name: r for r in bench_limits.figures(lim, Machine("cpu", 2, "t", "p", "g"))}
    assert rows["limits.edge_fraction_of_bound_ceiling"].value == 0.857
    assert rows["limits.edge_fraction_of_bound_one_worker"].value == 0.667

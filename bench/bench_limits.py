"""The edge's limit on this machine, measured in the same run as the edge worker.

* ``flops``: the FLOPs of one edge frame as the project runs it, counted: every matrix product
  (``aten.linear``, the attention's ``aten.bmm`` and ``aten.baddbmm``, the patch convolution)
  that ``EdgeModel.score`` dispatches on a batch of 640x640 frames is recorded with its shapes
  (a ``TorchDispatchMode``) and checked against ``torch.utils.flop_counter.FlopCounterMode``'s total.
* ``gemm``: the machine's throughput on exactly those shapes at the edge batch size, for each
  mode: fp32, bf16 (weights and activations, as ``edge.dtype: bf16``) and int8 (dynamic
  quantised ``Linear`` as ``edge.int8``; attention products and the convolution stay fp32 there).
  Best of a few timed repeats per shape: other work on the cores only ever slows a run.
* ``bound``: frames/s if a frame took only its matrix products at those speeds; the edge worker's
  frames/s is reported as a fraction of the bound for the mode it runs, twice: the edge as
  deployed on a box of several cores, one single-thread worker per core (forked, each on a stream
  of its own, at the same time) against the cores times the bound measured on one thread
  (``limits.edge_fraction_of_bound``), and one worker with every thread against the bound on
  every thread (``limits.edge_fraction_of_bound_one_worker``).
* ``profile``: where the rest goes: ``torch.profiler`` self time of one scored batch split into
  matrix products and the other operators, preprocessing, and the worker's time outside the model;
  and the ceiling that leaves (``limits.edge_fraction_of_bound_ceiling``): the fraction one worker
  would reach with its matrix products at the bound and every other operator taking no time.

    .venv/bin/python bench/bench_limits.py --out bench/results/limits [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from common import bench_start, edge_options, Machine, figure, median_ratio

MATRIX_OPS = ("linear", "matmul", "conv2d")
BATCHED = ("bmm", "baddbmm")  # batched matrix products, recorded as "matmul"
GEMM_MODES = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class Product:
    """One kind of matrix product in the forward pass: ``op`` with ``shape`` (see ``op_shape``)."""
    op: str
    shape: tuple[int, ...]
    count: int  # times per scored batch

    @property
    def flops(self) -> int:
        return self.count * op_flops(self.op, self.shape)


def op_shape(op: str, args: tuple) -> tuple[int, ...]:
    """(M, K, N, bias) of a Linear, (B, M, K, N) of a (batched) matmul, (N, C, H, W, O, kh, kw, stride)
    of the patch convolution: the shapes at the op the model calls (before any decomposition)."""
    if op == "linear":
        x, w = args[0], args[1]
        bias = len(args) > 2 and args[2] is not None
        return math.prod(x.shape[:-1]), x.shape[-1], w.shape[0], int(bias)
    if op == "matmul":  # matmul(a, b), bmm(a, b), baddbmm(bias, a, b)
        a, b = args[-2], args[-1]
        return math.prod(a.shape[:-2]), a.shape[-2], a.shape[-1], b.shape[-1]
    x, w, stride = args[0], args[1], args[3]
    return (*x.shape, w.shape[0], w.shape[2], w.shape[3], int(stride[0]))


def op_flops(op: str, s: tuple[int, ...]) -> int:
    if op == "linear":
        return 2 * s[0] * s[1] * s[2]
    if op == "matmul":
        return 2 * s[0] * s[1] * s[2] * s[3]
    n, c, h, w, o, kh, kw, stride = s
    return 2 * n * o * ((h - kh) // stride + 1) * ((w - kw) // stride + 1) * c * kh * kw


def record_products(model, images: list) -> tuple[list[Product], int]:
    """The matrix products of one ``model.score(images)``, and FlopCounterMode's total for it."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    seen: Counter = Counter()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            name = "matmul" if name in BATCHED else name
            if name in MATRIX_OPS:
                seen[(name, op_shape(name, args))] += 1
            return func(*args, **(kwargs or {}))

    with Recorder():
        model.score(images)
    counter = FlopCounterMode(display=False)
    with counter:
        model.score(images)
    return [Product(op, shape, n) for (op, shape), n in sorted(seen.items())], int(counter.get_total_flops())


# --- the machine's speed on those shapes ---------------------------------------------------------


def product_fn(p: Product, mode: str):
    """A zero-argument callable running ``p`` once as the edge does in ``mode``."""
    import torch

    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    if p.op == "linear":
        m, k, n, bias = p.shape
        x = torch.randn(m, k, dtype=dtype)
        layer = torch.nn.Linear(k, n, bias=bool(bias)).to(dtype).eval()
        if mode == "int8":
            from edge_worker.model import quantize_int8

            layer = quantize_int8(torch.nn.Sequential(layer))[0]
        return lambda: layer(x)
    if p.op == "matmul":
        b, m, k, n = p.shape
        a, c = torch.randn(b, m, k, dtype=dtype), torch.randn(b, k, n, dtype=dtype)
        return lambda: torch.bmm(a, c)
    n, ch, h, w, o, kh, kw, stride = p.shape
    x, weight = torch.randn(n, ch, h, w, dtype=dtype), torch.randn(o, ch, kh, kw, dtype=dtype)
    return lambda: torch.nn.functional.conv2d(x, weight, stride=stride)


def best_seconds(fn, budget_s: float, tries: int = 3) -> float:
    """Best per-call time over ``tries`` timed loops of about ``budget_s / tries`` each (after a warm-up)."""
    import torch

    with torch.inference_mode():
        fn()
        start, calls = time.perf_counter(), 0
        while calls < 2 or time.perf_counter() - start < budget_s / 4:
            fn()
            calls += 1
        per_call = (time.perf_counter() - start) / calls
        reps = max(1, int(budget_s / tries / per_call))
        best = float("inf")
        for _ in range(tries):
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - start) / reps)
    return best


@dataclass(frozen=True)
class ModeBound:
    mode: str
    gemm_gflops: float  # the Linear layers' FLOPs over their time: the machine's GEMM speed on these shapes
    all_products_gflops: float
    bound_s_per_frame: float  # every matrix product of a frame at the measured speeds
    bound_frames_per_s: float
    per_product_gflops: dict[str, float]


def mode_bound(products: list[Product], mode: str, batch: int, budget_s: float) -> ModeBound:
    seconds = {p: best_seconds(product_fn(p, mode), budget_s) for p in products}
    linear = [p for p in products if p.op == "linear"]
    lin_s = sum(p.count * seconds[p] for p in linear)
    total_s = sum(p.count * s for p, s in seconds.items())
    per = {f"{p.op}{list(p.shape)}": round(op_flops(p.op, p.shape) / seconds[p] / 1e9, 1) for p in products}
    bound = total_s / batch
    return ModeBound(mode, round(sum(p.flops for p in linear) / lin_s / 1e9, 1),
                     round(sum(p.flops for p in products) / total_s / 1e9, 1), round(bound, 5),
                     round(1 / bound, 2), per)


# --- where the rest goes -------------------------------------------------------------------------


def profile_split(model, images: list) -> dict[str, float]:
    """Seconds per frame of one scored batch: matrix products, other operators (self time in
    ``torch.profiler``), preprocessing (timed alone), and the whole ``score`` call."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    model.score(images)
    start = time.perf_counter()
    with torch.inference_mode():
        model.preprocess(images)
    prep = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        model.score(images)
        wall = time.perf_counter() - start
    matrix = other = 0.0
    for ev in prof.key_averages():
        name = ev.key.split("::")[-1]
        is_matrix = name in ("mm", "addmm", "bmm", "baddbmm", "linear_dynamic", "mkldnn_convolution",
                             "convolution_overrideable")
        if is_matrix:
            matrix += ev.self_cpu_time_total / 1e6
        else:
            other += ev.self_cpu_time_total / 1e6
    n = len(images)
    return {"score_s": round(wall / n, 5), "matrix_s": round(matrix / n, 5),
            "other_ops_s": round(max(0.0, other / n - prep / n), 5), "preprocess_s": round(prep / n, 5)}


@dataclass(frozen=True)
class Limits:
    mode: str
    batch: int
    products: tuple[dict, ...]
    flops_per_frame: int
    flop_counter_per_frame: int  # torch.utils.flop_counter's count of the same call
    bounds: tuple[ModeBound, ...]
    pairs: tuple[tuple[float, float], ...]  # (bound frames/s, worker frames/s), measured alternately
    worker_share_outside_model: float
    fraction_of_bound: float  # median of the pairwise ratios worker / bound
    split: dict[str, float]
    cores: int = 1
    # one worker per core, one thread each: (cores x the one-thread bound, the workers' frames/s together)
    per_core_pairs: tuple[tuple[float, float], ...] = ()

    @property
    def ceiling(self) -> float:
        """The fraction one worker would reach if its matrix products ran at the bound and every other
        operator of the model took no time: only preprocessing and the worker's own work left."""
        bound = self.split["bound_s"]
        return round(bound / (bound + self.split["preprocess_s"] + self.split["outside_model_s"]), 3)

    @property
    def per_core_fraction(self) -> float:
        return round(median_ratio([w for _b, w in self.per_core_pairs], [b for b, _w in self.per_core_pairs]), 3)


def run_limits(models: dict, mode: str, batch: int, work: Path, quick: bool) -> Limits:
    """``models`` as bench_edge.load_models (bf16 at least, and ``mode``): the products counted, the
    three modes' GEMM speeds, then bound and edge worker alternately (A B A B, so each pair shares
    the machine's load), and the profile of one scored batch."""
    import statistics

    from bench_edge import decoded, worker_bench
    from common import scene_jpegs

    images = decoded(scene_jpegs(8))
    batch_images = [images[i % len(images)] for i in range(batch)]
    products, counted = record_products(models["bf16"], batch_images)  # same shapes in every mode
    bounds = tuple(mode_bound(products, m, batch, 0.015 if quick else 0.3) for m in GEMM_MODES)
    pairs, runs, per_core, cores = [], [], [], os.cpu_count() or 1
    with worker_bench(work, models[mode], mode, batch, batch if quick else 32) as bench:
        for _ in range(1 if quick else 6):
            bound = mode_bound(products, mode, batch, 0.015 if quick else 0.1).bound_frames_per_s
            runs.append(bench.run())
            pairs.append((bound, runs[-1].frames_per_s))
            if cores > 1:
                per_core.append(per_core_pair(bench, products, mode, batch, cores, 0.015 if quick else 0.1))
    outside = statistics.median(1 - w.edge_model_s / w.seconds for w in runs)
    split = profile_split(models[mode], batch_images)
    worker_s = 1 / statistics.median(w for _b, w in pairs)
    split |= {"worker_s": round(worker_s, 5), "bound_s": round(1 / statistics.median(b for b, _w in pairs), 5),
              "outside_model_s": round(worker_s * outside, 5)}
    fraction = median_ratio([w for _b, w in pairs], [b for b, _w in pairs])
    return Limits(mode, batch, tuple(asdict(p) | {"flops": p.flops} for p in products),
                  sum(p.flops for p in products) // batch, counted // batch, bounds, tuple(pairs), round(outside, 4),
                  round(fraction, 3), split, cores, tuple(per_core))


def per_core_pair(bench, products: list[Product], mode: str, batch: int, cores: int,
                  budget_s: float) -> tuple[float, float]:
    """(``cores`` x the bound measured on one thread, frames/s of one single-thread worker per core
    together: all their frames over the longest run)."""
    from switcher.model import single_thread

    with single_thread():
        bound = cores * mode_bound(products, mode, batch, budget_s).bound_frames_per_s
    runs = bench.run_per_core(cores)
    return round(bound, 2), round(sum(r.frames for r in runs) / max(r.seconds for r in runs), 2)


def figures(lim: Limits, machine: Machine) -> list:
    rows = [figure("limits.edge_gflop_per_frame", round(lim.flops_per_frame / 1e9, 2), "GFLOP", machine,
                   batch=lim.batch, flop_counter_gflop=round(lim.flop_counter_per_frame / 1e9, 2),
                   products=list(lim.products))]
    for b in lim.bounds:
        rows.append(figure(f"limits.gemm_gflops_{b.mode}", b.gemm_gflops, "GFLOP/s", machine, batch=lim.batch,
                           **asdict(b)))
    fractions = [("_one_worker", lim.fraction_of_bound,
                  {"workers": 1, "pairs_bound_worker_frames_per_s": [list(p) for p in lim.pairs],
                   "seconds_per_frame": lim.split, "worker_share_outside_model": lim.worker_share_outside_model})]
    if lim.per_core_pairs:  # the edge as deployed, one single-thread worker per core, is the headline
        fractions.insert(0, ("", lim.per_core_fraction, {
            "workers": lim.cores, "threads_each": 1,
            "pairs_bound_workers_frames_per_s": [list(p) for p in lim.per_core_pairs]}))
    fractions.append(("_ceiling", lim.ceiling, {"workers": 1, "bound_s": lim.split["bound_s"],
                                                "preprocess_s": lim.split["preprocess_s"],
                                                "outside_model_s": lim.split["outside_model_s"],
                                                "other_ops_s": lim.split["other_ops_s"]}))
    for i, (suffix, value, details) in enumerate(fractions):
        headline = i == 0
        rows.append(figure("limits.edge_fraction_of_bound" + ("" if headline else suffix), value, "ratio", machine,
                           ">= 0.85" if headline else "", (lambda v: v >= 0.85) if headline else None,
                           mode=lim.mode, batch=lim.batch, **details))
    return rows


def main() -> None:
    import bench_edge

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for limits.json")
    ap.add_argument("--quick", action="store_true", help="shorter timings, fewer pairs")
    edge_options(ap)
    args = ap.parse_args()
    machine = bench_start()
    models = bench_edge.load_models(args.cache)
    with tempfile.TemporaryDirectory(prefix="fw-bench-") as tmp:
        lim = run_limits(models, args.mode, args.batch, Path(tmp), args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {f.name: f.to_json() for f in figures(lim, machine)}
    (args.out / "limits.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v["value"] for k, v in result.items()}, indent=2))
    print(json.dumps(lim.split, indent=2))


if __name__ == "__main__":
    main()

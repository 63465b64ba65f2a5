"""Edge throughput: full-size ViLT-B/32 bare, and inside the full EdgeWorker on a real redis-server.

* ``bare``: ``EdgeModel.score`` on already decoded 640x640 frames in a plain loop (preprocessing
  and the forward pass), for each mode (bf16 weights, int8 dynamic) and batch size; the best pair
  is the edge's operating point.
* ``worker``: the same model inside ``EdgeWorker.step`` fed by a pre-filled frames stream of
  640x640 JPEGs: XREADGROUP, limits check, JPEG decode, preprocessing, model, switcher (untrained,
  trained shape, threshold set so about a quarter of the frames are offloaded: pixels kept and an
  RQ job enqueued), verdicts written, XACK. Bare and worker runs alternate (A B A B) so each pair
  sees the same machine load; the ratio is the median of the pairwise ratios.
* ``switcher``: microseconds per item of ``Switcher.agreement`` at the operating batch size.
* ``forward``: the edge model's forward pass as it was (question padded to 40 tokens, ViLT's own
  forward) against the current one, alternating on the same loaded model.

    .venv/bin/python bench/bench_edge.py --out bench/results/edge [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import bench_start, DEFAULT_CACHE, QUESTION, Machine, figure, full_vilt_dir, load_average, \
    median_ratio, scene_jpegs, switcher_checkpoint

MODES = {"bf16": {"dtype": "bf16"}, "int8": {"int8": True}}
OFFLOAD_SHARE = 0.25  # the bench switcher offloads about this fraction of frames


@dataclass(frozen=True)
class BareRun:
    mode: str
    batch: int
    frames: int
    frames_per_s: float


@dataclass(frozen=True)
class WorkerRun:
    frames: int
    seconds: float
    frames_per_s: float
    offloaded: int
    edge_model_s: float  # time inside EdgeModel.score
    load_average_1m: float


@dataclass(frozen=True)
class EdgeBench:
    mode: str
    batch: int
    sweep: tuple[BareRun, ...]
    bare_runs: tuple[float, ...]  # frames/s, interleaved with worker_runs
    worker_runs: tuple[WorkerRun, ...]
    ratio: float
    switcher_us_per_item: float
    model_us_per_item: float
    threshold: float
    profile: str


def edge_settings(model_dir: Path, mode: str, batch: int, **edge: object) -> dict[str, object]:
    return {"model": str(model_dir), "questions": [QUESTION], "batch_size": batch, **MODES[mode], **edge}


def load_model(model_dir: Path, mode: str):
    from edge_worker.model import EdgeModel
    from fallwatch.settings import EdgeSettings

    return EdgeModel.load(EdgeSettings(**edge_settings(model_dir, mode, 8)))


def decoded(jpegs: Sequence[bytes]) -> list:
    from edge_worker.decode import decode_rgb

    return [decode_rgb(j, 8_000_000, 40_000_000) for j in jpegs]


def bare_rate(model, images: list, batch: int, frames: int, warm_up: bool = True) -> float:
    """Frames per second of ``model.score`` over ``frames`` frames in batches (after one warm-up batch)."""
    batches = [[images[(b * batch + i) % len(images)] for i in range(batch)] for b in range(max(1, frames // batch))]
    if warm_up:
        model.score(batches[0])
    start = time.perf_counter()
    for items in batches:
        model.score(items)
    return len(batches) * batch / (time.perf_counter() - start)


def sweep(models: dict, images: list, batches: Sequence[int], frames: int, rounds: int) -> list[BareRun]:
    """Every (mode, batch) pair, ``rounds`` times round-robin so load changes hit every pair."""
    runs = []
    steps = [(r, mode, b) for r in range(rounds) for b in batches for mode in models]
    for r, mode, batch in tqdm(steps, desc="edge sweep", unit="run", leave=False):
        n = max(frames, 2 * batch)
        rate = bare_rate(models[mode], images, batch, n, warm_up=r == 0)
        runs.append(BareRun(mode, batch, n, round(rate, 2)))
    return runs


def latency_batch(runs: Sequence[BareRun], mode: str, tolerance: float = 0.02) -> int:
    """The smallest batch size within ``tolerance`` of ``mode``'s best throughput: a frame waits for
    the batch being scored and then its own, so smaller batches at the same rate mean lower latency.
    The tolerance is small: live, the edge shares the cores with ingest and alerts and needs its rate."""
    rates: dict[int, float] = {}
    for r in runs:
        if r.mode == mode:
            rates[r.batch] = max(rates.get(r.batch, 0.0), r.frames_per_s)
    top = max(rates.values())
    return min(b for b, rate in rates.items() if rate >= (1 - tolerance) * top)


def best(runs: Sequence[BareRun]) -> BareRun:
    """The fastest (mode, batch) by its best round: other work on the machine only ever slows a run."""
    return max(runs, key=lambda r: r.frames_per_s)


# --- the worker --------------------------------------------------------------------------------


def fill_stream(client, keys, jpegs: Sequence[bytes], frames: int) -> None:
    from fallwatch.schemas import FrameMessage, encode

    pipe = client.pipeline(transaction=False)
    now = time.time()
    for i in range(frames):
        msg = FrameMessage.make(f"cam{i % 16}", i, captured_at=now, width=640, height=640)
        pipe.xadd(keys.frames_stream(), encode(msg, [jpegs[i % len(jpegs)]]))
    pipe.execute()


def worker_run(settings, client, keys, model, switcher, jpegs: Sequence[bytes], frames: int) -> WorkerRun:
    """One EdgeWorker over a pre-filled stream of ``frames`` JPEGs until all are acknowledged."""
    from edge_worker.worker import EdgeWorker

    worker = EdgeWorker(settings, client, keys, _Timed(model), switcher, name="bench")
    worker.ensure_group()
    fill_stream(client, keys, jpegs, frames)
    done = offloaded = 0
    start = time.perf_counter()
    while done < frames:
        result = worker.step(block_ms=1000)
        done += result.read
        offloaded += result.offloaded
    seconds = time.perf_counter() - start
    return WorkerRun(frames, round(seconds, 3), round(frames / seconds, 2), offloaded,
                     round(worker.model.seconds, 3), load_average()[0])


class _Timed:
    """The edge model, counting the wall time spent inside ``score``."""

    def __init__(self, model):
        self.model, self.model_id, self.seconds = model, model.model_id, 0.0

    def score(self, images):
        start = time.perf_counter()
        try:
            return self.model.score(images)
        finally:
            self.seconds += time.perf_counter() - start


def calibrated_threshold(switcher, model, images: list, share: float = OFFLOAD_SHARE) -> float:
    """The agreement quantile that offloads ``share`` of these frames."""
    agreement = switcher.agreement(model.score(images).features)
    return float(np.quantile(agreement, share))


def switcher_us(switcher, features: np.ndarray, reps: int) -> float:
    switcher.agreement(features)
    walls = []
    for _ in range(reps):
        start = time.perf_counter()
        switcher.agreement(features)
        walls.append(time.perf_counter() - start)
    return 1e6 * statistics.median(walls) / len(features)


def profile_worker(run) -> str:
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001)
    profiler.start()
    run()
    profiler.stop()
    return profiler.output_text(unicode=False, color=False, show_all=False)


# --- the forward pass, before and after its optimisation ----------------------------------------


@dataclass(frozen=True)
class ForwardAB:
    mode: str
    batch: int
    before: tuple[float, ...]  # frames/s: padded question, the model's own forward pass
    after: tuple[float, ...]  # frames/s: EdgeModel's forward (question tokens only, last layer for CLS)
    speedup: float  # median of the pairwise ratios
    max_abs_p_fall_diff: float
    max_abs_feature_diff: float


@contextmanager
def plain_forward(model) -> Iterator[None]:
    """EdgeModel as it was before the optimisation: every question padded to 40 tokens and ViLT's
    own forward pass (the model's private state is swapped for the duration, then restored)."""
    encoded, fast = model._encoded, model._fast
    model._encoded = [replace(q, length=int(q.input_ids.shape[1])) for q in encoded]
    model._fast = False
    try:
        yield
    finally:
        model._encoded, model._fast = encoded, fast


def forward_ab(model, mode: str, batch: int, quick: bool) -> ForwardAB:
    """Alternating runs of the plain and the optimised forward pass on the same loaded model."""
    images = decoded(scene_jpegs(16))
    items = [images[i % len(images)] for i in range(batch)]
    frames = batch if quick else 2 * batch
    after_scores = model.score(items)
    with plain_forward(model):
        before_scores = model.score(items)
    before, after = [], []
    for _ in tqdm(range(2 if quick else 6), desc="forward before/after", leave=False):
        with plain_forward(model):
            before.append(round(bare_rate(model, images, batch, frames, warm_up=False), 2))
        after.append(round(bare_rate(model, images, batch, frames, warm_up=False), 2))
    return ForwardAB(mode, batch, tuple(before), tuple(after), round(median_ratio(after, before), 3),
                     round(float(np.abs(after_scores.p_fall - before_scores.p_fall).max()), 5),
                     round(float(np.abs(after_scores.features - before_scores.features).max()), 5))


def forward_figure(ab: ForwardAB, machine: Machine):
    return figure("edge.forward_speedup", ab.speedup, "x", machine, **asdict(ab))


# --- the whole benchmark -----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    batches: tuple[int, ...]
    sweep_frames: int
    sweep_rounds: int
    pairs: int  # bare/worker pairs: short runs, so both halves of a pair share the machine's load
    worker_frames: int

    @classmethod
    def for_run(cls, quick: bool) -> "Plan":
        return cls((8,), 16, 1, 3, 16) if quick else cls((1, 2, 4, 8, 16), 16, 3, 8, 32)


def load_models(cache: Path, modes: Sequence[str] = tuple(MODES)) -> dict:
    model_dir = full_vilt_dir(cache)
    return {m: load_model(model_dir, m) for m in tqdm(modes, desc="load ViLT-B/32", leave=False)}


def run_edge(cache: Path, work: Path, quick: bool, profile: bool = False, models: dict | None = None) -> EdgeBench:
    plan = Plan.for_run(quick)
    images = decoded(scene_jpegs(16))
    models = models or load_models(cache)
    sweep_runs = sweep(models, images, plan.batches, plan.sweep_frames, plan.sweep_rounds)
    top = best(sweep_runs)
    model = models[top.mode]
    features = model.score([images[i % len(images)] for i in range(top.batch)]).features
    with worker_bench(work, model, top.mode, top.batch, plan.worker_frames) as bench:
        bare, workers, text = [], [], ""
        for _ in tqdm(range(plan.pairs), desc="bare/worker pairs", leave=False):
            bare.append(round(bare_rate(model, images, top.batch, plan.worker_frames, warm_up=False), 2))
            workers.append(bench.run())
        if profile:
            text = profile_worker(bench.run)
    ratio = median_ratio([w.frames_per_s for w in workers], bare)
    return EdgeBench(top.mode, top.batch, tuple(sweep_runs), tuple(bare), tuple(workers), round(ratio, 3),
                     round(switcher_us(bench.switcher, features, 50 if quick else 500), 1),
                     round(1e6 / statistics.median(bare), 1), round(bench.threshold, 4), text)


class WorkerBench:
    """Runs of one EdgeWorker on a pre-filled stream (see :func:`worker_run`), each under new keys."""

    def __init__(self, settings, client, model, switcher, threshold: float, frames: int):
        self.settings, self.client, self.model, self.switcher = settings, client, model, switcher
        self.threshold, self.frames, self.runs = threshold, frames, 0
        self.jpegs = scene_jpegs(16)

    def run(self, tag: str = "", clean: bool = True) -> WorkerRun:
        from fallwatch.keys import Keys

        self.runs += 1
        result = worker_run(self.settings, self.client, Keys(f"bench{self.runs}{tag}"), self.model, self.switcher,
                            self.jpegs, self.frames)
        if clean:
            self.client.flushdb()
        return result

    def run_per_core(self, workers: int) -> list[WorkerRun]:
        """``workers`` forked processes with one torch thread each, each running the worker over a
        stream of its own at the same time (one edge worker per core, as docs/deploy.md advises)."""
        import multiprocessing as mp

        ctx = mp.get_context("fork")  # the children share the loaded model's memory
        results = ctx.Queue()
        procs = [ctx.Process(target=_one_core, args=(self, f"c{i}", results)) for i in range(workers)]
        for proc in procs:
            proc.start()
        try:
            runs = [WorkerRun(**results.get(timeout=900)) for _ in procs]
        finally:
            for proc in procs:
                proc.join(30)
        self.client.flushdb()
        return runs


def _one_core(bench: WorkerBench, tag: str, results) -> None:
    import torch

    torch.set_num_threads(1)
    bench.model.score(decoded(bench.jpegs[:bench.settings.edge.batch_size]))  # warm up on one thread, unmeasured
    results.put(asdict(bench.run(tag, clean=False)))


@contextmanager
def worker_bench(work: Path, model, mode: str, batch: int, frames: int) -> Iterator[WorkerBench]:
    """A redis-server, the bench switcher (offloading about OFFLOAD_SHARE) and a :class:`WorkerBench`."""
    import redis

    from fallwatch.redis import EmbeddedRedis
    from fallwatch.settings import Settings
    from switcher.model import Switcher

    ckpt = switcher_checkpoint(work / "switcher", model.model_id, model.questions, model.feature_dim)
    switcher = Switcher.load(ckpt, model.model_id, model.questions)
    threshold = calibrated_threshold(switcher, model, decoded(scene_jpegs(8)))
    with EmbeddedRedis(work / "redis", appendonly=False) as server:
        settings = Settings(redis={"url": server.url},
                            edge=edge_settings(Path(model.model_id), mode, batch, block_ms=50),
                            switcher={"checkpoint": str(ckpt), "threshold": threshold}, cloud={"batch_size": 8})
        client = redis.Redis.from_url(server.url)
        try:
            yield WorkerBench(settings, client, model, switcher, threshold, frames)
        finally:
            client.close()


def figures(bench: EdgeBench, machine: Machine) -> list:
    worker_fps = statistics.median(w.frames_per_s for w in bench.worker_runs)
    bare_fps = statistics.median(bench.bare_runs)
    share = bench.switcher_us_per_item / bench.model_us_per_item
    common = {"mode": bench.mode, "batch": bench.batch}
    outside_model = statistics.median(1 - w.edge_model_s / w.seconds for w in bench.worker_runs)
    return [
        figure("edge.bare_frames_per_s", round(bare_fps, 2), "frames/s", machine, **common,
               best_run=max(bench.bare_runs), sweep=[asdict(r) for r in bench.sweep], runs=list(bench.bare_runs)),
        figure("edge.worker_frames_per_s", round(worker_fps, 2), "frames/s", machine, ">= 20",
               lambda v: v >= 20, **common, best_run=max(w.frames_per_s for w in bench.worker_runs),
               runs=[asdict(w) for w in bench.worker_runs], offload_threshold=bench.threshold,
               share_outside_model=round(outside_model, 4)),
        figure("edge.worker_vs_bare_ratio", bench.ratio, "ratio", machine, ">= 0.90", lambda v: v >= 0.90,
               **common, pairs=[[b, w.frames_per_s] for b, w in zip(bench.bare_runs, bench.worker_runs)]),
        figure("edge.switcher_us_per_item", bench.switcher_us_per_item, "us/item", machine,
               "< 1% of the edge model's time per item", lambda v: share < 0.01,
               model_us_per_item=bench.model_us_per_item, share_of_model=round(share, 5), batch=bench.batch),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for edge.json")
    ap.add_argument("--quick", action="store_true", help="one batch size, fewer frames")
    ap.add_argument("--profile", action="store_true", help="profile one worker run with pyinstrument")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the full-size ViLT checkpoint is kept")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    machine = bench_start()
    models = load_models(args.cache)
    with tempfile.TemporaryDirectory(prefix="fw-bench-") as tmp:
        bench = run_edge(args.cache, Path(tmp), args.quick, args.profile, models)
    ab = forward_ab(models[bench.mode], bench.mode, bench.batch, args.quick)
    result = {f.name: f.to_json() for f in [*figures(bench, machine), forward_figure(ab, machine)]}
    (args.out / "edge.json").write_text(json.dumps(result, indent=2, default=str))
    if bench.profile:
        (args.out / "edge_profile.txt").write_text(bench.profile)
    print(json.dumps({k: v["value"] for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()

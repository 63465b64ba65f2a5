"""Experiment: would reading and decoding the next batch in a thread, while the model scores the
current one, speed up the edge worker? (Not adopted: see docs/benchmarks.md.)

``EdgeWorker.run`` as it is, against a variant whose ``run`` keeps one XREADGROUP + JPEG decode
in flight on a helper thread. Both consume a pre-filled stream of 640x640 JPEGs with the
full-size ViLT-B/32 (int8) and the bench switcher; runs alternate (A B A B) and the result is the
median of the pairwise ratios. The variant reuses the worker's own steps (read, decode, score
and publish, XACK), so it measures the overlap and nothing else.

    .venv/bin/python bench/exp_prefetch.py --out bench/results/prefetch [--pairs 24] [--frames 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

import bench_edge
from common import DEFAULT_CACHE, Machine, figure, full_vilt_dir, median_ratio, scene_jpegs, switcher_checkpoint


def prefetching_worker_class():
    from edge_worker.worker import EdgeWorker, EdgeStepReport

    class PrefetchingWorker(EdgeWorker):
        def _fetch(self):
            entries = self.read()
            result = EdgeStepReport(read=len(entries), entry_ids=[e for e, _ in entries])
            return result, (self._decode_all(entries, result) if entries else [])

        def run(self, stop: threading.Event) -> None:
            self.ensure_group()
            with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
                ahead = pool.submit(self._fetch)
                while not stop.is_set():
                    result, frames = ahead.result()
                    ahead = pool.submit(self._fetch)  # the next batch is read and decoded meanwhile
                    if frames:
                        self._score_and_publish(frames, result)
                    if result.entry_ids:
                        self.client.xack(self.keys.frames_stream(), self.keys.edge_group(), *result.entry_ids)
                ahead.result()

    return PrefetchingWorker


def consumed(client, keys) -> bool:
    stream = keys.frames_stream()
    group = client.xinfo_groups(stream)[0]
    return group["pending"] == 0 and group["last-delivered-id"] == client.xinfo_stream(stream)["last-generated-id"]


def timed_run(worker_cls, settings, client, keys, model, switcher, jpegs, frames: int) -> float:
    """Frames per second of ``worker_cls.run`` over a pre-filled stream, until all are acknowledged."""
    worker = worker_cls(settings, client, keys, model, switcher, name="bench")
    worker.ensure_group()
    bench_edge.fill_stream(client, keys, jpegs, frames)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    start = time.perf_counter()
    thread.start()
    while not consumed(client, keys):
        time.sleep(0.005)
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    return frames / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for prefetch.json")
    ap.add_argument("--pairs", type=int, default=24, help="A/B pairs")
    ap.add_argument("--frames", type=int, default=16, help="frames per run")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the full-size ViLT checkpoint is kept")
    args = ap.parse_args()
    import redis

    from edge_worker.worker import EdgeWorker
    from fallwatch import logging as fw_logging
    from fallwatch.keys import Keys
    from fallwatch.redis import EmbeddedRedis
    from fallwatch.settings import Settings
    from switcher.model import Switcher

    fw_logging.configure("warning", "console")
    machine = Machine.here()
    model_dir = full_vilt_dir(args.cache)
    model = bench_edge.load_model(model_dir, "int8")
    jpegs = scene_jpegs(16)
    variants = {"plain": EdgeWorker, "prefetch": prefetching_worker_class()}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="fw-bench-") as tmp, \
            EmbeddedRedis(Path(tmp) / "redis", appendonly=False) as server:
        ckpt = switcher_checkpoint(Path(tmp) / "switcher", model.model_id, model.questions, model.feature_dim)
        switcher = Switcher.load(ckpt, model.model_id, model.questions)
        threshold = bench_edge.calibrated_threshold(switcher, model, bench_edge.decoded(jpegs[:8]))
        settings = Settings(redis={"url": server.url}, edge=bench_edge.edge_settings(model_dir, "int8", 8, block_ms=50),
                            switcher={"checkpoint": str(ckpt), "threshold": threshold})
        client = redis.Redis.from_url(server.url)
        for i in tqdm(range(args.pairs), desc="plain/prefetch pairs"):
            for name, cls in variants.items():
                rates[name].append(round(timed_run(cls, settings, client, Keys(f"b{i}{name}"), model, switcher,
                                                   jpegs, args.frames), 2))
                client.flushdb()
        client.close()
    result = figure("edge.prefetch_vs_plain_ratio", round(median_ratio(rates["prefetch"], rates["plain"]), 3), "ratio",
                    machine, **rates, frames=args.frames)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefetch.json").write_text(json.dumps({result.name: result.to_json()}, indent=2, default=str))
    print(json.dumps({result.name: result.value, **rates}))


if __name__ == "__main__":
    main()

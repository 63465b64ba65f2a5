"""``ingest.cameras_per_core`` for the suite, with bench_ingest's own measurements.

The harder of bench_ingest's two clips (IP-camera-like: no B-frames, a keyframe every 2 s, so
every frame is decoded), 640x480 H.264 at 18 fps sampled to 2 fps. This process is pinned to one
core for the measurement and the redis-server to the other. The figure is the most cameras that
kept up in real time (``bench_ingest.measure_real_time``), starting at 80% of the single-thread
throughput estimate and stepping down by 25%.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_ingest import ClipSpec, RealTime, Throughput, make_clip, measure_real_time, measure_throughput
from common import Machine, figure

SPEC = ClipSpec("IP-camera-like (no B-frames, 2 s GOP)", False)


@dataclass(frozen=True)
class IngestResult:
    throughput: Throughput
    real_time: tuple[RealTime, ...]
    cameras_per_core: int  # 0 when no tried count kept up


def run_ingest(work: Path, quick: bool) -> IngestResult:
    from fallwatch.keys import Keys
    from fallwatch.redis import EmbeddedRedis, connect
    from fallwatch.settings import Settings

    work.mkdir(parents=True, exist_ok=True)
    clip = make_clip(work / "clip.mp4", 10 if quick else 30, SPEC.bframes)
    cores = os.sched_getaffinity(0)
    core = min(cores)
    with EmbeddedRedis(work / "redis", appendonly=False) as server:
        os.sched_setaffinity(server.proc.pid, (cores - {core}) or cores)
        os.sched_setaffinity(0, {core})
        try:
            settings = Settings(redis={"url": server.url}, ingest={"stream_maxlen": 500})
            keys = Keys(settings.redis.key_prefix)
            client = connect(settings.redis)
            throughput = measure_throughput(SPEC, clip, client, keys, settings, 1 if quick else 2, None)
            runs = real_time_runs(client, keys, settings, clip, throughput, quick)
            client.close()
        finally:
            os.sched_setaffinity(0, cores)
    kept = [r.cameras for r in runs if r.kept_up]
    return IngestResult(throughput, tuple(runs), max(kept, default=0))


def real_time_runs(client, keys, settings, clip: Path, throughput: Throughput, quick: bool) -> list[RealTime]:
    cameras = max(1, int(0.8 * throughput.cameras_per_core))
    runs = []
    for _ in range(2 if quick else 4):
        runs.append(measure_real_time(SPEC, clip, client, keys, settings, cameras, 4 if quick else 20))
        if runs[-1].kept_up:
            break
        cameras = max(1, int(cameras * 0.75))
    return runs


def figures(result: IngestResult, machine: Machine) -> list:
    return [figure("ingest.cameras_per_core", result.cameras_per_core, "cameras", machine, ">= 30",
                   lambda v: v >= 30, clip=SPEC.name, throughput=asdict(result.throughput),
                   real_time=[asdict(r) for r in result.real_time])]

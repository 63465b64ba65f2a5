"""How many 640x480 18 fps H.264 cameras one CPU core ingests in real time (sampled to 2 fps).

Two measurements, both with this process pinned to one core and a private redis-server on
another:

1. Throughput: the per-camera hot path (demux, decode with non-wanted frames skipped where
   the codec allows, sample, RGB, JPEG, pipelined XADD + counters) over a clip as fast as it
   goes. Estimate: video seconds / CPU seconds.
2. Real time: N file cameras through ``ingest.camera.run_camera`` (threads, buffers, pacing),
   N = 80% of the throughput estimate (or ``--cameras``), for ``--seconds``. A camera
   keeps up when it published its expected share of frames; the core's busy fraction shows
   the headroom. Runs step down by 25% until the cameras keep up; the result is the most
   cameras that did, on the harder of the two clips.

    .venv/bin/python bench/bench_ingest.py --out bench/results/ingest [--profile]

Writes ``ingest.json`` and ``ingest.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from fallwatch import logging as fw_logging
from fallwatch.keys import Keys
from fallwatch.redis import EmbeddedRedis
from fallwatch.settings import Settings
from ingest.camera import run_camera
from ingest.publisher import Publisher
from ingest.records import FrameRecord
from ingest.sampling import FpsSampler
from ingest.sources import AvSource

WIDTH, HEIGHT, SRC_FPS, DST_FPS = 640, 480, 18, 2.0


@dataclass(frozen=True)
class ClipSpec:
    name: str
    bframes: bool  # x264 defaults (B-frames, long GOP) or an IP-camera-like stream (no B, 2 s GOP)


@dataclass(frozen=True)
class Throughput:
    clip: str
    video_s: float
    cpu_s: float
    wall_s: float
    packets: int
    decoded: int
    published: int
    cpu_ms_per_video_s: float
    cameras_per_core: float


@dataclass(frozen=True)
class RealTime:
    clip: str
    cameras: int
    seconds: float
    expected_per_camera: float
    min_published: int
    median_published: float
    dropped: int
    core_busy: float
    kept_up: bool


def make_clip(path: Path, seconds: float, bframes: bool, seed: int = 0) -> Path:
    """A camera-like scene: a still textured room and a person-sized block walking across.

    The texture is fixed (cameras denoise in time); per-frame random noise would make x264 drop
    its B-frames and inflate every frame."""
    import av

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    room = np.stack([90 + 60 * xx / WIDTH, 80 + 50 * yy / HEIGHT, 70 + 30 * np.sin(xx / 40)], -1)
    room[300:, :] *= 0.7  # floor
    room[120:260, 420:560] = (150, 110, 80)  # furniture
    room += rng.normal(0, 6.0, room.shape)  # fixed texture
    n = int(seconds * SRC_FPS)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=SRC_FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        # IP cameras: fixed GOP, no B-frames, no scene-cut keyframes
        params = "bframes=3:b-adapt=0:keyint=250" if bframes else f"bframes=0:keyint={2 * SRC_FPS}:scenecut=0"
        stream.options = {"preset": "veryfast", "x264-params": params}
        stream.codec_context.thread_count = 1  # no sliced threads: one slice per frame, like most cameras
        for i in range(n):
            img = room.copy()
            x = int((i * 6) % (WIDTH + 80)) - 80
            img[180:420, max(0, x):max(0, x + 70)] = (200, 60, 60)
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            frame.pts = i  # x264 reorders B-frames only with real timestamps
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def count_packets(path: Path) -> int:
    import av

    with av.open(str(path)) as c:
        return sum(1 for p in c.demux(video=0) if p.size)


def hot_path(path: Path, client, keys: Keys, settings: Settings, repeats: int) -> tuple[int, int]:
    """The camera's per-frame work, single-threaded: returns (decoded, published)."""
    stop = threading.Event()
    pub = Publisher(client, keys, "bench", settings.ingest, stop)
    decoded = seq = 0
    for _ in range(repeats):
        src = AvSource(str(path), max_width=settings.ingest.max_width)
        for raw in src.frames(FpsSampler(DST_FPS), stop):
            pub.handle(FrameRecord("bench", seq, time.time(), raw.rgb, None, raw.pts_s, 0, src.name))
            seq += 1
        decoded += src.decoded
    return decoded, pub.stats.items


def measure_throughput(spec: ClipSpec, path: Path, client, keys: Keys, settings: Settings,
                       repeats: int, profile_to: Path | None) -> Throughput:
    hot_path(path, client, keys, settings, 1)  # warm up: codecs, Redis connection
    profiler = None
    if profile_to is not None:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005)
        profiler.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    decoded, published = hot_path(path, client, keys, settings, repeats)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if profiler is not None:
        profiler.stop()
        profile_to.write_text(profiler.output_text(unicode=False, color=False, show_all=False))
    packets = count_packets(path) * repeats
    video_s = packets / SRC_FPS
    return Throughput(spec.name, round(video_s, 2), round(cpu, 3), round(wall, 3), packets, decoded, published,
                      round(1000 * cpu / video_s, 2), round(video_s / cpu, 1))


def measure_real_time(spec: ClipSpec, path: Path, client, keys: Keys, settings: Settings,
                      cameras: int, seconds: float) -> RealTime:
    data = settings.model_dump(mode="python")
    data["redis"]["url"] = settings.redis.url.get_secret_value()
    data["cameras"] = [{"id": f"c{i}", "url": str(path)} for i in range(cameras)]
    cfg = Settings(**data)
    client.flushdb()
    stop = threading.Event()
    threads = [threading.Thread(target=run_camera, args=(cfg, cam, client, keys, stop), daemon=True)
               for cam in cfg.cameras]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
        time.sleep(0.5 / cameras)  # spread the cameras over one sampling period
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(30)
    busy = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    published = [int(client.get(keys.camera_counter(c.id, "items")) or 0) for c in cfg.cameras]
    dropped = sum(int(client.get(keys.camera_counter(c.id, "dropped")) or 0) for c in cfg.cameras)
    expected = seconds * DST_FPS
    return RealTime(spec.name, cameras, seconds, expected, min(published), float(np.median(published)),
                    dropped, round(busy, 3), min(published) >= 0.9 * expected and dropped == 0)


def top_of_profile(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[:lines])


def write_report(out: Path, results: dict) -> None:
    (out / "ingest.json").write_text(json.dumps(results, indent=2))
    md = ["# Ingest benchmark: cameras per CPU core", "",
          f"{WIDTH}x{HEIGHT} H.264 at {SRC_FPS} fps, sampled to {DST_FPS:g} fps, JPEG q{results['jpeg_quality']}, "
          f"XADD to a private redis-server on another core. This process pinned to core {results['core']}.",
          f"Machine: {results['machine']}. Target: >= {results['target']} cameras per core.", "",
          "## Throughput (hot path, single thread)", "",
          "| clip | video s | CPU s | decoded / packets | items | CPU ms per video s | estimate: cameras per core |",
          "|---|---|---|---|---|---|---|"]
    for t in results["throughput"]:
        md.append(f"| {t['clip']} | {t['video_s']} | {t['cpu_s']} | {t['decoded']} / {t['packets']} | "
                  f"{t['published']} | {t['cpu_ms_per_video_s']} | **{t['cameras_per_core']}** |")
    md += ["", "## Real time (run_camera threads, paced file cameras)", "",
           "| clip | cameras | seconds | expected items per camera | min / median published | dropped | core busy | kept up |",
           "|---|---|---|---|---|---|---|---|"]
    for r in results["real_time"]:
        md.append(f"| {r['clip']} | {r['cameras']} | {r['seconds']} | {r['expected_per_camera']:g} | "
                  f"{r['min_published']} / {r['median_published']:g} | {r['dropped']} | {r['core_busy']:.0%} | "
                  f"{'yes' if r['kept_up'] else 'NO'} |")
    md += ["", f"`ingest.cameras_per_core` = **{results['cameras_per_core']}**: the most cameras that kept up in "
               f"real time on the harder clip (throughput alone suggests {results['throughput_estimate']}). "
               f"A run keeps up when every camera published >= 90% of its frames and nothing was dropped.",
           f"Load average during the run: {', '.join(f'{x:.1f}' for x in results['load_average'])} "
           f"(other processes on the same cores lower the real-time figure).", ""]
    if results.get("profile"):
        md += ["## Profile (pyinstrument, hot path)", "", "```", results["profile"], "```", ""]
    (out / "ingest.md").write_text("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="Folder for ingest.json and ingest.md.")
    ap.add_argument("--clip-seconds", type=float, default=30, help="Length of the generated clip.")
    ap.add_argument("--repeats", type=int, default=2, help="Throughput: passes over the clip.")
    ap.add_argument("--seconds", type=float, default=20, help="Real-time run length (<= clip length).")
    ap.add_argument("--cameras", type=int, default=0, help="Real-time run: first camera count (0 = 80%% of the throughput estimate).")
    ap.add_argument("--tries", type=int, default=4, help="Real-time runs per clip, each with 25%% fewer cameras.")
    ap.add_argument("--core", type=int, default=0, help="CPU core to pin this process to.")
    ap.add_argument("--profile", action="store_true", help="Profile the hot path with pyinstrument.")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    fw_logging.configure("warning", "console")
    cv2.setNumThreads(1)
    os.sched_setaffinity(0, {args.core})
    others = [c for c in range(os.cpu_count() or 1) if c != args.core] or [args.core]
    work = Path(tempfile.mkdtemp(prefix="fw-bench-"))
    specs = [ClipSpec("x264 default (B-frames)", True), ClipSpec("IP-camera-like (no B-frames, 2 s GOP)", False)]
    clips = {s.name: make_clip(work / f"clip{i}.mp4", args.clip_seconds, s.bframes) for i, s in enumerate(specs)}
    with EmbeddedRedis(work / "redis", appendonly=False) as server:
        os.sched_setaffinity(server.proc.pid, {others[0]})
        settings = Settings(redis={"url": server.url}, ingest={"stream_maxlen": 500})
        keys = Keys(settings.redis.key_prefix)
        from fallwatch.redis import connect

        client = connect(settings.redis)
        throughput = []
        profile = ""
        for i, spec in enumerate(specs):
            prof = args.out / "ingest_profile.txt" if args.profile and i == 0 else None
            throughput.append(measure_throughput(spec, clips[spec.name], client, keys, settings, args.repeats, prof))
            print(f"throughput {spec.name}: {throughput[-1]}", flush=True)
            if prof is not None:
                profile = top_of_profile(prof.read_text())
        estimate = min(t.cameras_per_core for t in throughput)
        real, sustained = [], {}
        for spec in specs:
            n = args.cameras or max(1, int(0.8 * estimate))
            for _ in range(args.tries):  # step down until the cameras keep up
                real.append(measure_real_time(spec, clips[spec.name], client, keys, settings, n,
                                              min(args.seconds, args.clip_seconds - 2)))
                print(f"real time {spec.name}: {real[-1]}", flush=True)
                if real[-1].kept_up:
                    sustained[spec.name] = n
                    break
                n = max(1, int(n * 0.75))
        per_core = min(sustained.get(s.name, 0) for s in specs)
        client.close()
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}",
        "core": args.core, "target": 30, "jpeg_quality": settings.ingest.jpeg_quality,
        "load_average": os.getloadavg(),
        "throughput": [asdict(t) for t in throughput], "real_time": [asdict(r) for r in real],
        "throughput_estimate": estimate, "sustained": sustained, "cameras_per_core": per_core, "profile": profile,
    }
    write_report(args.out, results)
    print(f"cameras per core: {per_core} -> {args.out / 'ingest.md'}")


if __name__ == "__main__":
    main()

"""Figures for sizing a deployment (docs/deploy.md): bytes per frame, Redis memory per entry, edge time per core.

1. JPEG bytes per frame: real 640x480 camera frames (UP-Fall clips, sampled at 2 fps) encoded the
   way ingest encodes them (``ingest.jpeg.encode_jpeg``, quality 85, max width 640); also the
   640x640 Elwaly images re-encoded at q85 for comparison.
2. Redis memory: a private redis-server; N frame entries XADDed with ``fallwatch.schemas.encode``
   (``MEMORY USAGE`` of the stream / N), one offloaded item's pixels hash, one EdgeVerdict entry.
3. Edge model time per core: full-size ViLT-B/32 VQA (public config, random weights) through
   ``EdgeModel`` with one torch thread, batch 8, fp32, bf16 and int8, as CPU time per image
   (robust to other processes on the cores; ``--no-vilt`` skips it).

    .venv/bin/python bench/bench_sizing.py --data ../shared/data --out bench/results/sizing

Writes ``sizing.json`` and ``sizing.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import redis
from tqdm import tqdm

from fallwatch.keys import Keys
from fallwatch.redis import EmbeddedRedis
from fallwatch.schemas import EdgeVerdict, FrameMessage, encode
from ingest.jpeg import encode_jpeg

from common import write_report

QUALITY = 85
MAX_WIDTH = 640
SAMPLE_FPS = 2.0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="the shared data folder (upfall/ and elwaly/)")
    ap.add_argument("--out", type=Path, required=True, help="directory for sizing.json / sizing.md")
    ap.add_argument("--entries", type=int, default=200, help="frame entries XADDed for the memory figure")
    ap.add_argument("--no-vilt", action="store_true", help="skip the ViLT timing")
    return ap.parse_args()


def sampled_frames(clip: Path, fps: float = SAMPLE_FPS) -> list[np.ndarray]:
    """RGB frames of a video, one every 1/fps seconds of stream time."""
    frames, next_t = [], 0.0
    with av.open(str(clip)) as container:
        for frame in container.decode(video=0):
            t = float(frame.time or 0.0)
            if t + 1e-6 >= next_t:
                frames.append(frame.to_ndarray(format="rgb24"))
                next_t += 1 / fps
    return frames


def summary(sizes: list[int]) -> dict[str, float]:
    arr = np.asarray(sizes)
    return {"n": int(arr.size), "mean": round(float(arr.mean())), "p50": round(float(np.percentile(arr, 50))),
            "p95": round(float(np.percentile(arr, 95))), "max": int(arr.max())}


def jpeg_sizes(data: Path) -> tuple[dict, dict, list[bytes]]:
    clips = sorted((data / "upfall").glob("*.mp4"))
    if not clips:
        raise SystemExit(f"no .mp4 clips under {data / 'upfall'}")
    upfall: list[bytes] = []
    for clip in tqdm(clips, desc="UP-Fall clips", unit="clip"):
        upfall += [encode_jpeg(f, QUALITY, MAX_WIDTH).data for f in sampled_frames(clip)]
    import cv2

    images = sorted((data / "elwaly" / "valid" / "images").glob("*.jpg"))
    elwaly = []
    for path in tqdm(images, desc="Elwaly images", unit="img"):
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        elwaly.append(len(encode_jpeg(rgb, QUALITY, 10_000).data))
    return summary([len(b) for b in upfall]), summary(elwaly), upfall


def redis_memory(jpegs: list[bytes], entries: int) -> dict[str, float]:
    keys = Keys()
    with tempfile.TemporaryDirectory(prefix="fw-size-") as tmp, EmbeddedRedis(tmp, appendonly=False) as server:
        client = redis.Redis.from_url(server.url)
        before = int(client.info("memory")["used_memory"])
        payload = 0
        for i in range(entries):
            img = jpegs[i % len(jpegs)]
            msg = FrameMessage.make("cam1", i, captured_at=time.time(), width=640, height=480)
            fields = encode(msg, [img])
            payload += sum(len(k) + len(v) for k, v in fields.items())
            client.xadd(keys.frames_stream(), fields)
        stream = int(client.memory_usage(keys.frames_stream(), samples=0))
        used = int(client.info("memory")["used_memory"]) - before
        client.hset(keys.pixels("cam1:0"), mapping={b"p0": jpegs[0]})
        pixels = int(client.memory_usage(keys.pixels("cam1:0"), samples=0)) - len(jpegs[0])
        v = EdgeVerdict(frame_id="room-12:123456", camera_id="room-12", captured_at=time.time(), p_fall=0.12,
                        is_fall=False, agreement=0.91, threshold=0.8, confident=True, edge_ms=45.0, worker="edge-1")
        for _ in range(entries):
            client.xadd(keys.verdicts_stream(), encode(v))
        verdict = int(client.memory_usage(keys.verdicts_stream(), samples=0)) / entries
        client.close()
    return {"entries": entries, "frame_payload_bytes_per_entry": round(payload / entries),
            "frame_stream_bytes_per_entry": round(stream / entries), "used_memory_bytes_per_entry": round(used / entries),
            "pixels_hash_overhead_bytes": pixels, "verdict_stream_bytes_per_entry": round(verdict)}


def cpu_ms_per_image(model, frames: list[np.ndarray], reps: int) -> tuple[float, float]:
    """Median CPU ms and wall ms per image over ``reps`` batches (after one warm-up).

    CPU time of this single-threaded process is what one core spends, even when other processes
    share the cores (wall time then grows, CPU time does not).
    """
    model.outputs(frames)
    cpu, wall = [], []
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        model.outputs(frames)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    n = len(frames)
    return round(1000 * float(np.median(cpu)) / n, 1), round(1000 * float(np.median(wall)) / n, 1)


def vilt_per_core(jpegs: list[bytes], reps: int = 5) -> list[dict[str, float]]:
    """CPU ms per image for ViLT-B/32 at batch 8 on one thread (bench_models' full-size builder)."""
    import sys

    import cv2
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_models import full_size_vilt  # noqa: PLC0415 - sibling benchmark script

    from edge_worker.tiny import ensure_tiny_vilt

    torch.set_num_threads(1)
    frames = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
              for b in jpegs[:8]]
    with tempfile.TemporaryDirectory(prefix="fw-vilt-") as cache:
        models = full_size_vilt(ensure_tiny_vilt(Path(cache)))
        rows = []
        for mode in tqdm(("fp32", "bf16", "int8"), desc="ViLT-B/32, 1 thread", unit="mode"):
            cpu_ms, wall_ms = cpu_ms_per_image(models[mode], frames, reps)
            rows.append({"mode": mode, "batch": len(frames), "threads": 1, "cpu_ms_per_image": cpu_ms,
                         "wall_ms_per_image": wall_ms})
    return rows


def markdown(report: dict) -> str:
    up, el, mem = report["jpeg_upfall_640x480"], report["jpeg_elwaly_640x640"], report["redis"]
    lines = [
        "# Sizing figures", "",
        f"Machine: {report['machine']}. Measured {report['date']}; load average at start "
        f"{report['load_average_at_start']} (other processes share the cores).", "",
        f"## JPEG bytes per frame (quality {QUALITY}, as ingest encodes)", "",
        "| frames | n | mean | p50 | p95 | max |", "|---|---|---|---|---|---|",
        f"| UP-Fall 640x480 camera video, {SAMPLE_FPS:g} fps samples | {up['n']} | {up['mean']} | {up['p50']} | "
        f"{up['p95']} | {up['max']} |",
        f"| Elwaly 640x640 photos | {el['n']} | {el['mean']} | {el['p50']} | {el['p95']} | {el['max']} |", "",
        f"## Redis memory ({mem['entries']} entries each)", "",
        f"- frames stream: {mem['frame_stream_bytes_per_entry']} bytes per entry (payload "
        f"{mem['frame_payload_bytes_per_entry']}; used_memory grew {mem['used_memory_bytes_per_entry']} per entry)",
        f"- pixels hash of one offloaded frame: JPEG size + {mem['pixels_hash_overhead_bytes']} bytes",
        f"- verdicts stream: {mem['verdict_stream_bytes_per_entry']} bytes per EdgeVerdict entry", "",
    ]
    if report.get("vilt"):
        lines += ["## ViLT-B/32 VQA on one thread (random weights, batch 8)", "",
                  "| mode | CPU ms per image | wall ms per image |", "|---|---|---|"]
        lines += [f"| {r['mode']} | {r['cpu_ms_per_image']} | {r['wall_ms_per_image']} |" for r in report["vilt"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    upfall, elwaly, jpegs = jpeg_sizes(args.data)
    report = {
        "machine": f"{platform.machine()}, CPython {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
        "jpeg_upfall_640x480": upfall, "jpeg_elwaly_640x640": elwaly,
        "redis": redis_memory(jpegs, args.entries),
        "vilt": None if args.no_vilt else vilt_per_core(jpegs),
    }
    write_report(args.out, "sizing", report, markdown(report))


if __name__ == "__main__":
    main()

"""End-to-end latency, capture to final verdict, on the edge-confident path.

N replayed cameras (default 16) at 1 fps each publish 640x640 frames (``ingest.replay.run_replay``,
threads of this process: read, JPEG-encode at q85, XADD) to a private redis-server. The edge worker
(``fallwatch edge``: full-size ViLT-B/32 in its best mode, and the switcher with threshold 0 so
every verdict is confident) and the alerts service (``fallwatch alerts``) run as their own
processes, as deployed. Latency is ``FinalVerdict.latency_ms`` (final verdict written minus
``FrameMessage.captured_at``) of every frame captured in the measured window, after a warm-up.

The edge keeps up when every frame captured in the window got its final verdict within a few
seconds of the cameras stopping, verdicts were decided at least 95% as fast as frames arrived,
and the latency did not grow over the window. With ``--step-down
N``, a run that falls behind is followed by runs with 2 cameras fewer each (the unread backlog is
dropped in between) until one keeps up; with ``--step-up N``, a run that keeps up is followed by
runs with 8 cameras more each until one falls behind (the headroom). ``e2e.cameras_kept_up`` is the
most cameras any run kept up with at p99 <= 1000 ms, and its latency.

    .venv/bin/python bench/bench_e2e.py --out bench/results/e2e [--quick] [--cameras 16] [--images DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from common import bench_start, edge_options, QUESTION, ROOT, Machine, figure, full_vilt_dir, load_average, \
    scene_jpegs, switcher_checkpoint

FALLWATCH = Path(sys.executable).with_name("fallwatch")
GRACE_S = 5.0


@dataclass(frozen=True)
class E2ERun:
    cameras: int
    fps: float
    mode: str
    batch: int
    threads: int
    seconds: float  # measured window
    frames: int  # captured in the window
    finals: int  # of those, with a final verdict
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    first_quarter_p50_ms: float | None
    last_quarter_p50_ms: float | None
    kept_up: bool
    decided_per_s: float  # final verdicts decided per second during the window (all cameras)
    load_average_1m: float


def write_config(path: Path, url: str, model_dir: Path, mode: str, batch: int, threads: int, ckpt: Path) -> Path:
    edge = {"model": str(model_dir), "questions": [QUESTION], "batch_size": batch, "threads": threads}
    edge.update({"dtype": "bf16"} if mode == "bf16" else {"int8": True})
    config = {
        "redis": {"url": url},
        "ingest": {"stream_maxlen": 20_000},
        "edge": edge,
        "switcher": {"checkpoint": str(ckpt), "threshold": 0.0},  # every verdict confident
        "metrics": {"enabled": False, "heartbeat_s": 0.5},
        "logging": {"level": "warning", "format": "json"},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def start_role(config: Path, log: Path, *args: str, nice: int = 0, threads: int = 0) -> subprocess.Popen:
    """``fallwatch -c CONFIG ARGS`` with its output in ``log``; ``nice`` and ``threads`` (OpenMP
    threads) for a role that stands in for another machine's (the cloud worker beside the edge)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALLWATCH_")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    prefix = ["nice", "-n", str(nice)] if nice else []
    with log.open("wb") as out:
        return subprocess.Popen([*prefix, str(FALLWATCH), "-c", str(config), *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def stop_roles(procs: Iterable[subprocess.Popen]) -> None:
    """SIGTERM to every role at once, then wait for each (killed after 20 s): they shut down side by side."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_roles(client, keys, procs: dict[str, subprocess.Popen], logs: Path, timeout_s: float = 120) -> None:
    """Until every role has a heartbeat (it is loaded and serving); a role that exits is an error."""
    deadline = time.monotonic() + timeout_s
    kinds = Counter(role.rstrip("0123456789") for role in procs)  # edge, edge1: two edge workers
    while time.monotonic() < deadline:
        for role, proc in procs.items():
            if proc.poll() is not None:
                tail = (logs / f"{role}.log").read_text()[-3000:]
                raise RuntimeError(f"{role} exited with {proc.returncode}:\n{tail}")
        if all(len(client.keys(keys.heartbeat_pattern(kind))) >= n for kind, n in kinds.items()):
            return
        time.sleep(0.2)
    raise RuntimeError(f"roles not serving after {timeout_s} s (logs in {logs})")


@contextmanager
def serving(client, keys, procs: dict[str, subprocess.Popen], logs: Path) -> Iterator[dict[str, subprocess.Popen]]:
    """``procs`` once every one is serving (see :func:`wait_for_roles`); stopped on the way out."""
    try:
        wait_for_roles(client, keys, procs, logs)
        yield procs
    finally:
        stop_roles(procs.values())


def image_items(folder: Path, jpegs: list[bytes]):
    from fallwatch.datasets import LabeledImage

    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i, data in enumerate(jpegs):
        path = folder / f"frame{i:03d}.jpg"
        path.write_bytes(data)
        items.append(LabeledImage(id=path.stem, path=path, fall=None, group=path.stem))
    return items


def folder_items(folder: Path, limit: int = 64):
    from fallwatch.datasets import LabeledImage

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg"})[:limit]
    if not files:
        raise SystemExit(f"no .jpg images in {folder}")
    return [LabeledImage(id=p.stem, path=p, fall=None, group=p.stem) for p in files]


def run_cameras(settings, client, keys, items, cameras: int, fps: float, stop: threading.Event,
                tag: str = "") -> list[threading.Thread]:
    from ingest.replay import run_replay
    from ingest.sources import ImageListSource

    def camera(i: int) -> None:
        source = ImageListSource(items[i % len(items):] + items[:i % len(items)], name=f"bench{i}")
        run_replay(settings, source, client, keys, stop, fps=fps, loop=True, camera_id=f"{tag}cam{i:02d}")

    threads = []
    for i in range(cameras):
        t = threading.Thread(target=camera, args=(i,), name=f"cam{i:02d}", daemon=True)
        t.start()
        threads.append(t)
        time.sleep(1 / (fps * cameras))  # spread the cameras over one frame period
    return threads


def captured(client, keys, start: float, end: float) -> dict[str, float]:
    """frame id -> captured_at of every frame on the stream captured in [start, end)."""
    from fallwatch.schemas import FrameMessage, decode

    out, last = {}, "-"
    while True:
        entries = client.xrange(keys.frames_stream(), min=last, count=200)
        if last != "-":
            entries = entries[1:]
        if not entries:
            return out
        for _eid, fields in entries:
            msg, _ = decode(fields, expect=FrameMessage)
            if start <= msg.captured_at < end:
                out[msg.frame_id] = msg.captured_at
        last = entries[-1][0]


def final_latencies(client, keys, frames: dict[str, float]) -> dict[str, float]:
    from fallwatch.schemas import FinalVerdict, decode

    out = {}
    for _eid, fields in client.xrange(keys.final_stream()):
        msg, _ = decode(fields, expect=FinalVerdict)
        if msg.frame_id in frames:
            out.setdefault(msg.frame_id, msg.latency_ms)
    return out


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def decided_rate(client, keys, start: float, end: float) -> float:
    """Final verdicts decided per second in [start, end): on the edge-confident path, the edge's
    throughput (the verdicts stream itself is trimmed once the alerts service has consumed it)."""
    from fallwatch.schemas import FinalVerdict, decode

    decided = sum(1 for _eid, fields in client.xrange(keys.final_stream())
                  if start <= decode(fields, expect=FinalVerdict)[0].decided_at < end)
    return round(decided / (end - start), 2)


def summarise(frames: dict[str, float], latencies: dict[str, float], run: dict) -> E2ERun:
    order = sorted(frames, key=frames.get)
    done = [latencies[f] for f in order if f in latencies]
    quarter = max(1, len(order) // 4)
    first = [latencies[f] for f in order[:quarter] if f in latencies]
    last = [latencies[f] for f in order[-quarter:] if f in latencies]
    first_p50, last_p50 = pct(first, 50), pct(last, 50)
    steady = first_p50 is not None and last_p50 is not None and last_p50 <= 1.5 * first_p50 + 100
    steady = steady and run["decided_per_s"] >= 0.95 * run["cameras"] * run["fps"]  # verdicts as fast as frames
    return E2ERun(**run, frames=len(frames), finals=len(done), p50_ms=pct(done, 50), p95_ms=pct(done, 95),
                  p99_ms=pct(done, 99), max_ms=pct(done, 100), first_quarter_p50_ms=first_p50,
                  last_quarter_p50_ms=last_p50, kept_up=bool(done) and len(done) == len(frames) and steady,
                  load_average_1m=load_average()[0])


@dataclass(frozen=True)
class Trial:
    cameras: int
    fps: float
    warmup_s: float
    window_s: float


def trial(client, keys, settings, items, spec: Trial, tag: str, run: dict) -> E2ERun:
    """Cameras ``{tag}c00..`` replayed for warm-up + window; latencies of the frames captured in the window."""
    stop = threading.Event()
    cams = run_cameras(settings, client, keys, items, spec.cameras, spec.fps, stop, tag)
    start = time.time() + spec.warmup_s
    time.sleep(spec.warmup_s + spec.window_s)
    end = time.time()
    stop.set()
    for t in cams:
        t.join(10)
    frames = captured(client, keys, start, end)
    rate = decided_rate(client, keys, start, end)
    deadline = time.monotonic() + GRACE_S
    latencies = final_latencies(client, keys, frames)
    while len(latencies) < len(frames) and time.monotonic() < deadline:
        time.sleep(0.25)
        latencies = final_latencies(client, keys, frames)
    info = {"cameras": spec.cameras, "fps": spec.fps, "seconds": spec.window_s, "decided_per_s": rate}
    return summarise(frames, latencies, run | info)


def discard_backlog(client, keys, timeout_s: float = 30) -> None:
    """Before the next trial: drop the frames the edge has not read (XTRIM MAXLEN 0) and wait for
    the batch it is scoring to be acknowledged, so a trial never inherits the last one's backlog."""
    stream = keys.frames_stream()
    client.xtrim(stream, maxlen=0)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        group = next(g for g in client.xinfo_groups(stream) if g["name"].decode() == keys.edge_group())
        if group["pending"] == 0:
            return
        time.sleep(0.25)


STEP_UP = 8  # cameras added per step-up trial
STEP_DOWN = 2  # cameras removed per step-down trial


def next_cameras(runs: list[E2ERun], step_down: int, step_up: int) -> int | None:
    """Camera count of the next trial, or None when done. The first trial sets the direction: if it
    kept up, up to ``step_up`` trials with 8 cameras more each until one falls behind (headroom);
    if not, up to ``step_down`` trials with 2 fewer each until one keeps up."""
    first, last, done = runs[0], runs[-1], len(runs) - 1
    if first.kept_up:
        return last.cameras + STEP_UP if last.kept_up and done < step_up else None
    if last.kept_up or last.cameras == 1 or done >= step_down:
        return None
    return max(1, last.cameras - STEP_DOWN)


def run_e2e(cache: Path, work: Path, quick: bool, mode: str, batch: int, cameras: int = 16, fps: float = 1.0,
            threads: int = 0, images: Path | None = None, seconds: float | None = None,
            step_down: int = 0, step_up: int = 0) -> list[E2ERun]:
    """Roles started once; a trial at ``cameras``, then more or fewer cameras (see ``next_cameras``)."""
    import redis

    from fallwatch.keys import Keys
    from fallwatch.redis import EmbeddedRedis
    from fallwatch.settings import load_settings

    spec = Trial(cameras, fps, 2.0 if quick else 5.0, seconds or (3.0 if quick else 30.0))
    model_dir = full_vilt_dir(cache)
    ckpt = switcher_checkpoint(work / "switcher", str(model_dir), [QUESTION], 1536)
    items = folder_items(images) if images else image_items(work / "frames", scene_jpegs(32))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs: list[E2ERun] = []
    with EmbeddedRedis(work / "redis", appendonly=False) as server:
        config = write_config(work / "e2e.yaml", server.url, model_dir, mode, batch, threads, ckpt)
        settings = load_settings(config)
        keys = Keys(settings.redis.key_prefix)
        client = redis.Redis.from_url(server.url)
        procs = {"edge": start_role(config, logs / "edge.log", "edge", "--name", "edge-bench"),
                 "alerts": start_role(config, logs / "alerts.log", "alerts", "--no-notify", "--name", "alerts-bench")}
        with serving(client, keys, procs, logs):
            while True:
                runs.append(trial(client, keys, settings, items, spec, f"t{len(runs)}",
                                  {"mode": mode, "batch": batch, "threads": threads}))
                more = next_cameras(runs, step_down, step_up)
                if more is None:
                    break
                discard_backlog(client, keys)
                spec = Trial(more, fps, spec.warmup_s, spec.window_s)
        client.close()
    return runs


def figures(runs: list[E2ERun], machine: Machine) -> list:
    """The first run (the asked-for camera count) gives the figures; step-up or step-down runs go in
    the details, and ``e2e.cameras_kept_up`` is the most cameras any run kept up with at p99 <= 1000 ms."""
    run = runs[0]
    kept = [r for r in runs if r.kept_up and (r.p99_ms or 1e9) <= 1000]
    details = asdict(run) | {"most_cameras_kept_up": max((r.cameras for r in kept), default=None),
                             "other_runs": [asdict(r) for r in runs[1:]]}
    most = max(kept, key=lambda r: r.cameras, default=None)
    figs = [
        figure("e2e.latency_ms_p50", run.p50_ms, "ms", machine, **details),
        figure("e2e.latency_ms_p99", run.p99_ms, "ms", machine, "<= 1000 with the edge keeping up",
               lambda v: v <= 1000 and run.kept_up, cameras=run.cameras, kept_up=run.kept_up),
    ]
    if len(runs) > 1:
        figs.append(figure("e2e.cameras_kept_up", most.cameras if most else 0, "cameras at 1 fps", machine,
                           f">= {run.cameras} with p99 <= 1000 ms",
                           lambda v: v >= run.cameras and most is not None and (most.p99_ms or 1e9) <= 1000,
                           p50_ms=most.p50_ms if most else None, p99_ms=most.p99_ms if most else None))
    return figs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for e2e.json")
    ap.add_argument("--quick", action="store_true", help="3 s window instead of 30 s")
    edge_options(ap)
    ap.add_argument("--threads", type=int, default=0, help="edge.threads (0: torch default)")
    ap.add_argument("--cameras", type=int, default=16, help="replayed cameras at 1 fps")
    ap.add_argument("--seconds", type=float, default=None, help="measured window")
    ap.add_argument("--step-down", type=int, default=0, help="if the edge falls behind: up to N runs with 2 cameras fewer each")
    ap.add_argument("--step-up", type=int, default=0, help="if the edge keeps up: up to N runs with 8 cameras more each")
    ap.add_argument("--images", type=Path, help="folder of 640x640 .jpg frames (default: drawn scenes)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    machine = bench_start()
    with tempfile.TemporaryDirectory(prefix="fw-bench-") as tmp:
        runs = run_e2e(args.cache, Path(tmp), args.quick, args.mode, args.batch, args.cameras, threads=args.threads,
                       images=args.images, seconds=args.seconds, step_down=args.step_down,
                       step_up=args.step_up)
    result = {f.name: f.to_json() for f in figures(runs, machine)}
    (args.out / "e2e.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps([asdict(r) for r in runs], indent=2))


if __name__ == "__main__":
    main()

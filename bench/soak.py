"""Soak: many replayed cameras through the whole pipeline for minutes; nothing lost, no leak.

N cameras (``fallwatch replay --loop``, one process each) at F fps feed one or more edge
workers (tiny ViLT + a switcher calibrated by Dual-Model Distillation on synthetic data), a cloud
worker (tiny LLaVA-NeXT-Video) and the alerts service, every role a ``python -m fallwatch``
process under :class:`fallwatch.supervisor.Supervisor`, on an embedded redis-server (AOF).
When the time is up the replays stop, the pipeline drains, and the report counts:

- frames in (the replays' counters) against final verdicts out: lost (must be 0), duplicates;
- who decided (edge, cloud, timeout fallback) and latency;
- per role: peak RSS (the kernel's high-water mark) and RSS growth from the end of the warm-up
  to the end of the run; Redis memory (INFO memory) at the start and at the end.

    .venv/bin/python bench/soak.py --out bench/results/soak             # 16 cameras, 2 fps, 10 min
    .venv/bin/python bench/soak.py --out bench/results/soak --quick     # 1 minute

Writes ``soak.json`` and ``soak.md`` to ``--out``; exit 1 when a frame was lost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import redis
from tqdm import tqdm

from fallwatch.demo import DemoConfig, prepare
from fallwatch.keys import CameraCounter, Keys
from fallwatch.redis import EmbeddedRedis
from fallwatch.schemas import FinalVerdict, decode
from fallwatch.streams import job_queue
from fallwatch.supervisor import RoleSpec, Supervisor, child_env, fallwatch_argv

KEYS = Keys()


@dataclass(frozen=True)
class SoakConfig:
    out: Path
    work: Path = Path(".fallwatch/soak")   # synthetic data, switcher, Redis files
    cameras: int = 16
    fps: float = 2.0
    minutes: float = 10.0
    edge_workers: int = 1
    switcher: Path | None = None     # a calibrated checkpoint; None: make one (DMD on synthetic data)
    cloud_timeout_s: float = 30.0
    sample_s: float = 5.0
    drain_s: float = 120.0


@dataclass
class RoleMemory:
    """RSS samples of one role (MB) and the kernel's high-water mark."""

    samples: list[tuple[float, float]] = field(default_factory=list)   # (seconds since start, RSS MB)
    peak_mb: float = 0.0
    restarts: int = 0

    def summary(self, warmup_s: float) -> dict[str, float | int]:
        after = [mb for t, mb in self.samples if t >= warmup_s] or [mb for _, mb in self.samples] or [0.0]
        return {"rss_start_mb": round(after[0], 1), "rss_end_mb": round(after[-1], 1),
                "rss_growth_mb": round(after[-1] - after[0], 1), "peak_rss_mb": round(self.peak_mb, 1),
                "restarts": self.restarts}


def proc_memory(pid: int) -> tuple[float, float] | None:
    """(RSS, peak RSS) in MB from /proc, or None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    kb = lambda name: float(fields.get(name, "0 kB").split()[0])  # noqa: E731
    return kb("VmRSS") / 1024, kb("VmHWM") / 1024


def redis_memory(client: redis.Redis) -> dict[str, float]:
    info = client.info("memory")
    return {"used_mb": round(info["used_memory"] / 2**20, 2), "rss_mb": round(info["used_memory_rss"] / 2**20, 2),
            "peak_mb": round(info["used_memory_peak"] / 2**20, 2)}


def camera_ids(n: int) -> list[str]:
    return [f"soak{i + 1:02d}" for i in range(n)]


def worker_specs(cfg: SoakConfig) -> list[RoleSpec]:
    specs = [RoleSpec(f"edge-{i + 1}", ("edge", "--name", f"edge-{i + 1}")) for i in range(cfg.edge_workers)]
    return specs + [RoleSpec("cloud", ("cloud", "--name", "cloud-1")),
                    RoleSpec("alerts", ("alerts", "--name", "alerts-1"))]


def replay_specs(cfg: SoakConfig, dataset: Path) -> list[RoleSpec]:
    return [RoleSpec(cam, ("replay", "--dataset", str(dataset), "--split", "valid", "--loop", "--fps", str(cfg.fps),
                           "--camera-id", cam), restart=False) for cam in camera_ids(cfg.cameras)]


def heartbeats(cfg: SoakConfig) -> list[str]:
    names = [("edge", f"edge-{i + 1}") for i in range(cfg.edge_workers)] + [("cloud", "cloud-1"), ("alerts", "alerts-1")]
    return [KEYS.heartbeat(role, name) for role, name in names]


def synthetic_dataset(work: Path, env: dict[str, str]) -> Path:
    """The synthetic YOLO dataset the cameras replay (made once)."""
    data = work / "data"
    if not (data / "valid" / "images").is_dir():
        subprocess.run(fallwatch_argv(["dataset", "synth", "--out", str(data), "--clips", "0"]), env=env, check=True,
                       capture_output=True)
    return data


def soak_env(cfg: SoakConfig, redis_url: str, switcher: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FALLWATCH_")}
    env = child_env(redis_url, base)
    env.update({
        "FALLWATCH_EDGE__MODEL": "tiny", "FALLWATCH_CLOUD__MODEL": "tiny", "FALLWATCH_CLOUD__DEVICE": "cpu",
        "FALLWATCH_CLOUD__DTYPE": "fp32", "FALLWATCH_SWITCHER__CHECKPOINT": str(switcher.absolute()),
        "FALLWATCH_ALERTS__CLOUD_TIMEOUT_S": str(cfg.cloud_timeout_s), "FALLWATCH_METRICS__ENABLED": "false",
        "FALLWATCH_LOGGING__LEVEL": "warning",
    })
    return env


class Sampler:
    """Memory of every role (by supervisor name) and of redis-server."""

    def __init__(self, sups: list[Supervisor], redis_pid: int, t0: float):
        self.sups, self.redis_pid, self.t0 = sups, redis_pid, t0
        self.roles: dict[str, RoleMemory] = {}

    def sample(self) -> None:
        now = time.monotonic() - self.t0
        children = {name: child for sup in self.sups for name, child in sup.children.items()}
        pids = {name: (c.proc.pid if c.proc is not None else None) for name, c in children.items()}
        pids["redis-server"] = self.redis_pid
        for name, pid in pids.items():
            mem = proc_memory(pid) if pid else None
            if mem is None:
                continue
            rec = self.roles.setdefault(name, RoleMemory())
            rec.samples.append((round(now, 1), mem[0]))
            rec.peak_mb = max(rec.peak_mb, mem[1])
            if name in children:
                rec.restarts = children[name].restarts


def counters(client: redis.Redis, cameras: list[str]) -> dict[str, int]:
    def total(kind: CameraCounter) -> int:
        return sum(int(client.get(KEYS.camera_counter(c, kind)) or 0) for c in cameras)

    return {"frames_in": total("items"), "trimmed": total("trimmed"), "dropped": total("dropped"),
            "trimmed_pending": int(client.get(KEYS.frames_trimmed_pending()) or 0)}


def final_verdicts(client: redis.Redis) -> list[FinalVerdict]:
    return [decode(f, expect=FinalVerdict)[0] for _, f in client.xrange(KEYS.final_stream())]


def wait_until(cond, timeout_s: float, poll_s: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll_s)
    return cond()


def run_soak(cfg: SoakConfig) -> dict:
    work = cfg.work
    env0 = {k: v for k, v in os.environ.items() if not k.startswith("FALLWATCH_")}
    print(f"[1/3] synthetic data and a calibrated switcher (DMD) in {work}", flush=True)
    switcher = cfg.switcher or prepare(DemoConfig(workdir=work), env0)
    dataset = synthetic_dataset(work, env0)
    cams = camera_ids(cfg.cameras)
    with EmbeddedRedis(work / "redis", appendonly=True) as server:
        client = redis.Redis.from_url(server.url, socket_timeout=30)
        client.flushall()
        env = soak_env(cfg, server.url, switcher)
        workers, replays = Supervisor(worker_specs(cfg), env), Supervisor(replay_specs(cfg, dataset), env)
        stop = threading.Event()
        runners = [threading.Thread(target=workers.run, args=(stop,), daemon=True),
                   threading.Thread(target=replays.run, args=(stop,), daemon=True)]
        try:
            runners[0].start()
            if not wait_until(lambda: all(client.exists(k) for k in heartbeats(cfg)), 180, 0.5):
                raise RuntimeError("the workers did not come up within 180 s")
            redis_start = redis_memory(client)
            t0 = time.monotonic()
            sampler = Sampler([workers, replays], server.proc.pid, t0)
            print(f"[2/3] {cfg.cameras} cameras at {cfg.fps:g} fps for {cfg.minutes:g} min", flush=True)
            runners[1].start()
            _run_for(cfg, sampler, client, cams)
            _stop_replays(replays, cams)
            drained = wait_until(lambda: _decided(client) >= counters(client, cams)["frames_in"], cfg.drain_s)
            sampler.sample()
        finally:
            stop.set()
            for runner in runners:
                if runner.is_alive():
                    runner.join(120)
        result = _report(cfg, client, cams, sampler, redis_start, drained, time.monotonic() - t0)
        client.close()
    return result


def _run_for(cfg: SoakConfig, sampler: Sampler, client: redis.Redis, cams: list[str]) -> None:
    seconds = cfg.minutes * 60
    start = time.monotonic()
    with tqdm(total=int(seconds), unit="s", desc="soak") as bar:
        while (elapsed := time.monotonic() - start) < seconds:
            sampler.sample()
            c = counters(client, cams)
            bar.set_postfix(frames=c["frames_in"], final=_decided(client))
            bar.update(int(elapsed) - bar.n)
            time.sleep(min(cfg.sample_s, max(0.0, seconds - elapsed)))
        bar.update(int(seconds) - bar.n)


def _stop_replays(sup: Supervisor, cams: list[str]) -> None:
    for cam in cams:
        proc = sup.children[cam].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    wait_until(lambda: all(not sup.running(c) for c in cams), 30, 0.2)


def _decided(client: redis.Redis) -> int:
    return int(client.xlen(KEYS.final_stream()))


def _report(cfg: SoakConfig, client: redis.Redis, cams: list[str], sampler: Sampler, redis_start: dict,
            drained: bool, seconds: float) -> dict:
    c = counters(client, cams)
    got = final_verdicts(client)
    ids = [v.frame_id for v in got if v.camera_id in cams]
    unique = set(ids)
    latency = np.array([v.latency_ms for v in got]) if got else np.zeros(1)
    warmup_s = min(60.0, cfg.minutes * 60 * 0.2)
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "seconds": round(seconds, 1),
        "drained": drained,
        "frames_in": c["frames_in"],
        "final_verdicts": len(unique),
        "lost": c["frames_in"] - len(unique) - c["trimmed"] - c["trimmed_pending"],
        "duplicates": len(ids) - len(unique),
        "trimmed_by_design": c["trimmed"] + c["trimmed_pending"],
        "decided_by": dict(Counter(v.decided_by.value for v in got)),
        "offloaded": sum(v.offloaded for v in got),
        "latency_ms": {"p50": round(float(np.percentile(latency, 50)), 1),
                       "p99": round(float(np.percentile(latency, 99)), 1)},
        "dead_letters": int(client.xlen(KEYS.dead_letter_stream())),
        "roles": {name: mem.summary(warmup_s) for name, mem in sorted(sampler.roles.items())},
        "redis": {"start": redis_start, "end": redis_memory(client), "left": _left_over(client)},
        "warmup_s": warmup_s,
    }


def _left_over(client: redis.Redis) -> dict[str, int]:
    """What Redis still holds after the drain: kept pixels, stream lengths, queued cloud jobs."""
    return {"pixels_keys": sum(1 for _ in client.scan_iter(match=KEYS.pixels("*"), count=1000)),
            "frames_stream": int(client.xlen(KEYS.frames_stream())),
            "verdicts_stream": int(client.xlen(KEYS.verdicts_stream())),
            "final_stream": int(client.xlen(KEYS.final_stream())),
            "cloud_queue": job_queue(client, KEYS.cloud_queue()).count}


def markdown(r: dict) -> str:
    cfg = r["config"]
    lines = [
        f"# Soak: {cfg['cameras']} cameras at {cfg['fps']} fps for {cfg['minutes']} min",
        "",
        f"{r['machine']['cpus']} CPUs, Python {r['machine']['python']}; tiny models; "
        f"{cfg['edge_workers']} edge worker(s), 1 cloud worker, alerts; embedded Redis with AOF. "
        f"Run {r['seconds']} s including the drain ({'drained' if r['drained'] else 'NOT drained'}).",
        "",
        "| frames in | final verdicts | lost | duplicates | trimmed by design | offloaded | decided by | latency p50 / p99 |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['frames_in']} | {r['final_verdicts']} | {r['lost']} | {r['duplicates']} | {r['trimmed_by_design']} "
        f"| {r['offloaded']} | {', '.join(f'{k} {v}' for k, v in sorted(r['decided_by'].items()))} "
        f"| {r['latency_ms']['p50']} / {r['latency_ms']['p99']} ms |",
        "",
        f"Memory per process (RSS growth from {r['warmup_s']:g} s to the end; peak = kernel high-water mark):",
        "",
        "| process | peak RSS MB | RSS start MB | RSS end MB | growth MB | restarts |",
        "|---|---|---|---|---|---|",
    ]
    replays = [n for n in r["roles"] if n.startswith("soak")]
    for name, m in r["roles"].items():
        if name in replays[1:]:
            continue
        label = f"{name} (1 of {len(replays)} replays)" if name in replays else name
        lines.append(f"| {label} | {m['peak_rss_mb']} | {m['rss_start_mb']} | {m['rss_end_mb']} "
                     f"| {m['rss_growth_mb']} | {m['restarts']} |")
    rs, re_, left = r["redis"]["start"], r["redis"]["end"], r["redis"]["left"]
    lines += ["", f"Redis used memory: {rs['used_mb']} MB at the start, {re_['used_mb']} MB at the end "
                  f"(peak {re_['peak_mb']} MB; RSS {re_['rss_mb']} MB). Left at the end: "
                  + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in left.items())
                  + f". Dead letters: {r['dead_letters']}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="Folder for soak.json and soak.md.")
    ap.add_argument("--work", type=Path, default=Path(".fallwatch/soak"), help="Folder for data, switcher, Redis.")
    ap.add_argument("--cameras", type=int, default=16, help="Replayed cameras (one process each).")
    ap.add_argument("--fps", type=float, default=2.0, help="Frames per second per camera.")
    ap.add_argument("--minutes", type=float, default=10.0, help="How long the cameras stream.")
    ap.add_argument("--quick", action="store_true", help="A 1-minute run (overrides --minutes).")
    ap.add_argument("--edge-workers", type=int, default=1, help="Edge worker processes.")
    ap.add_argument("--switcher", type=Path, default=None, help="A calibrated switcher checkpoint to reuse.")
    ap.add_argument("--cloud-timeout", type=float, default=30.0, help="alerts.cloud_timeout_s.")
    args = ap.parse_args()
    cfg = SoakConfig(out=args.out.absolute(), work=args.work.absolute(), cameras=args.cameras, fps=args.fps,
                     minutes=1.0 if args.quick else args.minutes, edge_workers=args.edge_workers,
                     switcher=args.switcher, cloud_timeout_s=args.cloud_timeout)
    cfg.out.mkdir(parents=True, exist_ok=True)
    result = run_soak(cfg)
    (cfg.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (cfg.out / "soak.md").write_text(markdown(result))
    print("[3/3] " + markdown(result), flush=True)
    return 0 if result["lost"] == 0 and result["duplicates"] == 0 and result["drained"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Cameras per box on real footage: UP-Fall clips looped as N cameras, motion gating on and off.

The cameras are the UP-Fall clips in ``--upfall`` (default ``../shared/data/upfall`` beside the
checkout; the section is skipped with its reason when they are missing): mostly standing
(Activity7) and some walking (Activity6), as real rooms are mostly still, three standing cameras
to one walking. Each clip is decoded once by ingest's own ``AvSource`` and sampled to the camera
rate; each camera is a thread of this process feeding ``ingest.publisher.Publisher.handle`` on a
fixed schedule (motion gate with its keep-alive frame, JPEG q85, XADD), like a live camera: it
never waits for the edge. The edge workers (``fallwatch edge``, full-size ViLT-B/32 in the suite's
mode, switcher at threshold 0 so every verdict is the edge's; ``--edge-workers`` processes sharing
the cores' threads, the suite runs one per core) and the alerts service run as their own
processes, every role on the same two cores. With more than one edge worker, a full run also
alternates one worker with every thread against them on more ungated cameras than the box keeps
up (``upfall.edge_workers_speedup``: frames decided per second, saturated).

A run keeps up when every frame published in the window has its final verdict within a few
seconds of the end, verdicts are decided at least 95% as fast as frames were published, the
latency does not grow over the window, and the cameras kept their schedule. Trials step up by
``STEP`` cameras while they keep up at p99 <= 1000 ms, halve while they do not, and once one count
is kept and a larger one is not, bisect between the two (to within 2 cameras).

Two more cameras play the fall clips (Activity1 and Activity2) after a standing lead-in, with
gating on: the share of fall frames that reached the edge (of all of them, and of those the gate
saw change), and the time from the first fall frame's capture to its final verdict. With
``--quick`` they play the same frames (sampled at 1 fps) at 2 fps and lead in with 2 s of standing.

Features (on by default, off with ``--quick``): gated trials with audits, the live DMD store, a cloud budget,
the web role and MQTT enabled, alternating with the plain configuration (A B A B), for two figures:

* ``upfall.features_cameras_ratio``: the most cameras the features configuration keeps up over the
  plain one's: one pair at the plain configuration's most cameras kept up, and if the features
  configuration did not keep up there, one more pair at 95% of it (target >= 0.95);
* ``upfall.features_p99_ratio``: p99 with the features over p99 without, at 3/4 of those cameras (a
  load both carry, as the e2e section's 16 cameras: at the most kept up, p99 is queueing and
  swings 1.5-4x between two plain trials). Each side's latencies are pooled over ``FEATURE_PAIRS``
  pairs before the percentile, so the p99 rests on several hundred frames, not a handful, and its
  95% bootstrap interval over the pairs says how far another run could move it. The CPU seconds
  each process used in the trials say what the features cost the box.

    .venv/bin/python bench/bench_upfall.py --out bench/results/upfall [--quick] [--upfall DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from fallwatch.runtime import free_port
from common import bench_start, cpu_seconds, edge_options, QUESTION, ROOT, Machine, figure, full_vilt_dir, load_average, \
    median_ratio, switcher_checkpoint

DEFAULT_UPFALL = ROOT.parent / "shared" / "data" / "upfall"
CLIPS = {"fall1": "Activity1", "fall2": "Activity2", "walking": "Activity6", "standing": "Activity7"}
ROOM_MIX = ("standing", "standing", "standing", "walking")  # camera i plays ROOM_MIX[i % 4]
FPS = 1.0
STEP = 8
QUICK_FALL_FPS = 2.0  # --quick plays the fall clips' frames twice as fast: the same frames, half the wait
FEATURE_PAIRS = 4  # with/without-features pairs pooled for the p99 ratio (one with --quick --features)
FEATURE_LOAD = 0.75  # the p99 ratio's cameras, of the most kept up
LEAD_IN_S = 8.0  # standing footage before a fall clip, so the gate has a still scene to compare with


@dataclass(frozen=True)
class Frame:
    rgb: object  # HxWx3 uint8
    fall: bool


def find_clips(folder: Path) -> dict[str, Path]:
    """The four UP-Fall clips by role; SystemExit with the reason if any is missing."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no UP-Fall folder at {folder} (pass --upfall DIR)")
    found = {}
    for role, activity in CLIPS.items():
        hits = sorted(folder.glob(f"*_{activity}_*.mp4"))
        if not hits:
            raise FileNotFoundError(f"no UP-Fall {activity} clip in {folder}")
        found[role] = hits[0]
    return found


def decode_clip(path: Path, fps: float, fall: bool) -> list[Frame]:
    """The clip sampled to ``fps`` by ingest's own decoder."""
    from ingest.sampling import FpsSampler
    from ingest.sources import AvSource

    src = AvSource(str(path), max_width=1280, gt_fall=fall, name=path.stem)
    return [Frame(raw.rgb, fall) for raw in src.frames(FpsSampler(fps), threading.Event())]


def footage(folder: Path, fps: float, lead_in_s: float = LEAD_IN_S) -> dict[str, list[Frame]]:
    clips = find_clips(folder)
    out = {role: decode_clip(path, fps, role.startswith("fall")) for role, path in clips.items()}
    lead = out["standing"][: max(1, int(lead_in_s * fps))]
    for role in ("fall1", "fall2"):
        out[role] = lead + out[role]
    return out


# --- cameras -----------------------------------------------------------------------------------


@dataclass
class CameraLog:
    """What one camera thread did: per sampled frame (captured_at, fall, changed, published)."""
    camera_id: str
    frames: list[tuple[float, bool, bool, bool]] = field(default_factory=list)
    late_s: list[float] = field(default_factory=list)


def camera_loop(publisher, frames: list[Frame], fps: float, start: float, stop: threading.Event,
                log: CameraLog, gate) -> None:
    """Feed ``frames`` (looped) to ``publisher.handle`` at ``fps`` from monotonic time ``start``."""
    from ingest.records import FrameRecord

    k = 0
    while True:
        due = start + k / fps
        if stop.wait(max(0.0, due - time.monotonic())):
            return
        frame = frames[k % len(frames)]
        log.late_s.append(time.monotonic() - due)
        rec = FrameRecord(log.camera_id, k, time.time(), frame.rgb, frame.fall)
        changed = gate.moved(frame.rgb)
        published = publisher.handle(rec)
        log.frames.append((rec.captured_at, frame.fall, changed, published))
        k += 1


def start_cameras(settings, client, keys, plan: list[tuple[str, list[Frame], float]], gating: bool,
                  stop: threading.Event) -> tuple[list[CameraLog], list[threading.Thread]]:
    """A thread per camera of ``plan`` (camera id, frames, frames per second), started out of step."""
    from ingest.publisher import Publisher
    from ingest.sampling import MotionGate

    ing = settings.ingest
    logs, threads = [], []
    start = time.monotonic() + 0.2
    for i, (camera_id, frames, fps) in enumerate(plan):
        pub = Publisher(client, keys, camera_id, ing, stop, gating=gating, retry=settings.redis)
        log = CameraLog(camera_id)
        gate = MotionGate(ing.motion_threshold, ing.keepalive_s)  # the gate's own test, for the fall share
        t = threading.Thread(target=camera_loop, name=camera_id, daemon=True,
                             args=(pub, frames, fps, start + i / (FPS * len(plan)), stop, log, gate))
        t.start()
        logs.append(log)
        threads.append(t)
    return logs, threads


def camera_plan(shots: dict[str, list[Frame]], cameras: int, tag: str, falls: bool,
                fall_fps: float = FPS) -> list[tuple[str, list[Frame], float]]:
    """Room cameras at FPS, then (``falls``) the two fall cameras at ``fall_fps``."""
    plan = []
    for i in range(cameras):
        frames = shots[ROOM_MIX[i % len(ROOM_MIX)]]
        offset = (7 * i) % len(frames)  # cameras of one clip out of step with each other
        plan.append((f"{tag}cam{i:02d}", frames[offset:] + frames[:offset], FPS))
    if falls:
        plan += [(f"{tag}fall1", shots["fall1"], fall_fps), (f"{tag}fall2", shots["fall2"], fall_fps)]
    return plan


# --- one trial ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpfallRun:
    cameras: int
    gating: bool
    features: bool
    seconds: float
    sampled: int  # frames the room cameras sampled in the window
    published: int  # of those, put on the stream (the rest gated)
    finals: int
    p50_ms: float | None
    p99_ms: float | None
    first_quarter_p50_ms: float | None
    last_quarter_p50_ms: float | None
    decided_per_s: float
    published_per_s: float
    camera_late_p99_s: float
    kept_up: bool
    falls: dict | None
    load_average_1m: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds each process of the box used in the trial
    cpu_wall_s: float = 0.0  # the wall time cpu_s was counted over (warm-up and the wait for the last verdicts too)
    station_events: int | None = None  # live-stream events the caregiver station received in the trial
    latencies_ms: tuple[float, ...] = field(default=(), repr=False)  # every final's, for pooled percentiles


@dataclass(frozen=True)
class Trial:
    cameras: int
    gating: bool
    warmup_s: float
    window_s: float
    falls: bool = False
    features: bool = False
    fall_fps: float = FPS  # the fall cameras' frames, sampled at FPS, played this fast (quick: faster)


def window_finals(client, keys, frames: dict[str, float]) -> dict[str, tuple[float, float]]:
    """frame id -> (latency_ms, decided_at) of the final verdicts of ``frames``."""
    from fallwatch.schemas import FinalVerdict, decode

    out = {}
    for _eid, fields in client.xrange(keys.final_stream()):
        msg, _ = decode(fields, expect=FinalVerdict)
        if msg.frame_id in frames:
            out.setdefault(msg.frame_id, (msg.latency_ms, msg.decided_at))
    return out


def published_frames(client, keys, cameras: set[str], start: float, end: float) -> dict[str, float]:
    """frame id -> captured_at of the stream entries of ``cameras`` captured in [start, end)."""
    from bench_e2e import captured

    return {fid: at for fid, at in captured(client, keys, start, end).items() if fid.split(":")[0] in cameras}


def wait_finals(client, keys, frames: dict[str, float], grace_s: float) -> dict[str, tuple[float, float]]:
    deadline = time.monotonic() + grace_s
    finals = window_finals(client, keys, frames)
    while len(finals) < len(frames) and time.monotonic() < deadline:
        time.sleep(0.25)
        finals = window_finals(client, keys, frames)
    return finals


def fall_share(logs: list[CameraLog], finals_all: dict, fall_ids: dict[str, float]) -> dict:
    """Of the fall cameras' fall frames: how many reached the edge (a final verdict), of all and of
    those the gate saw change, and the seconds from the first fall frame's capture to its verdict."""
    out = {}
    for log in logs:
        fall = [(at, changed, pub) for at, is_fall, changed, pub in log.frames if is_fall]
        if not fall:
            continue
        at_to_id = {at: fid for fid, at in fall_ids.items() if fid.startswith(f"{log.camera_id}:")}
        first_at = fall[0][0]
        first = next((at for at, _c, pub in fall if pub and at_to_id.get(at) in finals_all), None)
        decided = finals_all[at_to_id[first]][1] if first is not None else None
        reached = [pub and at_to_id.get(at) in finals_all for at, _c, pub in fall]
        changed = [r for (_at, c, _p), r in zip(fall, reached) if c]
        out[log.camera_id] = {
            "fall_frames": len(fall), "reached_edge": sum(reached), "changed": len(changed),
            "changed_reached": sum(changed), "share_reached": round(sum(reached) / len(fall), 3),
            "share_changed_reached": round(sum(changed) / len(changed), 3) if changed else None,
            "first_fall_frame_to_verdict_s": round(decided - first_at, 3) if decided is not None else None,
            "first_fall_frame_reached": bool(reached[0]),
        }
    return out


def trial(client, keys, settings, shots, spec: Trial, tag: str) -> UpfallRun:
    from bench_e2e import decided_rate, pct

    stop = threading.Event()
    plan = camera_plan(shots, spec.cameras, tag, spec.falls, spec.fall_fps)
    logs, threads = start_cameras(settings, client, keys, plan, spec.gating, stop)
    start = time.time() + spec.warmup_s
    fall_s = max((len(f) / fps for c, f, fps in plan if c.endswith(("fall1", "fall2"))), default=0)
    time.sleep(max(spec.warmup_s + spec.window_s, fall_s + 1))
    end = time.time()
    stop.set()
    for t in threads:
        t.join(10)
    rooms = {c for c, *_ in plan[: spec.cameras]}
    frames = published_frames(client, keys, rooms, start, end)
    rate = decided_rate(client, keys, start, end)
    finals = wait_finals(client, keys, frames, 5.0)
    falls = None
    if spec.falls:
        fall_cams = {c for c, *_ in plan[spec.cameras:]}
        fall_ids = published_frames(client, keys, fall_cams, 0, end)
        falls = fall_share(logs[spec.cameras:], wait_finals(client, keys, fall_ids, 5.0), fall_ids)
    order = sorted(frames, key=frames.get)
    done = [finals[f][0] for f in order if f in finals]
    quarter = max(1, len(order) // 4)
    first = pct([finals[f][0] for f in order[:quarter] if f in finals], 50)
    last = pct([finals[f][0] for f in order[-quarter:] if f in finals], 50)
    sampled = sum(1 for log in logs[: spec.cameras] for at, *_ in log.frames if start <= at < end)
    late = pct([s for log in logs for s in log.late_s], 99) or 0.0
    published_rate = round(len(frames) / (end - start), 2)
    steady = first is not None and last is not None and last <= 1.5 * first + 100 and late <= 0.5
    kept = bool(done) and len(done) == len(frames) and steady and rate >= 0.95 * published_rate
    return UpfallRun(spec.cameras, spec.gating, spec.features, round(end - start, 1), sampled, len(frames), len(done),
                     pct(done, 50), pct(done, 99), first, last, rate, published_rate, round(late, 3), kept, falls,
                     load_average()[0], latencies_ms=tuple(done))


# --- roles -------------------------------------------------------------------------------------


def write_config(path: Path, url: str, model_dir: Path, mode: str, batch: int, ckpt: Path,
                 extra: dict | None = None, edge_workers: int = 1) -> Path:
    edge = {"model": str(model_dir), "questions": [QUESTION], "batch_size": batch,
            "threads": 0 if edge_workers == 1 else max(1, (os.cpu_count() or 1) // edge_workers)}
    edge.update({"dtype": "bf16"} if mode == "bf16" else {"int8": True})
    config = {
        "redis": {"url": url},
        "ingest": {"stream_maxlen": 20_000, "motion_gating": True},
        "edge": edge,
        "switcher": {"checkpoint": str(ckpt), "threshold": 0.0},  # every verdict the edge's
        "metrics": {"enabled": False, "heartbeat_s": 0.5},
        "logging": {"level": "warning", "format": "json"},
    }
    for section, values in (extra or {}).items():
        config[section] = {**config.get(section, {}), **values}
    path.write_text(yaml.safe_dump(config))
    return path


class Roles:
    """A redis-server and the roles of one configuration (edge, alerts; more with features)."""

    def __init__(self, work: Path, model_dir: Path, mode: str, batch: int, ckpt: Path, features: bool,
                 broker: Broker | None = None, edge_workers: int = 1):
        self.work, self.model_dir, self.mode, self.batch, self.ckpt = work, model_dir, mode, batch, ckpt
        self.features, self.broker, self.edge_workers = features, broker, edge_workers

    def __enter__(self):
        import redis

        from fallwatch.keys import Keys
        from fallwatch.redis import EmbeddedRedis
        from fallwatch.settings import load_settings

        self.server = EmbeddedRedis(self.work / "redis", appendonly=False).__enter__()
        extra = {"switcher": {"audit_fraction": 0.0}}
        self.station, self.web_port = None, free_port() if self.features else 0
        if self.features:
            extra = feature_config(self.broker.port if self.broker else None, station_users(self.work))
        config = write_config(self.work / "upfall.yaml", self.server.url, self.model_dir, self.mode, self.batch,
                              self.ckpt, extra, self.edge_workers)
        self.settings = load_settings(config)
        self.keys = Keys(self.settings.redis.key_prefix)
        self.client = redis.Redis.from_url(self.server.url)
        self.procs = start_roles(config, self.work / "logs", self.features, self.edge_workers, self.web_port)
        try:
            from bench_e2e import wait_for_roles

            wait_for_roles(self.client, self.keys, {r: p for r, p in self.procs.items() if r != "web"},
                           self.work / "logs")
            if self.features:
                self.station = Station(f"http://127.0.0.1:{self.web_port}", STATION_USER, STATION_PASSWORD).start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def pids(self) -> dict[str, int]:
        """The processes of this configuration on the box: its roles, its redis-server, its broker, and
        this one ("cameras": the camera threads, and the station where there is one)."""
        pids = {role: proc.pid for role, proc in self.procs.items()} | {"redis": self.server.proc.pid, "cameras": os.getpid()}
        return pids | ({"mosquitto": self.broker.pid} if self.features and self.broker else {})

    def __exit__(self, *exc) -> None:
        from bench_e2e import stop_roles

        stop_roles(getattr(self, "procs", {}).values())
        if hasattr(self, "client"):
            self.client.close()
        self.server.__exit__(None, None, None)


def start_roles(config: Path, logs: Path, features: bool, edge_workers: int = 1, web_port: int = 0) -> dict:
    from bench_e2e import start_role

    logs.mkdir(parents=True, exist_ok=True)
    procs = {f"edge{i or ''}": start_role(config, logs / f"edge{i or ''}.log", "edge", "--name", f"edge-upfall{i}")
             for i in range(edge_workers)}
    procs["alerts"] = start_role(config, logs / "alerts.log", "alerts", "--no-notify", "--name", "alerts-upfall")
    if features:
        # the cloud worker stands in for the GPU box: one thread at the lowest priority, so it takes
        # only CPU the edge box's roles leave idle
        procs["cloud"] = start_role(config, logs / "cloud.log", "cloud", "--name", "cloud-upfall", nice=19, threads=1)
        procs["web"] = start_role(config, logs / "web.log", "web", "--port", str(web_port))
    return procs


def feature_config(mqtt_port: int | None, users_file: Path) -> dict:
    """Audits (2% of edge-decided frames) answered by a cloud worker (tiny model on the CPU) that
    writes the live DMD store, a hard cloud budget, and MQTT to a private broker (the web role is
    started beside them, with a caregiver station signed in). Without features, audits are off
    (their default is on)."""
    extra: dict = {"switcher": {"audit_fraction": 0.02},
                   "cloud": {"model": "tiny", "device": "cpu", "dtype": "fp32",
                             "budget": {"mode": "hard", "hard_unit": "offloads", "hard_per_hour": 3600}},
                   "web": {"users_file": str(users_file)}}  # its port is given on its command line
    if mqtt_port:
        extra["mqtt"] = {"host": "127.0.0.1", "port": mqtt_port, "stats_period_s": 5}
    return extra


STATION_USER, STATION_PASSWORD = "station", "bench station password"


def station_users(work: Path) -> Path:
    """A users file with the one caregiver the bench's station signs in as."""
    from web.users import add_user

    path = work / "web-users.yaml"
    add_user(path, STATION_USER, "caregiver", STATION_PASSWORD)
    return path


class Station:
    """A caregiver station open on the web role, as on a care home's screen all day: signed in and
    reading the live stream (server-sent events) on a thread; ``events`` counts what it received."""

    def __init__(self, url: str, user: str, password: str):
        import http.cookiejar
        import urllib.request

        self.url, self.user, self.password, self.events = url, user, password, 0
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self.open = threading.Event()

    def start(self, timeout_s: float = 60.0) -> "Station":
        """Signed in (refused: the HTTP error at once) and reading, or an error within ``timeout_s``."""
        import urllib.error

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._sign_in()
                break
            except urllib.error.HTTPError:
                raise
            except OSError:  # the web role is still starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        threading.Thread(target=self._read, name="station", daemon=True).start()
        if not self.open.wait(timeout_s):
            raise TimeoutError(f"the caregiver station's live stream at {self.url} did not open")
        return self

    def _sign_in(self) -> None:
        import urllib.request

        token = json.loads(self.opener.open(f"{self.url}/api/login-token", timeout=5).read())["csrf"]
        body = json.dumps({"name": self.user, "password": self.password}).encode()
        self.opener.open(urllib.request.Request(f"{self.url}/api/login", body, method="POST", headers={
            "Content-Type": "application/json", "X-CSRF-Token": token}), timeout=5).read()

    def _read(self) -> None:
        try:
            with self.opener.open(f"{self.url}/api/stream", timeout=60) as stream:
                for line in stream:
                    self.open.set()
                    self.events += line.startswith(b"event:")
        except OSError:  # the web role stopped
            pass


@dataclass(frozen=True)
class Broker:
    port: int
    pid: int


@contextmanager
def mosquitto(work: Path) -> Iterator[Broker | None]:
    """A private Mosquitto broker on a free port (None when the binary is missing)."""
    import shutil
    import subprocess

    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        yield None
        return
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield Broker(port, proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


# --- the whole benchmark -----------------------------------------------------------------------


@dataclass(frozen=True)
class UpfallBench:
    gated: tuple[UpfallRun, ...]
    ungated: tuple[UpfallRun, ...]
    falls: UpfallRun | None
    features: tuple[tuple[UpfallRun, UpfallRun], ...]  # (without, with) pairs at the most kept up (and 95%)
    workers_ab: tuple[tuple[UpfallRun, UpfallRun], ...] = ()  # saturated: (one edge worker, edge_workers)
    edge_workers: int = 1
    skipped: str = ""
    features_load: tuple[tuple[UpfallRun, UpfallRun], ...] = ()  # (without, with) pairs at FEATURE_LOAD of it


def step_trials(roles, shots, first: Trial, tag: str, steps: int) -> list[UpfallRun]:
    """``first``, then up by STEP cameras while kept up at p99 <= 1 s, halving while not; once one
    count is kept and a larger one is not, bisect between them (to within 2 cameras)."""
    runs = [alone(roles, shots, first, f"{tag}0")]
    kept, failed = (first.cameras, None) if served(runs[0]) else (0, first.cameras)
    for i in range(steps):
        cameras = next_count(kept, failed)
        if cameras is None:
            break
        runs.append(alone(roles, shots, replace(first, cameras=cameras), f"{tag}{i + 1}"))
        kept, failed = (cameras, failed) if served(runs[-1]) else (kept, cameras)
    return runs


def served(run: UpfallRun) -> bool:
    return run.kept_up and (run.p99_ms or 1e9) <= 1000


def next_count(kept: int, failed: int | None) -> int | None:
    """The next camera count to try, given the most kept up and the fewest not (None: done)."""
    if failed is None:
        return kept + STEP
    if kept == 0:
        return failed // 2 or None
    middle = (kept + failed) // 2
    return middle if failed - kept > 2 else None


def warm_up(roles, shots, batch: int) -> None:
    """A few batches of the footage through the edge (its first passes at 640x480 are slow), unmeasured."""
    alone(roles, shots, Trial(2 * batch, False, 0.0, 2.0), "w")


def most_kept(runs) -> UpfallRun | None:
    kept = [r for r in runs if served(r)]
    return max(kept, key=lambda r: r.cameras, default=None)


def run_upfall(cache: Path, work: Path, quick: bool, mode: str, batch: int, folder: Path = DEFAULT_UPFALL,
               gated_cameras: int = 32, ungated_cameras: int = 16, steps: int | None = None,
               features: bool = True, edge_workers: int = 1, window_s: float | None = None) -> UpfallBench:
    """Gated trials (with the two fall cameras) stepping from ``gated_cameras``, ungated ones from
    ``ungated_cameras``; then, at the most gated cameras kept up, plain and with-features trials
    alternating (both sets of roles loaded once, each on its own redis-server)."""
    try:
        find_clips(folder)
    except FileNotFoundError as exc:
        return UpfallBench((), (), None, (), skipped=str(exc))
    pool = ThreadPoolExecutor(1)
    decoding = pool.submit(footage, folder, FPS, 2.0 if quick else LEAD_IN_S)  # decoded while the roles load
    pool.shutdown(wait=False)
    model_dir = full_vilt_dir(cache)
    ckpt = switcher_checkpoint(work / "switcher", str(model_dir), [QUESTION], 1536)
    warm, window = (1.0, 4.0) if quick else (5.0, 30.0)
    window = window_s or window
    steps = (0 if quick else 2) if steps is None else steps
    with ExitStack() as stack:
        roles = stack.enter_context(Roles(work / "plain", model_dir, mode, batch, ckpt, False,
                                          edge_workers=edge_workers))
        if features:
            broker = stack.enter_context(mosquitto(work / "mqtt"))
            rich = stack.enter_context(Roles(work / "features", model_dir, mode, batch, ckpt, True, broker,
                                             edge_workers))
        shots = decoding.result()
        for r in (roles, rich) if features else (roles,):
            warm_up(r, shots, batch)
        fall_fps = QUICK_FALL_FPS if quick else FPS
        gated = step_trials(roles, shots, Trial(gated_cameras, True, warm, window, falls=True, fall_fps=fall_fps),
                            "g", steps)
        ungated = step_trials(roles, shots, Trial(ungated_cameras, False, warm, window), "u", steps)
        best = most_kept(gated)
        spec = Trial(best.cameras if best else gated_cameras, True, warm, window)
        pairs, loaded = feature_trials(roles, rich, shots, spec, quick) if features else ((), ())
        saturated = min((r.cameras for r in ungated if not served(r)), default=ungated_cameras + STEP)
        ab = () if quick or edge_workers == 1 else \
            workers_ab(stack, roles, shots, Trial(saturated, False, warm, window), work, (model_dir, mode, batch, ckpt))
    falls = max((r for r in gated if r.falls is not None), key=lambda r: (r.kept_up, r.cameras), default=None)
    return UpfallBench(tuple(gated), tuple(ungated), falls, pairs, ab, edge_workers, features_load=loaded)


def feature_trials(plain: Roles, rich: Roles, shots, spec: Trial, quick: bool) -> tuple[tuple, tuple]:
    """Pairs (plain, features) at ``spec``'s cameras, and at 95% of them if the features did not keep
    up there; then FEATURE_PAIRS pairs at FEATURE_LOAD of them (windows of at most 20 s)."""
    def pair(trial: Trial, tag: str) -> tuple[UpfallRun, UpfallRun]:
        return tuple(alone(r, shots, replace(trial, features=r.features), f"{side}{tag}")
                     for side, r in (("a", plain), ("b", rich)))

    at_most = [pair(spec, "k0")]
    if not served(at_most[0][1]) and spec.cameras * 0.95 >= 2:
        at_most.append(pair(replace(spec, cameras=int(spec.cameras * 0.95)), "k1"))
    load = replace(spec, cameras=max(2, round(spec.cameras * FEATURE_LOAD)), window_s=min(spec.window_s, 20.0))
    return tuple(at_most), tuple(pair(load, f"l{i}") for i in range(1 if quick else FEATURE_PAIRS))


def workers_ab(stack: ExitStack, roles: Roles, shots, spec: Trial, work: Path, model: tuple,
               rounds: int = 2) -> tuple[tuple[UpfallRun, UpfallRun], ...]:
    """Frames decided per second by one edge worker with every thread against ``roles``' workers
    (one thread each), alternating on ``spec`` (more cameras than the box keeps up: saturated)."""
    one = stack.enter_context(Roles(work / "one-worker", *model, False))
    warm_up(one, shots, model[2])
    return tuple(tuple(alone(r, shots, spec, f"{tag}{i}") for tag, r in (("o", one), ("n", roles)))
                 for i in range(rounds))


def alone(roles: Roles, shots, spec: Trial, tag: str) -> UpfallRun:
    """A trial on ``roles`` with no backlog before it, and none left after it: the roles of another
    configuration loaded beside them stay idle while the next one is measured."""
    from bench_e2e import discard_backlog

    discard_backlog(roles.client, roles.keys)
    pids = roles.pids()
    before, started = cpu_seconds(pids), time.monotonic()
    try:
        events = roles.station.events if roles.station else 0
        run = trial(roles.client, roles.keys, roles.settings, shots, spec, tag)
        after = cpu_seconds(pids)
        return replace(run, cpu_s={name: round(after[name] - before[name], 2) for name in pids},
                       cpu_wall_s=round(time.monotonic() - started, 2),
                       station_events=roles.station.events - events if roles.station else None)
    finally:
        discard_backlog(roles.client, roles.keys)


def figures(bench: UpfallBench, machine: Machine) -> list:
    if bench.skipped:
        return [figure("upfall.cameras_kept_up_gated", None, "cameras at 1 fps", machine, ">= 32", None,
                       skipped=bench.skipped)]
    rows = []
    for name, runs, target in (("gated", bench.gated, 32), ("ungated", bench.ungated, None)):
        best = most_kept(runs)
        rows.append(figure(f"upfall.cameras_kept_up_{name}", best.cameras if best else 0, "cameras at 1 fps", machine,
                           f">= {target} at p99 <= 1000 ms" if target else "",
                           (lambda v: v >= 32) if target else None,
                           p99_ms=best.p99_ms if best else None, edge_workers=bench.edge_workers,
                           runs=[run_details(r) for r in runs]))
    falls = (bench.falls.falls if bench.falls else None) or {}
    changed = [v["share_changed_reached"] for v in falls.values() if v["share_changed_reached"] is not None]
    rows.append(figure("upfall.fall_changed_frames_reaching_edge", min(changed) if changed else None, "share",
                       machine, "1.0 (every frame that changes)", lambda v: v >= 1.0, per_clip=falls,
                       run=run_details(bench.falls) if bench.falls else None))
    if bench.features:
        rows.append(features_cameras_figure(bench.features, machine))
    if bench.features_load:
        rows.append(features_p99_figure(bench.features_load, machine))
    if bench.workers_ab:
        rows.append(figure("upfall.edge_workers_speedup",
                           round(median_ratio([n.decided_per_s for _o, n in bench.workers_ab],
                                              [o.decided_per_s for o, _n in bench.workers_ab]), 3), "x", machine,
                           edge_workers=bench.edge_workers, cameras=bench.workers_ab[0][0].cameras,
                           pairs=[[run_details(o), run_details(n)] for o, n in bench.workers_ab]))
    times = [v["first_fall_frame_to_verdict_s"] for v in falls.values() if v["first_fall_frame_to_verdict_s"] is not None]
    rows.append(figure("upfall.first_fall_frame_to_verdict_s", max(times) if times else None, "s", machine,
                       per_clip={k: v["first_fall_frame_to_verdict_s"] for k, v in falls.items()}))
    return rows


def run_details(run: UpfallRun) -> dict:
    """A trial as JSON, without its every latency."""
    return {k: v for k, v in asdict(run).items() if k != "latencies_ms"}


def features_cameras_figure(pairs: tuple[tuple[UpfallRun, UpfallRun], ...], machine: Machine):
    """The most cameras kept up with the features tried (all of them, or 95%) over the plain most."""
    most = pairs[0][0].cameras
    kept = [b.cameras for _a, b in pairs if served(b)]
    ratio = round(max(kept, default=0) / most, 3) if served(pairs[0][0]) else None  # None: plain fell behind too
    return figure("upfall.features_cameras_ratio", ratio, "ratio", machine,
                  ">= 0.95 (the cameras kept up with the features, of those without)", lambda v: v >= 0.95,
                  cameras=most, pairs=[[run_details(a), run_details(b)] for a, b in pairs])


def features_p99_figure(pairs: tuple[tuple[UpfallRun, UpfallRun], ...], machine: Machine):
    """p99 of the features trials' pooled latencies over the plain trials'; CPU each process used."""
    import numpy as np

    pooled = [[ms for pair in pairs for ms in pair[side].latencies_ms] for side in (0, 1)]
    p99 = [float(np.percentile(ms, 99)) if ms else None for ms in pooled]
    p50 = [float(np.percentile(ms, 50)) if ms else None for ms in pooled]
    ratio = round(p99[1] / p99[0], 3) if None not in p99 else None
    wall = sum(b.cpu_wall_s for _a, b in pairs)
    cpu = [cpu_totals([pair[side] for pair in pairs]) for side in (0, 1)]
    box_s = wall * (os.cpu_count() or 1)
    extra, beside = (cpu_sum(cpu[1], edge) - cpu_sum(cpu[0], edge) for edge in (True, False))
    return figure("upfall.features_p99_ratio", ratio, "ratio", machine, "<= 1.05", lambda v: v <= 1.05,
                  cameras=pairs[0][0].cameras, frames=[len(ms) for ms in pooled],
                  p99_ms=[round(v, 1) for v in p99 if v is not None],
                  ratio_ci95=ratio_interval([(a.latencies_ms, b.latencies_ms) for a, b in pairs])
                  if ratio is not None else None,
                  p50_ratio=round(p50[1] / p50[0], 3) if None not in p50 else None,
                  pairwise_p99_ratios=[round(b.p99_ms / a.p99_ms, 3) for a, b in pairs if a.p99_ms and b.p99_ms],
                  all_kept_up=all(r.kept_up for pair in pairs for r in pair), cpu_s_plain=cpu[0],
                  station_events=[b.station_events for _a, b in pairs],
                  cpu_s_features=cpu[1], features_share_of_box_cpu=round(extra / box_s, 4),
                  # without the edge workers, whose CPU at the same load moves by seconds between two
                  # plain trials (their threads spin while they wait for frames)
                  features_share_beside_edge=round(beside / box_s, 4),
                  pairs=[[run_details(a), run_details(b)] for a, b in pairs])


def ratio_interval(pairs: list[tuple[list[float], list[float]]], q: float = 99.0, draws: int = 2000) -> list[float]:
    """The 95% bootstrap interval of the pooled percentile-``q`` ratio (features over plain): the
    pairs are resampled with replacement, each kept whole (its two trials shared the machine's
    moment), then pooled as the figure pools them. The machine's speed moving between trials,
    not the frames within one, is what moves the ratio from one run to the next (seeded)."""
    import numpy as np

    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(draws):
        chosen = [pairs[i] for i in rng.integers(0, len(pairs), len(pairs))]
        plain, rich = ([ms for pair in chosen for ms in pair[side]] for side in (0, 1))
        ratios.append(np.percentile(rich, q) / np.percentile(plain, q))
    return [round(float(v), 3) for v in np.percentile(ratios, [2.5, 97.5])]


def cpu_sum(cpu: dict[str, float], edge: bool = True) -> float:
    """CPU seconds of every process in ``cpu``, or (``edge`` False) of all but the edge workers."""
    return sum(v for name, v in cpu.items() if edge or not name.startswith("edge"))


def cpu_totals(runs: list[UpfallRun]) -> dict[str, float]:
    out: dict[str, float] = {}
    for run in runs:
        for name, s in run.cpu_s.items():
            out[name] = round(out.get(name, 0.0) + s, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for upfall.json")
    ap.add_argument("--quick", action="store_true", help="4 s windows, no stepping, fall clips at 2 fps")
    ap.add_argument("--upfall", type=Path, default=DEFAULT_UPFALL, help="folder of the UP-Fall clips")
    edge_options(ap, batch=4)
    ap.add_argument("--gated", type=int, default=32, help="room cameras of the first gated trial")
    ap.add_argument("--ungated", type=int, default=16, help="room cameras of the first ungated trial")
    ap.add_argument("--features", action=argparse.BooleanOptionalAction, default=None,
                    help="the with/without features trials (default: on, off with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="step trials after the first (default 2, quick 0)")
    ap.add_argument("--edge-workers", type=int, default=1, help="edge worker processes (threads shared out)")
    ap.add_argument("--window", type=float, default=None, help="seconds measured per trial (default 30, quick 4)")
    args = ap.parse_args()
    machine = bench_start()
    with tempfile.TemporaryDirectory(prefix="fw-bench-") as tmp:
        bench = run_upfall(args.cache, Path(tmp), args.quick, args.mode, args.batch, args.upfall, args.gated,
                           args.ungated, args.steps, not args.quick if args.features is None else args.features,
                           args.edge_workers, args.window)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {f.name: f.to_json() for f in figures(bench, machine)}
    (args.out / "upfall.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({name: row["value"] for name, row in result.items()}, indent=2))


if __name__ == "__main__":
    main()

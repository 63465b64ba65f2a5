"""`fallwatch demo`: the whole system end to end on one machine, in a few minutes, offline.

1. make a synthetic dataset (images for distillation, clips to stream) — or use ``--dataset``;
2. Dual-Model Distillation: distill the train and valid splits, train the switcher, calibrate it;
3. run the live pipeline (edge, cloud, alerts with notifications to a local webhook, and a replay
   of the test clips as a camera) on an embedded Redis, printing alerts as they happen;
4. summarise what happened, from Redis: frames in, final verdicts, who decided, events,
   notifications delivered, latency and F1.

Every step runs as a ``fallwatch`` sub-command in its own process, as a user would run it, so the
core package imports none of the components.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
import structlog

from fallwatch.keys import Keys
from fallwatch.redis import EmbeddedRedis
from fallwatch.runtime import free_port
from fallwatch.schemas import AlertEvent, EventKind, EventType, FinalVerdict, decode
from fallwatch.supervisor import RoleSpec, Supervisor, child_env, fallwatch_argv
from fallwatch.webhook import WebhookReceiver

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path(".fallwatch/demo")   # everything the demo writes
    edge: str = "tiny"                         # edge model id / path / tiny
    cloud: str = "tiny"                        # cloud model id / path / tiny
    cloud_device: str = "cpu"
    dataset: Path | None = None                # YOLO dataset with train/valid splits (default: synthetic)
    clips: Path | None = None                  # labelled clips to stream (default: synthetic)
    fps: float = 4.0                           # replay rate of the clips
    clip_frames: int = 4                       # frames per clip item sent to the video model
    cloud_timeout_s: float = 20.0              # alerts falls back to the edge verdict after this
    timeout_s: float = 150.0                   # give up waiting for final verdicts after this
    seed: int = 0


def _run(args: list[str], env: dict[str, str], what: str, stdin: str | None = None) -> str:
    """Run one fallwatch sub-command; raise with its stderr when it fails."""
    log.info("demo_step", step=what)
    proc = subprocess.run(fallwatch_argv(args, log_format="json"), env=env, capture_output=True, text=True, input=stdin)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def prepare(cfg: DemoConfig, env: dict[str, str]) -> Path:
    """Data, distillation, switcher: returns the calibrated switcher checkpoint."""
    w = cfg.workdir
    data = cfg.dataset or w / "data"
    if cfg.dataset is None:
        _run(["dataset", "synth", "--out", str(data), "--seed", str(cfg.seed), "--clips", "0"], env, "synthetic images")
    if cfg.clips is None:
        _run(["dataset", "synth", "--out", str(w / "live"), "--seed", str(cfg.seed + 1), "--n", "3", "--copies", "1",
              "--clips", "8"], env, "synthetic clips")
    models = ["--edge", cfg.edge, "--cloud", cfg.cloud, "--cloud-device", cfg.cloud_device]
    for split in ("train", "valid"):
        _run(["distill", "--dataset", str(data), "--split", split, *models, "--out", str(w / "dmd" / split)],
             env, f"distill {split}")
    ckpt = w / "switcher"
    _run(["switcher", "train", "--train", str(w / "dmd" / "train"), "--val", str(w / "dmd" / "valid"),
          "--out", str(ckpt), "--seed", str(cfg.seed)], env, "switcher train")
    _run(["switcher", "calibrate", "--switcher", str(ckpt), "--dmd", str(w / "dmd" / "valid")], env, "calibrate")
    return ckpt


def live_env(cfg: DemoConfig, base: dict[str, str], redis_url: str, switcher: Path, webhook_url: str) -> dict[str, str]:
    env = child_env(redis_url, base)
    env.update({
        "FALLWATCH_EDGE__MODEL": cfg.edge,
        "FALLWATCH_CLOUD__MODEL": cfg.cloud,
        "FALLWATCH_CLOUD__DEVICE": cfg.cloud_device,
        "FALLWATCH_CLOUD__DTYPE": "fp32" if cfg.cloud_device == "cpu" else "bf16",
        "FALLWATCH_SWITCHER__CHECKPOINT": str(switcher.absolute()),
        "FALLWATCH_INGEST__CLIP__ENABLED": "true",
        "FALLWATCH_INGEST__CLIP__FRAMES": str(cfg.clip_frames),
        "FALLWATCH_ALERTS__CLOUD_TIMEOUT_S": str(cfg.cloud_timeout_s),
        "FALLWATCH_ALERTS__COOLDOWN_S": "2",
        "FALLWATCH_ALERTS__QUIET_S": "3",
        "FALLWATCH_NOTIFICATIONS__URLS": json.dumps([webhook_url]),
        "FALLWATCH_NOTIFICATIONS__RETRY_BASE_S": "0.2",
        "FALLWATCH_METRICS__ENABLED": "false",
        "FALLWATCH_LOGGING__LEVEL": "warning",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    })
    return env


def web_login(cfg: DemoConfig, env: dict[str, str]) -> dict[str, str] | None:
    """A one-time admin login for the caregiver station of this run (None without the web extra)."""
    users = (cfg.workdir / "web-users.yaml").absolute()
    users.unlink(missing_ok=True)
    password = secrets.token_urlsafe(12)
    try:
        _run(["web", "user", "add", "demo", "--role", "admin", "--password-stdin", "--file", str(users)], env,
             "web user", stdin=password + "\n")
    except RuntimeError as exc:
        print(f"  caregiver station not started: {str(exc).splitlines()[0]}", flush=True)
        return None
    port = free_port()
    return {"users_file": str(users), "port": str(port), "password": password,
            "url": f"http://127.0.0.1:{port}/"}


def _print_alert(message: dict[str, Any]) -> None:
    print(f"  notified: {message.get('title', '')} | {str(message.get('message', '')).splitlines()[0][:100]}", flush=True)


def _follow_alerts(client: redis.Redis, keys: Keys, stop: threading.Event) -> None:
    """Print events from the pub/sub channel as they happen."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.alerts_channel())
    try:
        while not stop.is_set():
            msg = pubsub.get_message(timeout=0.2)
            if msg and isinstance(msg.get("data"), bytes):
                try:
                    ev = AlertEvent.from_json(msg["data"])
                except ValueError:
                    continue
                conf = "" if ev.confidence is None else f" confidence={ev.confidence:.2f}"
                print(f"  alert {ev.type.value:6s} {ev.kind.value} camera={ev.camera_id}{conf} "
                      f"by={ev.decided_by.value if ev.decided_by else '-'}", flush=True)
    finally:
        pubsub.close()


def run_live(cfg: DemoConfig, base_env: dict[str, str], switcher: Path) -> dict[str, Any]:
    keys = Keys()
    camera = "demo-room"
    clips = cfg.clips or cfg.workdir / "live" / "clips"
    with EmbeddedRedis(cfg.workdir / "redis", appendonly=True) as server, WebhookReceiver(on_message=_print_alert) as hook:
        client = redis.Redis.from_url(server.url)
        client.flushall()
        env = live_env(cfg, base_env, server.url, switcher, hook.url())
        web = web_login(cfg, env)
        workers: tuple[str, ...] = ("edge", "cloud", "alerts")
        if web is not None:
            env.update({"FALLWATCH_WEB__USERS_FILE": web["users_file"], "FALLWATCH_WEB__PORT": web["port"]})
            workers += ("web",)
        sup = Supervisor([RoleSpec(role, (role,)) for role in workers], env, log_format="json")
        replay = RoleSpec("replay", ("replay", "--clips", str(clips), "--fps", str(cfg.fps), "--camera-id", camera),
                          restart=False)
        stop = threading.Event()
        follower = threading.Thread(target=_follow_alerts, args=(client, keys, stop), daemon=True)
        follower.start()
        runner = threading.Thread(target=sup.run, args=(stop,), daemon=True)
        started = time.monotonic()
        runner.start()
        try:
            _wait_for_workers(client, keys, workers, started + cfg.timeout_s)
            if web is not None:
                print(f"  caregiver station: {web['url']}  login: demo / {web['password']}  (this run only)", flush=True)
            sup.add(replay)  # the clock of every latency starts with the models loaded
            _wait_until_done(client, keys, sup, camera, started + cfg.timeout_s)
        finally:
            stop.set()
            runner.join(60)
            follower.join(5)
        if web is not None:
            Path(web["users_file"]).unlink(missing_ok=True)  # the login dies with the run
        summary = summarise(client, keys, camera, hook.count())
        summary["replay_exit_codes"] = sup.children["replay"].exit_codes
        summary["seconds"] = round(time.monotonic() - started, 1)
        client.close()
    return summary


def _ingested(client: redis.Redis, keys: Keys, camera: str) -> int:
    return int(client.get(keys.camera_counter(camera, "items")) or 0)


def _wait_for_workers(client: redis.Redis, keys: Keys, roles: tuple[str, ...], deadline: float) -> None:
    """Until every role has a heartbeat (its model is loaded and it is serving)."""
    while time.monotonic() < deadline:
        if all(next(client.scan_iter(match=keys.heartbeat_pattern(role)), None) for role in roles):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the workers did not all start within the time limit: {', '.join(roles)}")


def _wait_until_done(client: redis.Redis, keys: Keys, sup: Supervisor, camera: str, deadline: float) -> None:
    """Until the replay has finished, every item has a final verdict, and notifications went out."""
    settled_at = None
    while time.monotonic() < deadline:
        time.sleep(0.5)
        replay_done = bool(sup.children["replay"].exit_codes)
        finals = client.xlen(keys.final_stream())
        if not (replay_done and finals >= _ingested(client, keys, camera)):
            continue
        outbox_empty = client.xlen(keys.notify_outbox_stream()) == 0
        settled_at = settled_at or time.monotonic()
        if outbox_empty and time.monotonic() - settled_at > 1.0:
            return
    log.warning("demo_timeout", finals=client.xlen(keys.final_stream()), ingested=_ingested(client, keys, camera))


def summarise(client: redis.Redis, keys: Keys, camera: str, delivered: int) -> dict[str, Any]:
    finals = [decode(f, expect=FinalVerdict)[0] for _, f in client.xrange(keys.final_stream())]
    events = [decode(f, expect=AlertEvent)[0] for _, f in client.xrange(keys.alerts_stream())]
    by = Counter(v.decided_by.value for v in finals)
    unique = {v.frame_id for v in finals}
    latency = np.array([v.latency_ms for v in finals]) if finals else np.array([0.0])
    ingested = _ingested(client, keys, camera)
    return {
        "frames_ingested": ingested,
        "final_verdicts": len(unique),
        "duplicates": len(finals) - len(unique),
        "edge_final": by.get("edge", 0),
        "offloaded": sum(v.offloaded for v in finals),
        "cloud_verdicts": by.get("cloud", 0),
        "timeout_fallbacks": by.get("edge_timeout", 0) + by.get("edge_cloud_failed", 0),
        "events": sum(e.type == EventType.START and e.kind == EventKind.FALL for e in events),
        "notifications_delivered": delivered,
        "lost": ingested - len(unique),
        "latency_ms": {"p50": round(float(np.percentile(latency, 50)), 1),
                       "p99": round(float(np.percentile(latency, 99)), 1)},
        "f1": finals_f1(finals),
    }


def format_summary(summary: dict[str, Any], tiny: bool) -> str:
    """The summary for people: counts in the replay's units (stream items), and what F1 means here."""
    s, lat = summary, summary["latency_ms"]
    f1 = "n/a" if s["f1"] is None else f"{s['f1']:.2f}"
    note = (" (the tiny models have random weights: this shows the pipeline runs, not detection quality)"
            if tiny else "")
    return "\n".join([
        f"stream items ingested {s['frames_ingested']}, final verdicts {s['final_verdicts']} "
        f"(edge {s['edge_final']}, cloud {s['cloud_verdicts']}, timeouts {s['timeout_fallbacks']}), "
        f"lost {s['lost']}, duplicates {s['duplicates']}",
        f"fall events {s['events']}, notifications delivered {s['notifications_delivered']}, "
        f"latency p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms",
        f"F1 against the clips' labels {f1}{note}",
    ])


def finals_f1(finals: list[FinalVerdict]) -> float | None:
    scored = [(v.is_fall, v.gt_fall) for v in finals if v.gt_fall is not None]
    tp = sum(p and t for p, t in scored)
    fp = sum(p and not t for p, t in scored)
    fn = sum(t and not p for p, t in scored)
    return None if not scored or 2 * tp + fp + fn == 0 else round(2 * tp / (2 * tp + fp + fn), 4)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALLWATCH_")}
    env["PYTHONUNBUFFERED"] = "1"
    print("[1/3] data and Dual-Model Distillation (distill → switcher train → calibrate)", flush=True)
    switcher = prepare(cfg, env)
    print("[2/3] live pipeline: replay → edge → cloud → alerts → webhook", flush=True)
    summary = run_live(cfg, env, switcher)
    print("[3/3] summary", flush=True)
    return summary

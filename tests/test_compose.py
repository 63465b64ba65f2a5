"""Deployment files: compose files through the real docker-compose parser, the example config through
``fallwatch config validate``, and the split deployment's TLS + ACL Redis command run for real."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis
import yaml
from rq import Queue, SimpleWorker
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from typer.testing import CliRunner

from fallwatch.cli import HEALTH_CHECKS, app
from fallwatch.keys import Keys
from fallwatch.redis import RedisUnavailable, check, connect
from fallwatch.settings import RedisSettings
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose"
ENV_EXAMPLE = COMPOSE / ".env.example"
CONFIG_EXAMPLE = COMPOSE / "config.example.yaml"
FILES = ["docker-compose.yml", "docker-compose.site.yml", "docker-compose.gpu.yml"]
FALLWATCH_SERVICES = {"ingest", "edge", "cloud", "alerts", "web"}
DOCKER_COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None, reason="docker-compose is not installed (scripts/install-test-deps.sh installs it)"
)
REDIS7 = Path("/usr/bin/redis-server")


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def compose(file: str, *args: str, env_file: Path = ENV_EXAMPLE, env: dict[str, str] | None = None):
    """Run docker-compose on a file with a clean environment (only PATH, HOME and ``env``)."""
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    return subprocess.run([DOCKER_COMPOSE, "-f", str(COMPOSE / file), "--env-file", str(env_file), *args],
                          capture_output=True, text=True, env=clean, timeout=60, cwd=ROOT)


def config_references() -> set[str]:
    """Environment variables the example config references as ${NAME} (comments ignored)."""
    def strings(node):
        if isinstance(node, dict):
            return [s for v in node.values() for s in strings(v)]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [node] if isinstance(node, str) else []

    data = yaml.safe_load(CONFIG_EXAMPLE.read_text())
    return {name for text in strings(data) for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text)}


@functools.lru_cache(maxsize=None)
def resolved(file: str) -> dict:
    res = compose(file, "config")
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


# --- compose files through docker-compose 1.29 -------------------------------------------------------


@needs_compose
@pytest.mark.parametrize("file", FILES)
def test_compose_file_is_valid(file):
    res = compose(file, "config", "-q")
    assert res.returncode == 0, f"{file}: {res.stderr}"


@needs_compose
@pytest.mark.parametrize("file", ["docker-compose.yml", "docker-compose.site.yml"])
def test_missing_secret_is_refused_by_name(file, tmp_path):
    env = read_env_file(ENV_EXAMPLE)
    del env["REDIS_PASSWORD"]
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    res = compose(file, "config", "-q", env_file=env_file)
    assert res.returncode != 0 and "REDIS_PASSWORD" in res.stderr


@needs_compose
def test_newer_compose_keys_are_rejected_by_this_parser(tmp_path):
    """The check is real: docker-compose 1.29 refuses keys the files must not use."""
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  a:\n    image: x\n    healthcheck:\n      test: [CMD, 'true']\n"
                   "      start_interval: 1s\n")
    res = subprocess.run([DOCKER_COMPOSE, "-f", str(bad), "config", "-q"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "start_interval" in res.stderr


@needs_compose
@pytest.mark.parametrize("file", FILES)
def test_services_health_and_gpu(file):
    services = resolved(file)["services"]
    for name, svc in services.items():
        if name == "redis":
            assert "--appendonly yes" in " ".join(svc["command"])
            assert svc["healthcheck"]["test"][-1].startswith("redis-cli ping")
            continue
        assert name in FALLWATCH_SERVICES
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "fallwatch", "health"] and test[3] == name and test[3] in HEALTH_CHECKS
        assert svc["command"] == [name]
        if "redis" in services:
            assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    if "cloud" in services:
        cloud = services["cloud"]
        (device,) = cloud["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert cloud["environment"]["HF_HUB_OFFLINE"] == "1"
        targets = [v["target"] if isinstance(v, dict) else v.split(":")[1] for v in cloud["volumes"]]
        assert "/models/hf" in targets
        assert cloud["build"]["dockerfile"] == "compose/Dockerfile.cuda"


@needs_compose
@pytest.mark.parametrize("file", ["docker-compose.yml", "docker-compose.site.yml"])
def test_every_config_reference_reaches_every_role(file):
    """config.yaml's ${VAR}s must be in each role's environment, or the role refuses to start."""
    refs = config_references()
    assert {"REDIS_PASSWORD", "CAM1_PASSWORD", "CAM2_PASSWORD", "NOTIFY_URL"} <= refs
    for name, svc in resolved(file)["services"].items():
        if name in FALLWATCH_SERVICES:
            assert svc["environment"]["FALLWATCH_CONFIG"] == "/etc/fallwatch/config.yaml"
            assert refs <= set(svc["environment"]), f"{file}:{name} lacks {refs - set(svc['environment'])}"


@needs_compose
def test_gpu_host_needs_no_site_secrets(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("SITE_REDIS_HOST=care-home.example\nCLOUD_REDIS_PASSWORD=s3cret\n")
    res = compose("docker-compose.gpu.yml", "config", env_file=env_file)
    assert res.returncode == 0, res.stderr
    env = yaml.safe_load(res.stdout)["services"]["cloud"]["environment"]
    assert env["FALLWATCH_REDIS__URL"] == "rediss://care-home.example:6380/0"
    assert env["FALLWATCH_REDIS__USERNAME"] == "cloud" and env["FALLWATCH_REDIS__SSL_CA_CERTS"] == "/tls/ca.crt"
    assert not {k for k in env if k.startswith(("CAM", "NOTIFY", "REDIS_PASSWORD"))}


# --- example config ------------------------------------------------------------------------------


def test_example_config_validates(monkeypatch):
    for key, val in read_env_file(ENV_EXAMPLE).items():
        monkeypatch.setenv(key, val)
    monkeypatch.delenv("FALLWATCH_CONFIG", raising=False)
    res = CliRunner().invoke(app, ["config", "validate", "--no-paths", str(CONFIG_EXAMPLE)])  # container paths
    assert res.exit_code == 0, res.output
    assert "(2 cameras)" in res.output


def test_example_config_needs_its_variables(monkeypatch):
    for key, val in read_env_file(ENV_EXAMPLE).items():
        monkeypatch.setenv(key, val)
    monkeypatch.delenv("CAM1_PASSWORD")
    res = CliRunner().invoke(app, ["config", "validate", str(CONFIG_EXAMPLE)])
    assert res.exit_code == 2
    assert "cameras.0.url" in res.output and "CAM1_PASSWORD" in res.output


# --- split deployment: the care-home Redis command with TLS and the cloud ACL -----------------------


def _site_redis_command(certs: Path, port: int, tls_port: int) -> str:
    """The shell command of the site's redis service, pointed at local certs and ports."""
    svc = yaml.safe_load((COMPOSE / "docker-compose.site.yml").read_text())["services"]["redis"]
    assert svc["command"][:2] == ["sh", "-c"]
    script = svc["command"][2].replace("$$", "$")
    script = script.replace("exec redis-server", f"exec {REDIS7} --bind 127.0.0.1")
    script = script.replace("--port 6379", f"--port {port}").replace("--tls-port 6380", f"--tls-port {tls_port}")
    return script.replace("/tls/", f"{certs}/")


@pytest.fixture
def site_redis():
    """The site's redis-server command run for real, with certificates from compose/tls/make-certs.sh."""
    if not REDIS7.exists() or shutil.which("openssl") is None:
        pytest.skip("needs Debian's redis-server 7 (built with TLS) and openssl")
    work = Path(tempfile.mkdtemp(prefix="fw-tls-"))
    subprocess.run([str(COMPOSE / "tls" / "make-certs.sh"), str(work / "tls"), "localhost", "127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    acl = yaml.safe_load((COMPOSE / "docker-compose.site.yml").read_text())["services"]["redis"]["environment"]
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": "site-pw", "CLOUD_REDIS_PASSWORD": "cloud-pw",
           "REDIS_MAXMEMORY": "64mb", "REDIS_TLS_AUTH_CLIENTS": "optional", "CLOUD_ACL": acl["CLOUD_ACL"]}
    port, tls_port = free_port(), free_port()
    proc = subprocess.Popen(["sh", "-c", _site_redis_command(work / "tls", port, tls_port)], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    site = redis.Redis(port=port, password="site-pw")
    deadline = time.monotonic() + 10
    while True:
        try:
            site.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.poll() is not None else "still starting"
                proc.kill()
                pytest.fail(f"site redis did not start: {out[-2000:]}")
            time.sleep(0.02)
    yield site, tls_port, work / "tls"
    site.close()
    proc.terminate()
    proc.wait(10)
    proc.stdout.close()
    shutil.rmtree(work, ignore_errors=True)


def cloud_settings(tls_port: int, certs: Path, **kw) -> RedisSettings:
    base = {"url": f"rediss://localhost:{tls_port}/0", "username": "cloud", "password": "cloud-pw",
            "ssl_ca_certs": str(certs / "ca.crt"), "retry_attempts": 0}
    return RedisSettings(**{**base, **kw})


def test_cloud_user_over_tls_can_serve_the_queue(site_redis):
    site, tls_port, certs = site_redis
    keys = Keys("fallwatch")
    cloud = connect(cloud_settings(tls_port, certs))
    assert check(cloud)["redis_version"].startswith("7")
    # the edge (default user, plain port) stores pixels and enqueues a job, as edge workers do
    site.hset(keys.pixels("cam1:1"), mapping={"p0": b"\xff\xd8"})
    job = Queue(keys.cloud_queue(), connection=site, serializer=JSONSerializer).enqueue("json.dumps", [1, 2])
    # the cloud worker (ACL user "cloud" over TLS) runs RQ's worker loop and writes its outputs
    queue = Queue(keys.cloud_queue(), connection=cloud, serializer=JSONSerializer)
    assert SimpleWorker([queue], connection=cloud, serializer=JSONSerializer).work(burst=True)
    job.refresh()
    assert job.get_status() == JobStatus.FINISHED and job.return_value() == "[1, 2]"
    assert cloud.hgetall(keys.pixels("cam1:1")) == {b"p0": b"\xff\xd8"}
    cloud.delete(keys.pixels("cam1:1"))
    cloud.xadd(keys.verdicts_stream(), {b"t": b"cloud"})
    cloud.xadd(keys.dead_letter_stream(), {b"t": b"dead_letter"})
    cloud.set(keys.heartbeat("cloud", "gpu-1"), "1", ex=15)
    cloud.set(keys.metrics_endpoint("cloud", "gpu-1"), "gpu-host:9108", ex=15)
    # ... and what a scored job touches besides: edge features, live DMD, service time, the budget
    assert cloud.hgetall(keys.edge_features("cam1:1")) == {} and cloud.delete(keys.edge_features("cam1:1")) == 0
    cloud.xadd(keys.dmd_store(), {b"t": b"dmd"})
    cloud.hset(keys.cloud_service(), "gpu-1", "{}")
    cloud.hgetall(keys.budget_bucket())
    assert list(cloud.scan_iter(match=keys.heartbeat_pattern("cloud"))) == [b"fallwatch:heartbeat:cloud:gpu-1"]
    assert site.xlen(keys.verdicts_stream()) == 1
    cloud.close()


def test_cloud_user_is_confined(site_redis):
    site, tls_port, certs = site_redis
    keys = Keys("fallwatch")
    site.xadd(keys.frames_stream(), {b"t": b"frame"})
    cloud = connect(cloud_settings(tls_port, certs))
    denied = [
        lambda: cloud.xadd(keys.frames_stream(), {b"t": b"x"}),
        lambda: cloud.xrange(keys.frames_stream()),
        lambda: cloud.hgetall(keys.stats()),
        lambda: cloud.set(keys.heartbeat("edge", "fake"), "1"),
        lambda: cloud.flushall(),
        lambda: cloud.config_get("*"),
        lambda: cloud.keys("*"),
        lambda: cloud.acl_list(),
    ]
    for attempt in denied:
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    cloud.close()


def test_tls_needs_the_ca_and_the_password(site_redis):
    _site, tls_port, certs = site_redis
    with pytest.raises(RedisUnavailable):
        check(connect(cloud_settings(tls_port, certs, password="wrong")))
    with pytest.raises(RedisUnavailable):
        check(connect(cloud_settings(tls_port, certs, ssl_ca_certs=None)))  # server cert not trusted
    with pytest.raises(RedisUnavailable):
        check(connect(RedisSettings(url=f"redis://localhost:{tls_port}/0", retry_attempts=0,
                                    socket_timeout_s=1)))  # plain text on the TLS port

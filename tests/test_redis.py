from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis

from fallwatch.redis import EmbeddedRedis, RedisHandle, RedisUnavailable, check, connect, redact_url
from fallwatch.settings import RedisSettings
from tests.helpers import free_port


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not a running server
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


@pytest.fixture
def short_dir():
    with tempfile.TemporaryDirectory(prefix="fw-") as d:
        yield Path(d)


def test_embedded_starts_on_a_socket_with_aof_and_stops_cleanly(short_dir: Path) -> None:
    server = EmbeddedRedis(short_dir, appendonly=True).start()
    pid = server.proc.pid
    client = redis.Redis.from_url(server.url)
    client.set("k", "v")
    assert client.config_get("appendonly")["appendonly"] == "yes"
    assert client.config_get("appendfsync")["appendfsync"] == "everysec"
    assert server.socket_path.exists()
    client.close()
    server.stop()
    assert not pid_alive(pid)
    assert not server.running


def test_embedded_data_survives_restart_with_aof(short_dir: Path) -> None:
    with EmbeddedRedis(short_dir, appendonly=True) as server:
        c = redis.Redis.from_url(server.url)
        c.xadd("s", {"a": "1"})
        c.close()
    with EmbeddedRedis(short_dir, appendonly=True) as server:
        assert redis.Redis.from_url(server.url).xlen("s") == 1


def test_redis_handle_owns_embedded_server(short_dir: Path) -> None:
    cfg = RedisSettings(data_dir=short_dir)
    with RedisHandle(cfg) as handle:
        pid = handle.embedded.proc.pid
        assert check(handle.client)["redis_version"]
    assert not pid_alive(pid)


def test_password_and_acl_user_over_url(short_dir: Path) -> None:
    port = free_port()
    acl = "user app on >app-pw ~* &* +@all"
    extra = ["--requirepass", "admin-pw"]
    with EmbeddedRedis(short_dir, appendonly=False, port=port, extra_args=extra):
        admin = redis.Redis(port=port, password="admin-pw")
        admin.execute_command("ACL", "SETUSER", *acl.split()[1:])
        ok = connect(RedisSettings(), f"redis://app:app-pw@127.0.0.1:{port}/0")
        assert check(ok)["redis_version"]
        assert ok.acl_whoami() in ("app", b"app")
        # credentials from settings override the URL's
        cfg = RedisSettings(username="app", password="app-pw")
        assert connect(cfg, f"redis://127.0.0.1:{port}/0").acl_whoami() in ("app", b"app")
        bad = connect(RedisSettings(retry_attempts=0), f"redis://app:wrong@127.0.0.1:{port}/0")
        with pytest.raises(RedisUnavailable, match="authentication failed|WRONGPASS|invalid username-password"):
            check(bad)
        anon = connect(RedisSettings(retry_attempts=0), f"redis://127.0.0.1:{port}/0")
        with pytest.raises(RedisUnavailable):
            check(anon)


def test_client_reconnects_after_server_restart(short_dir: Path) -> None:
    port = free_port()
    server = EmbeddedRedis(short_dir, appendonly=True, port=port).start()
    client = connect(RedisSettings(retry_base_s=0.05, retry_cap_s=0.5, retry_attempts=20), server.url)
    client.set("before", "1")
    time.sleep(1.1)  # let everysec fsync run
    server.stop()
    restarted = EmbeddedRedis(short_dir, appendonly=True, port=port)
    # restart in the background while the client is retrying
    import threading

    t = threading.Timer(0.5, restarted.start)
    t.start()
    try:
        assert client.get("before") == b"1"
    finally:
        t.join()
        restarted.stop()


def test_unreachable_server_is_a_clear_error() -> None:
    client = connect(RedisSettings(retry_attempts=0, connect_timeout_s=0.5), f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(RedisUnavailable, match="cannot reach Redis"):
        check(client)


def test_redact_url() -> None:
    assert redact_url("rediss://u:pw@h:6380/0") == "rediss://u:***@h:6380/0"
    assert redact_url("unix:///tmp/x.sock") == "unix:///tmp/x.sock"


def fallwatch(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("fallwatch")
    base = {k: v for k, v in os.environ.items() if not k.startswith("FALLWATCH_")}
    return subprocess.run([str(exe), *args], env={**base, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.slow
def test_health_command_on_embedded_redis_leaves_nothing_behind(short_dir: Path) -> None:
    data = short_dir
    res = fallwatch("health", "--json", env={"FALLWATCH_REDIS__DATA_DIR": str(data)})
    assert res.returncode == 0, res.stderr
    assert '"ok": true' in res.stdout
    procs = subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True).stdout
    assert procs.strip() == ""


@pytest.mark.slow
def test_health_command_fails_for_unreachable_or_wrong_password(redis_url: str) -> None:
    res = fallwatch("health", env={"FALLWATCH_REDIS__URL": f"redis://127.0.0.1:{free_port()}/0",
                                   "FALLWATCH_REDIS__RETRY_ATTEMPTS": "0"})
    assert res.returncode == 1
    assert "cannot reach Redis" in res.stderr
    res = fallwatch("health", env={"FALLWATCH_REDIS__URL": redis_url})
    assert res.returncode == 0, res.stderr


def test_health_of_a_role_reads_its_heartbeats(redis_url: str, r, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from fallwatch.cli import app
    from fallwatch.keys import Keys

    monkeypatch.setenv("FALLWATCH_REDIS__URL", redis_url)
    runner = CliRunner()
    res = runner.invoke(app, ["health", "edge", "--json"])
    assert res.exit_code == 1 and "no live edge worker" in res.output
    r.set(Keys().heartbeat("edge", "edge-host-1"), "1", ex=10)
    res = runner.invoke(app, ["health", "edge", "--json"])
    assert res.exit_code == 0, res.output
    assert '"workers": ["edge-host-1"]' in res.output
    assert runner.invoke(app, ["health", "nonsense"]).exit_code == 2


def test_a_wrong_password_is_refused_at_once_not_retried(short_dir: Path) -> None:
    port = free_port()
    with EmbeddedRedis(short_dir, appendonly=False, port=port, extra_args=["--requirepass", "right"]):
        client = connect(RedisSettings(retry_attempts=8, retry_base_s=0.5, retry_cap_s=2), f"redis://:wrong@127.0.0.1:{port}/0")
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="authentication failed"):
            check(client)
        assert time.monotonic() - started < 4.0  # eight retries with this backoff would take over 13 s


def test_sentinel_settings_are_shown_without_secrets_and_children_ask_the_sentinels() -> None:
    from fallwatch.redis import sentinel_url

    cfg = RedisSettings(sentinel={"addresses": ["10.0.0.1:26379", "10.0.0.2:26379"], "master_name": "fw",
                                  "tls": True, "password": "pw-123"}, password="pw-456")
    assert sentinel_url(cfg) == "rediss+sentinel://10.0.0.1:26379,10.0.0.2:26379/fw/0"
    handle = RedisHandle(cfg)
    assert handle.url == sentinel_url(cfg) and handle.child_url is None


class FakeWaitClient:
    """INFO replication and a pipeline that records INCR + WAIT."""

    def __init__(self, replicas: int, acked: int):
        self.replicas, self.acked, self.sent, self.infos = replicas, acked, [], 0

    def info(self, section: str) -> dict:
        self.infos += 1
        return {"role": "master", "connected_slaves": self.replicas}

    def pipeline(self, transaction: bool = True):
        client = self

        class Pipe:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def incr(self, key):
                client.sent.append(("INCR", key))

            def wait(self, n, ms):
                client.sent.append(("WAIT", n, ms))

            def execute(self):
                return [1, client.acked]

        return Pipe()


def test_replica_wait_only_with_a_replica_and_on_the_connection_of_a_write_of_its_own() -> None:
    from fallwatch.redis import ReplicaNotConfirmed, ReplicaWait

    clock = [0.0]
    none = FakeWaitClient(replicas=0, acked=0)
    wait = ReplicaWait(timeout_ms=250, clock=lambda: clock[0])
    assert wait(none, "fw:replica:barrier") is None and none.sent == []
    one = FakeWaitClient(replicas=2, acked=1)
    wait = ReplicaWait(timeout_ms=250, clock=lambda: clock[0])
    assert wait(one, "fw:replica:barrier") == 1
    assert one.sent == [("INCR", "fw:replica:barrier"), ("WAIT", 1, 250)]
    wait(one, "fw:replica:barrier")
    assert one.infos == 1                        # INFO replication is cached ...
    clock[0] = 11.0
    wait(one, "fw:replica:barrier")
    assert one.infos == 2                        # ... for 10 s
    gone = FakeWaitClient(replicas=1, acked=0)   # the replica does not answer: the caller retries ...
    wait = ReplicaWait(clock=lambda: clock[0])
    with pytest.raises(ReplicaNotConfirmed):
        wait(gone, "k")
    gone.replicas = 0                            # ... and INFO is asked again: no replica, no wait
    assert wait(gone, "k") is None and gone.infos == 2
    assert ReplicaWait(replicas=0)(one, "k") is None
    shrank = FakeWaitClient(replicas=1, acked=1)  # a look-up finds fewer replicas than the last: not confirmed
    wait = ReplicaWait(clock=lambda: clock[0])
    assert wait(shrank, "k") == 1
    shrank.replicas, clock[0] = 0, 30.0
    with pytest.raises(ReplicaNotConfirmed):
        wait(shrank, "k")
    assert wait(shrank, "k") is None


def test_health_names_the_sentinels_when_none_knows_the_primary() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALLWATCH_")}
    env["FALLWATCH_REDIS__SENTINEL__ADDRESSES"] = f'["127.0.0.1:{free_port()}"]'
    env["FALLWATCH_REDIS__SENTINEL__MASTER_NAME"] = "fw"
    res = subprocess.run([sys.executable, "-m", "fallwatch", "health"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    [line] = res.stderr.strip().splitlines()
    assert "no sentinel of 127.0.0.1:" in line and "names a reachable primary 'fw'" in line

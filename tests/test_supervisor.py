from __future__ import annotations

import os
import signal
import threading

import pytest

from fallwatch.redis import EmbeddedRedis
from fallwatch.supervisor import RoleSpec, Supervisor, child_env
from tests.helpers import wait_for


@pytest.mark.slow
def test_a_killed_role_is_restarted_and_all_stop_together(redis_url: str) -> None:
    # `fallwatch redis` with a URL set exits 1 at once: a role that keeps dying.
    specs = [RoleSpec("health", ("config", "show"), restart=False), RoleSpec("dies", ("redis",))]
    sup = Supervisor(specs, child_env(redis_url), restart_base_s=0.05, restart_cap_s=0.2)
    stop = threading.Event()
    t = threading.Thread(target=sup.run, args=(stop, 0.02))
    t.start()
    try:
        assert wait_for(lambda: sup.children["dies"].restarts >= 2)
        assert wait_for(lambda: sup.children["health"].exit_codes == [0])
        assert sup.children["health"].proc is None  # one-shot roles are not restarted
        assert all(code == 1 for code in sup.children["dies"].exit_codes)
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()


@pytest.mark.slow
def test_sigkilled_long_running_role_comes_back(tmp_path) -> None:
    env = child_env("unix:///nonexistent.sock")
    env.pop("FALLWATCH_REDIS__URL")
    env["FALLWATCH_REDIS__DATA_DIR"] = str(tmp_path / "r")
    sup = Supervisor([RoleSpec("redis", ("redis",))], env, restart_base_s=0.05)
    stop = threading.Event()
    t = threading.Thread(target=sup.run, args=(stop, 0.02))
    t.start()
    try:
        assert wait_for(lambda: sup.running("redis"))
        first = sup.pid("redis")
        assert wait_for(lambda: EmbeddedRedis(tmp_path / "r").answers(), 60)  # its server is up
        os.killpg(first, signal.SIGKILL)
        assert wait_for(lambda: sup.running("redis") and sup.pid("redis") != first)
        assert sup.children["redis"].exit_codes == [-signal.SIGKILL]
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()


def test_role_names_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        Supervisor([RoleSpec("a", ("edge",)), RoleSpec("a", ("cloud",))], {})

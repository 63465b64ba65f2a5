"""Run every fallwatch role on one machine, each in its own process, under one supervisor.

Roles are started as ``python -m fallwatch <role>`` child processes, so a crash in one (or a
SIGKILL) takes down only that role: the supervisor restarts it with capped exponential backoff.
Ctrl-C / SIGTERM stops the children with SIGTERM (SIGKILL after a grace period), then the
embedded Redis, if the supervisor started one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RoleSpec:
    name: str                      # unique name, e.g. "edge-1"
    args: tuple[str, ...]          # arguments after ``fallwatch``, e.g. ("edge",)
    restart: bool = True           # restart when it exits (False: a one-shot job such as a replay)


@dataclass
class _Child:
    spec: RoleSpec
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    backoff_s: float = 0.5
    exit_codes: list[int] = field(default_factory=list)


def fallwatch_argv(args: Sequence[str], config: Path | None = None, log_format: str | None = None) -> list[str]:
    """The command line of a fallwatch sub-command run with this interpreter."""
    argv = [sys.executable, "-m", "fallwatch"]
    if config is not None:
        argv += ["--config", str(config)]
    if log_format is not None:
        argv += ["--log-format", log_format]
    return argv + list(args)


class Supervisor:
    def __init__(self, specs: Sequence[RoleSpec], env: Mapping[str, str], config: Path | None = None,
                 log_format: str | None = None, restart_base_s: float = 0.5, restart_cap_s: float = 30.0,
                 stop_grace_s: float = 10.0):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"role names must be unique: {names}")
        self.children = {s.name: _Child(s, backoff_s=restart_base_s) for s in specs}
        self.env = dict(env)
        self.config = config
        self.log_format = log_format
        self.restart_base_s = restart_base_s
        self.restart_cap_s = restart_cap_s
        self.stop_grace_s = stop_grace_s

    def _spawn(self, child: _Child) -> None:
        argv = fallwatch_argv(child.spec.args, self.config, self.log_format)
        child.proc = subprocess.Popen(argv, env=self.env, start_new_session=True)
        log.info("role_started", role=child.spec.name, pid=child.proc.pid, restarts=child.restarts)

    def start(self) -> None:
        for child in self.children.values():
            self._spawn(child)

    def add(self, spec: RoleSpec) -> None:
        """Start one more role now (e.g. a replay once the workers are ready)."""
        if spec.name in self.children:
            raise ValueError(f"role {spec.name!r} exists already")
        child = _Child(spec, backoff_s=self.restart_base_s)
        self._spawn(child)
        self.children[spec.name] = child

    def poll(self) -> None:
        """Restart roles that died (with backoff); forget one-shot roles that finished."""
        now = time.monotonic()
        for child in list(self.children.values()):  # add() may run on another thread
            if child.proc is None:
                if child.spec.restart and now >= child.next_start:
                    child.restarts += 1
                    self._spawn(child)
                continue
            code = child.proc.poll()
            if code is None:
                continue
            child.exit_codes.append(code)
            child.proc = None
            if not child.spec.restart:
                log.info("role_finished", role=child.spec.name, exit_code=code)
                continue
            child.next_start = now + child.backoff_s
            log.warning("role_died", role=child.spec.name, exit_code=code, restart_in_s=child.backoff_s)
            child.backoff_s = min(child.backoff_s * 2, self.restart_cap_s)

    def running(self, name: str) -> bool:
        proc = self.children[name].proc
        return proc is not None and proc.poll() is None

    def pid(self, name: str) -> int | None:
        proc = self.children[name].proc
        return proc.pid if proc is not None else None

    def stop(self) -> None:
        procs = [c.proc for c in list(self.children.values()) if c.proc is not None and c.proc.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("role_killed", pid=proc.pid)
                proc.kill()
                proc.wait()
        for child in self.children.values():
            child.proc = None
        log.info("roles_stopped", count=len(procs))

    def run(self, stop: threading.Event, poll_s: float = 0.2) -> None:
        self.start()
        try:
            while not stop.wait(poll_s):
                self.poll()
        finally:
            self.stop()


def child_env(redis_url: str | None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of role processes: the parent's, pointed at the supervisor's Redis (None:
    the settings' sentinels, which the children read themselves)."""
    env = dict(os.environ if base is None else base)
    if redis_url is not None:
        env["FALLWATCH_REDIS__URL"] = redis_url
    env["FALLWATCH_METRICS__PORT"] = "0"  # several roles on one host: each takes a free port
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env

"""The run loop every long-running role shares; arq's ``Worker`` is the model.

A role fills in :meth:`RoleLoop.run_once` (one step of work) and, where it needs them, the hooks
:meth:`on_start`, :meth:`on_outage` and :meth:`on_stop`. :meth:`RoleLoop.run` does the rest:
the start and stop log lines, a heartbeat once a period, and Redis outages waited out with
capped backoff (``redis.retry_base_s`` .. ``retry_cap_s``), never fatal.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import redis
import structlog

from fallwatch.logging import redact_text
from fallwatch.metrics import process_metrics
from fallwatch.runtime import Heartbeat
from fallwatch.settings import RedisSettings, Settings
from fallwatch.streams import Backoff

log = structlog.get_logger(__name__)


class LoopDone(Exception):
    """Raised by :meth:`RoleLoop.run_once` when the role has nothing more to do (e.g. a burst)."""


class RoleLoop:
    """Base of a role's loop. Subclasses set ``settings``, ``name`` and (if it beats) ``beat``."""

    log_name: ClassVar[str] = "role"  # log events <log_name>_started / <log_name>_stopped
    outage_errors: ClassVar[tuple[type[BaseException], ...]] = (redis.RedisError,)
    settings: Settings
    name: str
    beat: Heartbeat | None = None
    _oom: bool = False

    def run_once(self) -> Any:
        """One step of work (blocking at most about a second); :class:`LoopDone` ends the loop."""
        raise NotImplementedError

    def redis_settings(self) -> RedisSettings:
        """Where the outage backoff comes from."""
        return self.settings.redis

    def on_start(self) -> None:
        """Before the first step (consumer groups, first heartbeat)."""

    def on_outage(self, exc: BaseException) -> None:
        """After a Redis error, before the wait (e.g. set the groups up again once it is back)."""

    def on_stop(self) -> None:
        """After the last step, also when the loop ends with an error."""

    def stopped_fields(self) -> dict[str, Any]:
        """Extra key-value data for the stop log line."""
        return {}

    def started_fields(self) -> dict[str, Any]:
        """Extra key-value data for the start log line."""
        return {}

    def heartbeat(self) -> None:
        """Refresh the liveness key once a period (:class:`Heartbeat` limits the rate)."""
        if self.beat is not None:
            self.beat.beat()

    def run(self, stop: threading.Event) -> None:
        """Step until ``stop`` is set; Redis outages are waited out with capped backoff."""
        self.on_start()
        log.info(f"{self.log_name}_started", worker=self.name, **self.started_fields())
        try:
            self._loop(stop, Backoff.redis(self.redis_settings()))
        finally:
            self.on_stop()
        log.info(f"{self.log_name}_stopped", worker=self.name, **self.stopped_fields())

    def _loop(self, stop: threading.Event, backoff: Backoff) -> None:
        while not stop.is_set():
            try:
                self.heartbeat()
                self.run_once()
                backoff.reset()
                self._out_of_memory(False)
            except LoopDone:
                return
            except self.outage_errors as exc:
                delay = backoff.next()
                log.warning("redis_unavailable", role=self.log_name, worker=self.name,
                            error=redact_text(str(exc)), retry_in_s=delay)
                self._out_of_memory(isinstance(exc, redis.exceptions.OutOfMemoryError))
                self.on_outage(exc)
                stop.wait(delay)

    def _out_of_memory(self, refused: bool) -> None:
        """The ``redis_out_of_memory`` gauge: 1 while Redis refuses this role's writes (maxmemory reached)."""
        if refused != self._oom:
            self._oom = refused
            process_metrics().redis_out_of_memory.set(int(refused))

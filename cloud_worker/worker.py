"""The cloud worker: an RQ SimpleWorker (no fork per job) with the cloud model loaded once.

It runs RQ's own job machinery (timeouts, retries, failure callbacks, registries, maintenance of
jobs abandoned by dead workers) in a loop that also stops on a :class:`threading.Event`, so a
supervisor can run it in a thread, and that survives Redis outages instead of quitting.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
import structlog
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

from cloud_worker.jobs import CloudRuntime, install
from fallwatch.keys import Keys
from fallwatch.settings import Settings

log = structlog.get_logger(__name__)


class CloudWorker(SimpleWorker):
    """SimpleWorker that also keeps a fallwatch heartbeat key and never touches signals off the main thread."""

    fallwatch_keys: Keys
    heartbeat_s: float = 5.0

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        super().heartbeat(timeout, pipeline)
        conn = pipeline if pipeline is not None else self.connection
        conn.set(self.fallwatch_keys.heartbeat("cloud", self.name), str(time.time()), ex=max(1, int(self.heartbeat_s * 3)))


def build_worker(settings: Settings, client: redis.Redis, keys: Keys, model: Any, name: str) -> CloudWorker:
    """Install the resident model for this process's jobs and make the RQ worker."""
    install(CloudRuntime(settings=settings, client=client, keys=keys, model=model, name=name))
    queue = Queue(keys.cloud_queue(settings.cloud.queue), connection=client, serializer=JSONSerializer)
    worker = CloudWorker([queue], connection=client, serializer=JSONSerializer, name=name)
    worker.fallwatch_keys = keys
    worker.heartbeat_s = settings.metrics.heartbeat_s
    return worker


def run(worker: CloudWorker, stop: threading.Event, burst: bool = False, retry_cap_s: float = 5.0) -> int:
    """Work jobs until ``stop`` is set (or, with ``burst``, until the queue is empty). Returns jobs done."""
    done = 0
    if threading.current_thread() is not threading.main_thread():
        worker.death_penalty_class = TimerDeathPenalty  # SIGALRM timeouts only work on the main thread
    worker.bootstrap(logging_level="WARNING")
    log.info("cloud_worker_started", worker=worker.name, queues=worker.queue_names())
    backoff = 0.1
    try:
        while not stop.is_set():
            try:
                if worker.should_run_maintenance_tasks:
                    worker.run_maintenance_tasks()
                result = worker.dequeue_job_and_maintain_ttl(timeout=1, max_idle_time=1)
                backoff = 0.1
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("redis_unavailable", worker=worker.name, error=str(exc), retry_in_s=backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, retry_cap_s)
                continue
            if result is None:
                if burst:
                    break
                continue
            job, queue = result
            worker.execute_job(job, queue)
            worker.heartbeat()
            done += 1
    finally:
        try:
            worker.teardown()
        except redis.RedisError as exc:
            log.warning("cloud_worker_teardown_failed", worker=worker.name, error=str(exc))
        install(None)
    log.info("cloud_worker_stopped", worker=worker.name, jobs=done)
    return done

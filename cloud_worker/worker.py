"""The cloud worker: an RQ SimpleWorker (no fork per job) with the cloud model loaded once.

It runs RQ's own job machinery (timeouts, retries, failure callbacks, registries, maintenance of
jobs abandoned by dead workers) in a loop that also stops on a :class:`threading.Event`, so a
supervisor can run it in a thread, and that survives Redis outages instead of quitting.

A dequeued job runs only if its data is JSON and it names fallwatch's job function and callbacks;
anything else (a pickled payload, garbage, another function) is dead-lettered and failed without
being run, so a write to the queue cannot make a worker unpickle or call arbitrary code.
"""

from __future__ import annotations

import threading
import time
from enum import StrEnum
from typing import Any

import redis
import structlog
from rq import Queue, SimpleWorker
from rq.exceptions import DeserializationError, StopRequested
from rq.job import Job
from rq.job_lifecycle import record_job_failure
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

from cloud_worker.jobs import CloudRuntime, CloudScorer, _dead_letter, install, runtime
from fallwatch.errors import UserError
from fallwatch.images import PoisonInput
from fallwatch.keys import Keys
from fallwatch.offload import OFFLOAD_FAILED, OFFLOAD_JOB
from fallwatch.runtime import Heartbeat
from fallwatch.settings import RedisSettings, Settings
from fallwatch.role import LoopDone, RoleLoop
from fallwatch.streams import job_queue

log = structlog.get_logger(__name__)


DEQUEUE_TIMEOUT_S = 1  # a blocking dequeue waits this long, so a stop or a Redis outage is noticed soon

# The only function and callback a cloud worker runs: the ones the offload contract names.
ALLOWED_JOBS = frozenset({OFFLOAD_JOB})
ALLOWED_CALLBACKS = frozenset({OFFLOAD_FAILED})


class CloudWorker(SimpleWorker):
    """SimpleWorker that also keeps a fallwatch heartbeat key and never touches signals off the main thread."""

    fallwatch_beat: Heartbeat
    stop_event: threading.Event | None = None

    def _set_connection(self, connection: redis.Redis) -> redis.Redis:
        """Keep ``redis.socket_timeout_s``. RQ raises the pool's timeout to ``worker_ttl`` - 5 s (415 s) for
        its own long blocking dequeue; this worker dequeues with a 1 s timeout, and a read on a connection
        the network dropped silently (a NAT box, a link that changed path) would hang that long."""
        kwargs = connection.connection_pool.connection_kwargs
        kwargs["socket_timeout"] = max(kwargs.get("socket_timeout") or 0.0, DEQUEUE_TIMEOUT_S + 1.0)
        return connection

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        try:
            if pipeline is None:  # RQ's three commands in one round trip (it beats three times a job): a WAN's RTT
                with self.connection.pipeline(transaction=False) as pipe:
                    super().heartbeat(timeout, pipe)
                    pipe.execute()
            else:
                super().heartbeat(timeout, pipeline)
            self.fallwatch_beat.beat()
        except (redis.ConnectionError, redis.TimeoutError):
            # RQ's dequeue loop retries Redis errors forever: leave it when asked to stop
            if self.stop_event is not None and self.stop_event.is_set():
                raise StopRequested() from None
            raise


def build_worker(settings: Settings, client: redis.Redis, keys: Keys, model: CloudScorer,
                 name: str) -> CloudWorker:
    """Install the resident model for this process's jobs and make the RQ worker."""
    if settings.cloud.describe and not callable(getattr(model, "describe", None)):
        raise UserError(f"cloud.describe is on, but the cloud model {settings.cloud.model!r} cannot describe a scene")
    install(CloudRuntime(settings=settings, client=client, keys=keys, model=model, name=name))
    queues = [job_queue(client, q)
              for q in [*keys.offload_queues(settings.cloud.queue), keys.audit_queue(settings.cloud.queue)]]
    worker = CloudWorker(queues, connection=client, serializer=JSONSerializer, name=name)  # served in priority order
    worker.fallwatch_beat = Heartbeat(client, keys, "cloud", name, settings.metrics)
    worker.max_connection_wait_time = settings.redis.retry_cap_s  # RQ's own reconnect backoff (60 s by default)
    return worker


def job_problem(job: Job) -> str | None:
    """Why a dequeued job must not run, or None. Its data is only ever read as JSON."""
    try:
        func = job.func_name
    except DeserializationError:
        return "job data is not JSON (pickled or corrupt payloads are never run)"
    if func not in ALLOWED_JOBS:
        return f"job function {str(func)[:200]!r} is not a fallwatch cloud job"
    names = (getattr(job, f"_{kind}_callback_name", None) for kind in ("success", "failure", "stopped"))
    foreign = sorted({n for n in names if n} - ALLOWED_CALLBACKS)
    if foreign:
        return f"job callbacks {[n[:200] for n in foreign]} are not fallwatch's"
    return None


def reject_job(worker: CloudWorker, job_id: str, queue: Queue, problem: str, job: Job | None = None) -> None:
    """Dead-letter a job that must not run; fail it without running it or any of its callbacks."""
    _dead_letter(runtime(), PoisonInput("bad_job", problem), job_id)
    with worker.connection.pipeline() as pipe:
        pipe.lrem(queue.intermediate_queue_key, 1, job_id)
        if job is not None:
            record_job_failure(job, f"rejected by {worker.name}: {problem}", pipe)
        pipe.execute()


IDLE_DEQUEUE_S = 0.05  # a dequeue slower than this waited for work (not counted in the service time)


class PollOutcome(StrEnum):
    RAN = "ran"
    REJECTED = "rejected"
    IDLE = "idle"


def _next_job(worker: CloudWorker) -> tuple[Job, Queue] | PollOutcome:
    """The next job that may run, or IDLE (queue empty) or REJECTED (a job was refused)."""
    try:
        result = worker.dequeue_job_and_maintain_ttl(timeout=DEQUEUE_TIMEOUT_S, max_idle_time=1)
    except (redis.RedisError, StopRequested):
        raise
    except Exception as exc:  # RQ could not even load the job hash: it tags the error with the job
        job_id, queue = getattr(exc, "job_id", None), getattr(exc, "queue", None)
        if job_id is None or queue is None:
            raise
        reject_job(worker, job_id, queue, f"job cannot be loaded: {type(exc).__name__}: {str(exc)[:500]}")
        return PollOutcome.REJECTED
    if result is None:
        return PollOutcome.IDLE
    problem = job_problem(result[0])
    if problem is not None:
        reject_job(worker, result[0].id, result[1], problem, result[0])
        return PollOutcome.REJECTED
    return result


def work_one(worker: CloudWorker) -> PollOutcome:
    """Maintenance when due, then dequeue and run (or reject) one job."""
    started = time.perf_counter()
    if worker.should_run_maintenance_tasks:
        worker.run_maintenance_tasks()
    waited = time.perf_counter()
    result = _next_job(worker)
    if isinstance(result, PollOutcome):
        return result
    waited = time.perf_counter() - waited
    worker.execute_job(*result)
    worker.heartbeat()
    # a whole cycle is what each job ahead costs a queued one; a dequeue that blocked was idle time
    report_service(time.perf_counter() - started - (waited if waited > IDLE_DEQUEUE_S else 0.0))
    return PollOutcome.RAN


def report_service(job_s: float) -> None:
    """Share this worker's measured seconds per job and per item with the edge (backpressure, budget)."""
    rt = runtime()
    rt.service.observe_job(job_s)
    rt.service.write(rt.client, rt.keys, rt.name)


class CloudLoop(RoleLoop):
    """The role loop around RQ's job machinery: one job (or maintenance, or an idle poll) a step."""

    log_name = "cloud_worker"
    outage_errors = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError)

    def __init__(self, worker: CloudWorker, stop: threading.Event, burst: bool, retry: RedisSettings | None):
        self.worker, self.name, self.burst, self.retry = worker, worker.name, burst, retry or RedisSettings()
        self.done = 0
        worker.stop_event = stop

    def redis_settings(self) -> RedisSettings:
        return self.retry

    def on_start(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            self.worker.death_penalty_class = TimerDeathPenalty  # SIGALRM timeouts only work on the main thread
        self.worker.bootstrap(logging_level="WARNING")

    def started_fields(self) -> dict[str, Any]:
        return {"queues": self.worker.queue_names()}

    def run_once(self) -> None:
        try:
            outcome = work_one(self.worker)
        except StopRequested:
            raise LoopDone() from None
        self.done += outcome is PollOutcome.RAN
        if outcome is PollOutcome.IDLE and self.burst:
            raise LoopDone()

    def on_stop(self) -> None:
        worker = self.worker
        try:
            worker.teardown()
        except redis.RedisError as exc:
            log.warning("cloud_worker_teardown_failed", worker=worker.name, error=str(exc))
            if worker.pubsub_thread is not None:
                worker.pubsub_thread.stop()  # RQ's command listener would go on retrying the lost server
        install(None)

    def stopped_fields(self) -> dict[str, Any]:
        return {"jobs": self.done}


def run(worker: CloudWorker, stop: threading.Event, burst: bool = False, retry: RedisSettings | None = None) -> int:
    """Work jobs until ``stop`` is set (or, with ``burst``, until the queue is empty). Returns jobs done."""
    loop = CloudLoop(worker, stop, burst, retry)
    loop.run(stop)
    return loop.done

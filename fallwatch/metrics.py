"""Every fallwatch Prometheus metric, in one per-process registry, and the endpoint that serves it.

:func:`process_metrics` builds all metrics once per process (names ``fallwatch_*``) in a private
``CollectorRegistry``; :func:`serve` exposes that registry over HTTP and returns the bound port;
:func:`advertise` records "host:port" under ``keys.metrics_endpoint(role, name)`` with a TTL, so
``fallwatch status`` and Prometheus service discovery scripts can find every worker.

Roles use a small facade each, one call per event::

    m = EdgeMetrics.create()
    m.observe_batch(size=8, seconds=0.41)
    m.observe_decisions(edge=6, offload=2)

Label values are checked: a value that looks like a URL or credentials (``://``, ``@``) is refused,
so a camera or notification URL can never leak into a metrics scrape.

GPU gauges come from NVML at scrape time (:class:`GpuCollector`), only for GPUs NVML reports;
on a machine without a GPU they are simply absent, never estimated.
"""

from __future__ import annotations

import collections
import socket
import threading
from dataclasses import dataclass, field, fields
from enum import StrEnum
from socketserver import ThreadingMixIn
from typing import Any, Iterable, Self
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from fallwatch import __version__
from fallwatch.keys import Keys
from fallwatch.settings import MetricsSettings

log = structlog.get_logger(__name__)

NAMESPACE = "fallwatch"
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EDGE_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CLOUD_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
FINAL_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OFFLOAD_WINDOW = 1000
_MAX_LABEL_LEN = 128


class SwitchDecision(StrEnum):
    EDGE = "edge"
    OFFLOAD = "offload"


class MetricsPortInUse(RuntimeError):
    """The configured metrics port is taken (several roles on one host need distinct ports or port 0)."""


def safe_label(value: object, label: str) -> str:
    """A label value as text; refuses anything that looks like a URL or credentials."""
    text = str(value)
    if "://" in text or "@" in text or len(text) > _MAX_LABEL_LEN:
        raise ValueError(f"metrics label {label!r} refuses value that looks like a URL or secret "
                         f"(or is longer than {_MAX_LABEL_LEN} characters)")
    return text


# --- all metrics ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FallwatchMetrics:
    """Every fallwatch metric object, registered in ``registry``."""

    registry: CollectorRegistry
    role: Info
    # ingest
    frames_ingested: Counter
    frames_dropped: Counter
    frames_motion_skipped: Counter
    decode_errors: Counter
    camera_online: Gauge
    camera_fps: Gauge
    frames_dropped_oom: Counter
    # every role
    redis_out_of_memory: Gauge
    # edge and switcher
    edge_batch_size: Histogram
    edge_batch_seconds: Histogram
    switcher_decisions: Counter
    offload_ratio: Gauge
    dead_letters: Counter
    queue_depth: Gauge
    # cloud
    cloud_batch_seconds: Histogram
    cloud_items: Counter
    deadlines_missed: Counter
    # alerts and notifications
    final_verdicts: Counter
    final_latency_seconds: Histogram
    timeout_fallbacks: Counter
    events: Counter
    notifications_sent: Counter
    notifications_failed: Counter
    # live DMD
    switcher_drift: Gauge
    # cloud budget
    offloads_kept: Counter


def build_metrics(registry: CollectorRegistry | None = None) -> FallwatchMetrics:
    """Create every metric in ``registry`` (a new one by default). Call once per registry."""
    reg = registry if registry is not None else CollectorRegistry(auto_describe=True)
    ProcessCollector(namespace=NAMESPACE, registry=reg)

    def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
        return Counter(name, doc, list(labels), namespace=NAMESPACE, registry=reg)

    def gauge(name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
        return Gauge(name, doc, list(labels), namespace=NAMESPACE, registry=reg)

    def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, doc, namespace=NAMESPACE, registry=reg, buckets=buckets)

    return FallwatchMetrics(
        registry=reg,
        role=Info("role", "Role, worker name and version of this process.", namespace=NAMESPACE, registry=reg),
        frames_ingested=counter("frames_ingested", "Frames put on the frames stream.", ["camera"]),
        frames_dropped=counter("frames_dropped", "Frames dropped before the stream (backpressure, errors).", ["camera"]),
        frames_motion_skipped=counter("frames_motion_skipped", "Frames skipped by motion gating.", ["camera"]),
        decode_errors=counter("decode_errors", "Frames or packets the decoder could not read.", ["camera"]),
        camera_online=gauge("camera_online", "1 while the camera delivers frames, else 0.", ["camera"]),
        camera_fps=gauge("camera_fps", "Frame rate reported by the camera source.", ["camera"]),
        frames_dropped_oom=counter("frames_dropped_oom", "Frames dropped because Redis refused writes "
                                   "(out of memory: maxmemory reached under noeviction).", ["camera"]),
        redis_out_of_memory=gauge("redis_out_of_memory", "1 while Redis refuses this process's writes "
                                  "(maxmemory reached under noeviction), else 0."),
        edge_batch_size=histogram("edge_batch_size", "Items per edge model batch.", BATCH_SIZE_BUCKETS),
        edge_batch_seconds=histogram("edge_batch_seconds", "Edge model time per batch.", EDGE_SECONDS_BUCKETS),
        switcher_decisions=counter("switcher_decisions", "Switcher routing decisions.", ["decision"]),
        offload_ratio=gauge("offload_ratio", f"Share offloaded among the last {OFFLOAD_WINDOW} decisions."),
        dead_letters=counter("dead_letters", "Inputs sent to the dead-letter stream.", ["reason"]),
        queue_depth=gauge("rq_queue_depth", "Jobs waiting in the RQ queue.", ["queue"]),
        cloud_batch_seconds=histogram("cloud_batch_seconds", "Cloud model time per batch.", CLOUD_SECONDS_BUCKETS),
        cloud_items=counter("cloud_items", "Offloaded items scored by the cloud.", ["outcome"]),
        deadlines_missed=counter("deadlines_missed", "Work finished after its frame's cloud deadline.", ["stage"]),
        final_verdicts=counter("final_verdicts", "Final verdicts by decider.", ["decided_by"]),
        final_latency_seconds=histogram("final_latency_seconds", "Capture to final verdict.", FINAL_SECONDS_BUCKETS),
        timeout_fallbacks=counter("timeout_fallbacks", "Edge verdicts made final because the cloud did not answer.",
                                  ["reason"]),
        events=counter("events", "Alert event lifecycle steps.", ["kind", "type"]),
        notifications_sent=counter("notifications_sent", "Notifications delivered.", ["channel"]),
        notifications_failed=counter("notifications_failed", "Notification delivery attempts that failed.",
                                     ["channel"]),
        switcher_drift=gauge("switcher_drift", "Live switcher figures from audits per camera ('*' = site): agreement "
                             "rate of edge-decided items with its interval, the calibrated expectation, offload rates.",
                             ["scope", "figure"]),
        offloads_kept=counter("offloads_kept", "Items the switcher would offload that stayed on the edge: "
                              "edge_budget (budget spent) or edge_shed (the cloud would answer too late).", ["reason"]),
    )


_process_lock = threading.Lock()
_process_metrics: FallwatchMetrics | None = None


def process_metrics() -> FallwatchMetrics:
    """This process's metrics (built on first use)."""
    global _process_metrics
    with _process_lock:
        if _process_metrics is None:
            _process_metrics = build_metrics()
        return _process_metrics


def set_role(role: str, name: str, metrics: FallwatchMetrics | None = None) -> None:
    """Label this process's metrics with its role and worker name (``fallwatch_role_info``)."""
    m = metrics or process_metrics()
    m.role.info({"role": safe_label(role, "role"), "name": safe_label(name, "name"), "version": __version__})


# --- role facades --------------------------------------------------------------------------------


class _Facade:
    """A role's view: fields named like :class:`FallwatchMetrics` attributes get those objects."""

    @classmethod
    def create(cls, metrics: FallwatchMetrics | None = None) -> Self:
        m = metrics or process_metrics()
        return cls(**{f.name: getattr(m, f.name) for f in fields(cls) if not f.name.startswith("_")})


@dataclass(frozen=True)
class IngestMetrics(_Facade):
    frames_ingested: Counter
    frames_dropped: Counter
    frames_motion_skipped: Counter
    decode_errors: Counter
    camera_online: Gauge
    camera_fps: Gauge
    frames_dropped_oom: Counter
    redis_out_of_memory: Gauge

    def ingested(self, camera: str, n: int = 1) -> None:
        self.frames_ingested.labels(safe_label(camera, "camera")).inc(n)

    def dropped(self, camera: str, n: int = 1) -> None:
        self.frames_dropped.labels(safe_label(camera, "camera")).inc(n)

    def dropped_oom(self, camera: str, n: int = 1) -> None:
        """Frames Redis refused (out of memory); also sets ``redis_out_of_memory`` while it lasts."""
        self.frames_dropped_oom.labels(safe_label(camera, "camera")).inc(n)
        self.redis_out_of_memory.set(1)

    def memory_ok(self) -> None:
        """Redis took a write again."""
        self.redis_out_of_memory.set(0)

    def motion_skipped(self, camera: str, n: int = 1) -> None:
        self.frames_motion_skipped.labels(safe_label(camera, "camera")).inc(n)

    def decode_error(self, camera: str, n: int = 1) -> None:
        self.decode_errors.labels(safe_label(camera, "camera")).inc(n)

    def online(self, camera: str, is_online: bool, fps: float | None = None) -> None:
        cam = safe_label(camera, "camera")
        self.camera_online.labels(cam).set(1 if is_online else 0)
        if fps is not None:
            self.camera_fps.labels(cam).set(fps)


class _RatioWindow:
    """Share of True among the last ``size`` booleans."""

    def __init__(self, size: int = OFFLOAD_WINDOW):
        self._items: collections.deque[bool] = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value: bool, n: int) -> float:
        with self._lock:
            self._items.extend([value] * min(n, self._items.maxlen or n))
            return sum(self._items) / len(self._items) if self._items else 0.0


@dataclass(frozen=True)
class EdgeMetrics(_Facade):
    edge_batch_size: Histogram
    edge_batch_seconds: Histogram
    switcher_decisions: Counter
    offload_ratio: Gauge
    dead_letters: Counter
    queue_depth: Gauge
    offloads_kept: Counter
    _window: _RatioWindow = field(default_factory=_RatioWindow, repr=False, compare=False)


    def observe_batch(self, size: int, seconds: float) -> None:
        self.edge_batch_size.observe(size)
        self.edge_batch_seconds.observe(seconds)

    def observe_decisions(self, edge: int, offload: int) -> None:
        """Counts of one batch: kept on the edge, and offloaded to the cloud."""
        self.switcher_decisions.labels(SwitchDecision.EDGE.value).inc(edge)
        self.switcher_decisions.labels(SwitchDecision.OFFLOAD.value).inc(offload)
        # interleave so a batch counts by its share, whatever the order
        ratio = self._window.add(False, edge) if edge else None
        if offload:
            ratio = self._window.add(True, offload)
        if ratio is not None:
            self.offload_ratio.set(ratio)

    def dead_letter(self, reason: str) -> None:
        self.dead_letters.labels(safe_label(reason, "reason")).inc()

    def set_queue_depth(self, queue: str, depth: int) -> None:
        self.queue_depth.labels(safe_label(queue, "queue")).set(depth)

    def kept(self, reason: str, n: int = 1) -> None:
        """Would-be offloads kept on the edge: reason edge_budget or edge_shed."""
        self.offloads_kept.labels(safe_label(reason, "reason")).inc(n)


@dataclass(frozen=True)
class CloudMetrics(_Facade):
    cloud_batch_seconds: Histogram
    cloud_items: Counter
    deadlines_missed: Counter
    queue_depth: Gauge
    registry: CollectorRegistry


    def observe_batch(self, size: int, seconds: float, failed: int = 0) -> None:
        """One cloud batch of ``size`` items, ``failed`` of which produced failure verdicts."""
        self.cloud_batch_seconds.observe(seconds)
        self.cloud_items.labels("ok").inc(size - failed)
        if failed:
            self.cloud_items.labels("failed").inc(failed)

    def deadline_missed(self, n: int = 1) -> None:
        """Items scored after their deadline (the alerts service already used the edge verdict)."""
        self.deadlines_missed.labels("cloud").inc(n)

    def set_queue_depth(self, queue: str, depth: int) -> None:
        self.queue_depth.labels(safe_label(queue, "queue")).set(depth)

    def watch_gpus(self, nvml: Any = None) -> int:
        """Register NVML GPU gauges in this registry; returns how many GPUs are watched (0: none)."""
        collector = GpuCollector.create(nvml)
        if collector.devices:
            self.registry.register(collector)
        return len(collector.devices)


@dataclass(frozen=True)
class AlertsMetrics(_Facade):
    final_verdicts: Counter
    final_latency_seconds: Histogram
    timeout_fallbacks: Counter
    deadlines_missed: Counter
    events: Counter
    notifications_sent: Counter
    notifications_failed: Counter
    dead_letters: Counter
    switcher_drift: Gauge

    def final(self, decided_by: str, latency_s: float) -> None:
        """One final verdict; edge_timeout / edge_cloud_failed also count as timeout fallbacks."""
        decider = safe_label(decided_by, "decided_by")
        self.final_verdicts.labels(decider).inc()
        self.final_latency_seconds.observe(latency_s)
        if decider == "edge_timeout":
            self.timeout_fallbacks.labels("timeout").inc()
        elif decider == "edge_cloud_failed":
            self.timeout_fallbacks.labels("cloud_failed").inc()

    def late_cloud_verdict(self, n: int = 1) -> None:
        """A cloud verdict that arrived after its frame was already final."""
        self.deadlines_missed.labels("alerts").inc(n)

    def event(self, kind: str, type_: str) -> None:
        self.events.labels(safe_label(kind, "kind"), safe_label(type_, "type")).inc()

    def notification(self, channel: str, ok: bool) -> None:
        """One delivery attempt on a channel (a non-secret channel id, never the URL)."""
        counter = self.notifications_sent if ok else self.notifications_failed
        counter.labels(safe_label(channel, "channel")).inc()

    def dead_letter(self, reason: str) -> None:
        self.dead_letters.labels(safe_label(reason, "reason")).inc()

    def drift(self, scope: str, figures: dict[str, float | None]) -> None:
        """The drift monitor's figures of one camera or of the site ('*')."""
        for name, value in figures.items():
            if value is not None:
                self.switcher_drift.labels(safe_label(scope, "scope"), name).set(value)


# --- GPUs ----------------------------------------------------------------------------------------


class GpuCollector(Collector):
    """Reads utilisation, memory and the energy counter from NVML at every scrape."""

    def __init__(self, nvml: Any, devices: list[tuple[str, Any]]):
        self.nvml = nvml
        self.devices = devices  # (label, handle)

    @classmethod
    def create(cls, nvml: Any = None) -> "GpuCollector":
        """A collector for every GPU NVML sees; no devices when NVML or a GPU is missing."""
        try:
            if nvml is None:
                import pynvml as nvml  # noqa: PLC0415 - optional, only on GPU hosts
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            devices = [(str(i), nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
        except Exception as exc:  # noqa: BLE001 - no library, no driver, no GPU: nothing to report
            log.info("gpu_metrics_unavailable", error=str(exc))
            return cls(nvml, [])
        log.info("gpu_metrics_enabled", gpus=len(devices))
        return cls(nvml, devices)

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        util = GaugeMetricFamily("fallwatch_gpu_utilization_ratio", "GPU busy share over the last sample period.",
                                 labels=["gpu"])
        used = GaugeMetricFamily("fallwatch_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily("fallwatch_gpu_memory_total_bytes", "GPU memory installed.", labels=["gpu"])
        energy = CounterMetricFamily("fallwatch_gpu_energy_joules", "GPU energy since the driver loaded.",
                                     labels=["gpu"])
        for label, handle in self.devices:
            self._sample(label, handle, util, used, total, energy)
        return [util, used, total, energy]

    def _sample(self, label: str, handle: Any, util: GaugeMetricFamily, used: GaugeMetricFamily,
                total: GaugeMetricFamily, energy: CounterMetricFamily) -> None:
        nvml = self.nvml
        try:
            util.add_metric([label], nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            used.add_metric([label], float(mem.used))
            total.add_metric([label], float(mem.total))
        except Exception as exc:  # noqa: BLE001 - a failed read leaves the sample out
            log.warning("gpu_read_failed", gpu=label, error=str(exc))
        try:
            energy.add_metric([label], nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0)
        except Exception:  # noqa: BLE001 - older GPUs have no energy counter
            pass


# --- HTTP endpoint -------------------------------------------------------------------------------


@dataclass
class _Servers:
    running: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


_servers = _Servers()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        """Scrapes are not worth a log line each."""


def _server_class(host: str, port: int) -> tuple[type[WSGIServer], str]:
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class _Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = family

    return _Server, sockaddr[0]


def serve(cfg: MetricsSettings, metrics: FallwatchMetrics | None = None) -> int | None:
    """Serve the metrics over HTTP on ``cfg.host:cfg.port`` (port 0: any free port) in a daemon thread.

    Returns the bound port, or None when ``cfg.enabled`` is false. Raises MetricsPortInUse.
    """
    if not cfg.enabled:
        return None
    m = metrics or process_metrics()
    try:
        server_cls, addr = _server_class(cfg.host, cfg.port)
        httpd = make_server(addr, cfg.port, make_wsgi_app(m.registry), server_cls, handler_class=_QuietHandler)
    except OSError as exc:
        raise MetricsPortInUse(
            f"metrics.port {cfg.port} on {cfg.host} is not available ({exc}); give each role on one host "
            "its own port, or set metrics.port to 0 for any free port"
        ) from None
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                     name="metrics-http", daemon=True).start()
    with _servers.lock:
        _servers.running.append(httpd)
    port = int(httpd.server_address[1])
    log.info("metrics_serving", host=cfg.host, port=port)
    return port


def served_port() -> int | None:
    """The port of the first endpoint :func:`serve` started in this process, if any."""
    with _servers.lock:
        return int(_servers.running[0].server_address[1]) if _servers.running else None


def start_role(cfg: MetricsSettings, role: str, name: str) -> int | None:
    """Label this process's metrics with its role and serve them. A taken port is logged, not fatal:
    fall detection must not stop for want of a metrics endpoint."""
    set_role(role, name)
    try:
        return serve(cfg)
    except MetricsPortInUse as exc:
        log.error("metrics_unavailable", role=role, error=str(exc))
        return None


def shutdown() -> None:
    """Stop every endpoint :func:`serve` started in this process."""
    with _servers.lock:
        running, _servers.running = _servers.running, []
    for httpd in running:
        httpd.shutdown()
        httpd.server_close()


def advertised_host(bind_host: str) -> str:
    """The host others should scrape: the bind address, or this host's name for a wildcard bind."""
    return socket.gethostname() if bind_host in ("0.0.0.0", "::", "") else bind_host


def advertise(client: Any, keys: Keys, role: str, name: str, cfg: MetricsSettings, port: int | None) -> None:
    """Record "host:port" of this worker's endpoint, expiring like a heartbeat (call with each heartbeat)."""
    if port is None:
        return
    ttl = max(1, int(3 * cfg.heartbeat_s))
    host = advertised_host(cfg.host)
    client.set(keys.metrics_endpoint(role, name), f"{host}:{port}", ex=ttl)

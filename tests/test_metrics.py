"""fallwatch.metrics: metrics scraped over real HTTP move with the facades' calls."""

from __future__ import annotations

import socket
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fallwatch import metrics as fm
from fallwatch.settings import MetricsSettings


@pytest.fixture
def m():
    return fm.build_metrics()


@pytest.fixture
def endpoint(m):
    port = fm.serve(MetricsSettings(host="127.0.0.1", port=0), m)
    yield f"http://127.0.0.1:{port}/metrics"
    fm.shutdown()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(samples, metric: str, **labels: str) -> float | None:
    return samples.get((metric, tuple(sorted(labels.items()))))


def test_every_metric_is_named_fallwatch(m, endpoint):
    fm.set_role("edge", "edge-a", m)
    names = {name for name, _ in scrape(endpoint)}
    assert names and all(n.startswith("fallwatch_") for n in names), sorted(names)
    assert value(scrape(endpoint), "fallwatch_role_info", role="edge", name="edge-a", version=fm.__version__) == 1


def test_ingest_counters_move(m, endpoint):
    ing = fm.IngestMetrics.create(m)
    ing.ingested("cam1", 3)
    ing.ingested("cam1")
    ing.dropped("cam1", 2)
    ing.motion_skipped("cam2", 5)
    ing.decode_error("cam2")
    ing.online("cam1", True, fps=25.0)
    ing.online("cam2", False)
    s = scrape(endpoint)
    assert value(s, "fallwatch_frames_ingested_total", camera="cam1") == 4
    assert value(s, "fallwatch_frames_dropped_total", camera="cam1") == 2
    assert value(s, "fallwatch_frames_motion_skipped_total", camera="cam2") == 5
    assert value(s, "fallwatch_decode_errors_total", camera="cam2") == 1
    assert value(s, "fallwatch_camera_online", camera="cam1") == 1
    assert value(s, "fallwatch_camera_online", camera="cam2") == 0
    assert value(s, "fallwatch_camera_fps", camera="cam1") == 25.0


def test_edge_batches_decisions_and_offload_ratio(m, endpoint):
    edge = fm.EdgeMetrics.create(m)
    edge.observe_batch(8, 0.3)
    edge.observe_batch(2, 0.02)
    edge.observe_decisions(edge=7, offload=3)
    edge.set_queue_depth("fallwatch-cloud", 12)
    edge.dead_letter("bad_image")
    s = scrape(endpoint)
    assert value(s, "fallwatch_edge_batch_size_count") == 2
    assert value(s, "fallwatch_edge_batch_size_sum") == 10
    assert value(s, "fallwatch_edge_batch_size_bucket", le="4.0") == 1
    assert value(s, "fallwatch_edge_batch_seconds_sum") == pytest.approx(0.32)
    assert value(s, "fallwatch_switcher_decisions_total", decision="edge") == 7
    assert value(s, "fallwatch_switcher_decisions_total", decision="offload") == 3
    assert value(s, "fallwatch_offload_ratio") == pytest.approx(0.3)
    assert value(s, "fallwatch_rq_queue_depth", queue="fallwatch-cloud") == 12
    assert value(s, "fallwatch_dead_letters_total", reason="bad_image") == 1


def test_offload_ratio_covers_only_the_recent_window(m):
    edge = fm.EdgeMetrics.create(m)
    edge.observe_decisions(edge=0, offload=fm.OFFLOAD_WINDOW)
    assert m.offload_ratio._value.get() == 1.0
    edge.observe_decisions(edge=fm.OFFLOAD_WINDOW // 4, offload=0)
    assert m.offload_ratio._value.get() == pytest.approx(0.75)


def test_cloud_and_alerts_counters_move(m, endpoint):
    cloud = fm.CloudMetrics.create(m)
    cloud.observe_batch(size=4, seconds=6.3, failed=1)
    cloud.deadline_missed(2)
    alerts = fm.AlertsMetrics.create(m)
    alerts.final("cloud", 7.5)
    alerts.final("edge_timeout", 30.2)
    alerts.final("edge_cloud_failed", 1.0)
    alerts.late_cloud_verdict()
    alerts.event("fall", "start")
    alerts.event("fall", "start")
    alerts.notification("apprise-0123abcd", ok=True)
    alerts.notification("apprise-0123abcd", ok=False)
    s = scrape(endpoint)
    assert value(s, "fallwatch_cloud_batch_seconds_count") == 1
    assert value(s, "fallwatch_cloud_items_total", outcome="ok") == 3
    assert value(s, "fallwatch_cloud_items_total", outcome="failed") == 1
    assert value(s, "fallwatch_deadlines_missed_total", stage="cloud") == 2
    assert value(s, "fallwatch_deadlines_missed_total", stage="alerts") == 1
    assert value(s, "fallwatch_final_verdicts_total", decided_by="cloud") == 1
    assert value(s, "fallwatch_final_latency_seconds_count") == 3
    assert value(s, "fallwatch_timeout_fallbacks_total", reason="timeout") == 1
    assert value(s, "fallwatch_timeout_fallbacks_total", reason="cloud_failed") == 1
    assert value(s, "fallwatch_events_total", kind="fall", type="start") == 2
    assert value(s, "fallwatch_notifications_sent_total", channel="apprise-0123abcd") == 1
    assert value(s, "fallwatch_notifications_failed_total", channel="apprise-0123abcd") == 1


@pytest.mark.parametrize("bad", ["rtsp://user:pw@cam/stream", "json://hooks.example/x", "user@example.com"])
def test_labels_refuse_urls_and_credentials(m, bad):
    with pytest.raises(ValueError, match="camera"):
        fm.IngestMetrics.create(m).ingested(bad)
    with pytest.raises(ValueError, match="channel"):
        fm.AlertsMetrics.create(m).notification(bad, ok=True)


def test_port_in_use_is_a_clear_error(m):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(fm.MetricsPortInUse, match=f"metrics.port {port}"):
            fm.serve(MetricsSettings(host="127.0.0.1", port=port), m)


def test_disabled_serves_nothing(m):
    assert fm.serve(MetricsSettings(enabled=False, port=0), m) is None


class FakeNvml:
    """Stands in for pynvml's device queries (no GPU here); values are what a driver would report."""

    def __init__(self, count: int = 2, energy: bool = True, init_error: bool = False):
        self.count, self.energy, self.init_error = count, energy, init_error

    def nvmlInit(self):
        if self.init_error:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=40 + h, memory=10)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=(h + 1) * 2**30, total=24 * 2**30, free=0)

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.energy:
            raise RuntimeError("Not Supported")
        return 123_456 + h  # mJ


def test_gpu_gauges_come_from_nvml(m, endpoint):
    assert fm.CloudMetrics.create(m).watch_gpus(FakeNvml(count=2)) == 2
    s = scrape(endpoint)
    assert value(s, "fallwatch_gpu_utilization_ratio", gpu="1") == pytest.approx(0.41)
    assert value(s, "fallwatch_gpu_memory_used_bytes", gpu="0") == 2**30
    assert value(s, "fallwatch_gpu_memory_total_bytes", gpu="1") == 24 * 2**30
    assert value(s, "fallwatch_gpu_energy_joules_total", gpu="0") == pytest.approx(123.456)


def test_no_gpu_means_no_gpu_samples(m, endpoint):
    cloud = fm.CloudMetrics.create(m)
    assert cloud.watch_gpus(FakeNvml(init_error=True)) == 0
    assert cloud.watch_gpus(FakeNvml(count=0)) == 0
    assert not [k for k in scrape(endpoint) if k[0].startswith("fallwatch_gpu_")]


def test_gpu_without_energy_counter_reports_the_rest(m, endpoint):
    fm.CloudMetrics.create(m).watch_gpus(FakeNvml(count=1, energy=False))
    s = scrape(endpoint)
    assert value(s, "fallwatch_gpu_memory_used_bytes", gpu="0") == 2**30
    assert value(s, "fallwatch_gpu_energy_joules_total", gpu="0") is None


def test_advertise_records_the_endpoint_with_a_ttl(r, keys, settings):
    cfg = MetricsSettings(host="127.0.0.1", port=0, heartbeat_s=2)
    fm.advertise(r, keys, "edge", "edge-a", cfg, 9200)
    key = keys.metrics_endpoint("edge", "edge-a")
    assert key == "fallwatch:metrics:edge:edge-a"  # the split deployment's Redis ACL names this pattern
    assert r.get(key) == b"127.0.0.1:9200"
    assert 0 < r.ttl(key) <= 6
    fm.advertise(r, keys, "edge", "edge-b", cfg, None)
    assert not r.exists(keys.metrics_endpoint("edge", "edge-b"))


def test_wildcard_bind_advertises_the_host_name():
    assert fm.advertised_host("0.0.0.0") == socket.gethostname()
    assert fm.advertised_host("10.0.0.5") == "10.0.0.5"


def test_process_metrics_is_built_once():
    assert fm.process_metrics() is fm.process_metrics()
    assert fm.EdgeMetrics.create().switcher_decisions is fm.process_metrics().switcher_decisions

"""Online scoring: confusion counts, F1, offload rate, latency percentiles, counts by decider."""

from __future__ import annotations

import json

import pytest
import redis
import typer
from typer.testing import CliRunner

from alerts.cli import register
from alerts.service import AlertsService
from alerts.stats import bucket_upper_ms, latency_bucket, quantile_ms, read_stats
from tests.helpers import FakeClock, cloud_verdict, edge_verdict, plant
from fallwatch.schemas import Decider
from fallwatch.settings import Settings

# (ground truth, prediction, offloaded, latency ms)
PLANTED = [
    (True, True, True, 100), (True, True, False, 100), (True, True, False, 200),    # 3 tp
    (False, True, True, 100),                                                       # 1 fp
    (True, False, True, 200), (True, False, False, 5000),                           # 2 fn
    (False, False, True, 100), (False, False, False, 100),
    (False, False, False, 200), (False, False, False, 200),                         # 4 tn
]


def cli_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """test root"""

    register(app)
    return app


@pytest.fixture
def planted(redis_url: str, r: redis.Redis, keys) -> None:
    clock = FakeClock()
    cfg = Settings(redis={"url": redis_url})
    for i, (gt, pred, offloaded, lat) in enumerate(PLANTED):
        fid, at = f"cam1:{i}", clock.t - lat / 1000
        if offloaded:
            plant(r, keys.verdicts_stream(), edge_verdict(fid, at, 0.5, confident=False, gt_fall=gt),
                  cloud_verdict(fid, at, p_fall=0.9 if pred else 0.1))
        else:
            plant(r, keys.verdicts_stream(), edge_verdict(fid, at, 0.8 if pred else 0.2, gt_fall=gt))
    AlertsService(cfg, r, keys, name="s", clock=clock).step()


def test_scores_of_a_planted_stream(planted, r, keys) -> None:
    st = read_stats(r, keys)
    assert (st.finals, st.scored, st.tp, st.fp, st.fn, st.tn) == (10, 10, 3, 1, 2, 4)
    assert st.precision == pytest.approx(3 / 4)
    assert st.recall == pytest.approx(3 / 5)
    assert st.f1 == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    assert st.accuracy == pytest.approx(0.7)
    assert (st.offloaded, st.offload_rate) == (4, pytest.approx(0.4))
    assert set(st.by_decider) == {d.value for d in Decider}  # every decider, counted or not
    assert {k: v for k, v in st.by_decider.items() if v} == {"edge": 6, "cloud": 4}
    assert st.latency_p50_ms == pytest.approx(100, rel=0.05)
    assert st.latency_p99_ms == pytest.approx(5000, rel=0.05)


def test_redelivered_verdicts_are_not_counted_twice(planted, redis_url, r, keys) -> None:
    plant(r, keys.verdicts_stream(), edge_verdict("cam1:1", 1.0, 0.8, gt_fall=True))
    AlertsService(Settings(redis={"url": redis_url}), r, keys, name="s2", clock=FakeClock()).step()
    assert read_stats(r, keys).finals == 10


def test_stats_command_prints_json(planted, redis_url, keys) -> None:
    result = CliRunner().invoke(cli_app(), ["alerts", "stats", "--json"], env={"FALLWATCH_REDIS__URL": redis_url})
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["tp"] == 3 and data["f1"] == pytest.approx(2 / 3)
    text = CliRunner().invoke(cli_app(), ["alerts", "stats"], env={"FALLWATCH_REDIS__URL": redis_url})
    assert "F1 66.7%" in text.output and "offload rate     40.0%" in text.output


def test_latency_histogram_quantiles() -> None:
    assert latency_bucket(0.3) == 0 and latency_bucket(1.0) == 0
    for ms in (1.5, 42.0, 999.0, 123456.0):
        b = latency_bucket(ms)
        assert bucket_upper_ms(b - 1) < ms <= bucket_upper_ms(b) * (1 + 1e-9)
    hist = {latency_bucket(10.0): 98, latency_bucket(1000.0): 2}
    assert quantile_ms(hist, 0.5) == pytest.approx(10, rel=0.05)
    assert quantile_ms(hist, 0.99) == pytest.approx(1000, rel=0.05)
    assert quantile_ms({}, 0.5) is None

"""`alerts stats --camera` (one camera or replay) and `--reset` (a fresh count for the next run)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from alerts.service import AlertsService
from alerts.stats import read_stats
from fallwatch.settings import Settings
from tests.helpers import FakeClock, cloud_verdict, edge_verdict, plant
from tests.test_alerts_stats import cli_app, planted  # noqa: F401 - planted is a fixture: 10 finals on cam1


def stats(redis_url: str, *args: str):
    return CliRunner().invoke(cli_app(), ["alerts", "stats", *args], env={"FALLWATCH_REDIS__URL": redis_url})


def test_stats_per_camera(planted, redis_url, r, keys) -> None:  # noqa: F811
    clock = FakeClock()
    plant(r, keys.verdicts_stream(), edge_verdict("replay2:0", clock.t - 0.1, 0.9, gt_fall=False, camera_id="replay2"),
          edge_verdict("replay2:1", clock.t - 0.1, 0.5, confident=False, camera_id="replay2"),
          cloud_verdict("replay2:1", clock.t - 0.1, p_fall=0.9, camera_id="replay2"))
    AlertsService(Settings(redis={"url": redis_url}), r, keys, name="s", clock=clock).step()
    assert read_stats(r, keys).finals == 12
    assert (read_stats(r, keys, "cam1").finals, read_stats(r, keys, "cam1").tp) == (10, 3)
    res = stats(redis_url, "--json", "--camera", "replay2")
    assert res.exit_code == 0, res.output
    two = json.loads(res.output)
    assert (two["finals"], two["fp"], two["offloaded"], two["by_decider"]["cloud"]) == (2, 1, 1, 1)


def test_reset_prints_then_starts_from_zero(planted, redis_url, r, keys) -> None:  # noqa: F811
    res = stats(redis_url, "--reset")
    assert res.exit_code == 0 and "final verdicts   10" in res.output and "stats reset" in res.output
    assert read_stats(r, keys).finals == 0 and read_stats(r, keys, "cam1").finals == 0
    assert "final verdicts   0" in stats(redis_url).output

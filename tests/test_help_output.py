"""Help and output read the same everywhere: no type shown for flags, arguments in click's EVENT_ID
form, the same option names for the same thing, key=value health, event ids in status."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from fallwatch.cli import app
from fallwatch.demo import format_summary
from fallwatch.schemas import AlertEvent, EventKind, EventType, encode
from fallwatch.status import gather, render


def help_of(*command: str) -> str:
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}
    res = subprocess.run([sys.executable, "-m", "fallwatch", *command, "--help"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.slow
def test_help_shows_no_type_for_flags_and_plain_argument_names() -> None:
    replay, ack, distill = help_of("replay"), help_of("alerts", "ack"), help_of("distill")
    assert "<bool>" not in replay + ack + distill
    assert "[OPTIONS] EVENT_ID" in ack and "{" not in ack.split("\n", 3)[1]
    assert "--fall-class,--fall-classes" in replay and "--fall-classes,--fall-class" in distill


@pytest.mark.slow
def test_one_name_and_one_default_for_one_thing() -> None:
    replay, distill = help_of("replay"), help_of("distill")
    calibrate, evaluate = help_of("switcher", "calibrate"), help_of("evaluate")
    assert "--dataset" in replay and "--dataset" in distill
    assert all(re.search(r"--dmd\s+DMD_DIR", h) and "--data " not in h for h in (calibrate, evaluate))
    split_default = [h.split("--split", 1)[1].split("[default: ", 1)[1].split("]", 1)[0] for h in (replay, distill)]
    assert split_default == ["valid", "valid"]


def test_health_prints_key_value_pairs(redis_url, monkeypatch) -> None:
    monkeypatch.setenv("FALLWATCH_REDIS__URL", redis_url)
    res = CliRunner().invoke(app, ["health"])
    assert res.exit_code == 0 and res.output.startswith("healthy: role=redis redis_version=")
    assert "{" not in res.output and "'" not in res.output


def test_status_shows_the_event_id_that_ack_needs(settings, r, keys) -> None:
    from rich.console import Console

    ev = AlertEvent(event_id="4f2c9e0d1b", type=EventType.START, kind=EventKind.FALL, camera_id="hall",
                    started_at=time.time())
    r.xadd(keys.alerts_stream(), encode(ev))
    console = Console(width=250, record=True)
    console.print(render(gather(r, settings)))
    assert "4f2c9e0d1b" in console.export_text()


def test_the_demo_summary_counts_in_one_unit_and_says_tiny_models_are_random() -> None:
    summary = {"frames_ingested": 16, "final_verdicts": 16, "edge_final": 12, "cloud_verdicts": 4,
               "timeout_fallbacks": 0, "lost": 0, "duplicates": 0, "events": 2, "notifications_delivered": 2,
               "latency_ms": {"p50": 120.0, "p99": 800.0}, "f1": 0.5}
    text = format_summary(summary, tiny=True)
    assert "stream items ingested 16, final verdicts 16" in text and "random weights" in text
    assert "{" not in text and "random" not in format_summary(summary, tiny=False)

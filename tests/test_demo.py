"""The README's main command: `fallwatch demo` runs the whole system and loses nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="fw-demo-"))  # short: the Redis socket lives here
    out = tmp_path / "s.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALLWATCH_")}
    exe = Path(sys.executable).with_name("fallwatch")
    try:
        proc = subprocess.run([str(exe), "demo", "--workdir", str(work), "--json-out", str(out)], env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["frames_ingested"] > 0
    assert summary["lost"] == 0 and summary["duplicates"] == 0
    assert summary["final_verdicts"] == summary["frames_ingested"]
    assert summary["edge_final"] + summary["cloud_verdicts"] + summary["timeout_fallbacks"] == summary["final_verdicts"]
    assert summary["events"] >= 1
    assert summary["notifications_delivered"] >= 1
    assert "alert start" in proc.stdout and "notified: Fall detected" in proc.stdout
    assert "caregiver station: http://127.0.0.1:" in proc.stdout and "login: demo / " in proc.stdout
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]

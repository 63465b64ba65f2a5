"""``bench/gpu_check.py --tiny``: the GPU check's own code, run on the CPU with tiny layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_tiny_gpu_check_writes_every_figure(tmp_path: Path) -> None:
    result = gpu_check("--tiny", "--batches", "1,4", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    runs = {name: fig["details"] for name, fig in figures.items() if name != "gpu.check_total_s"}
    expected = {f"gpu.{m}_{k}_b{b}_items_per_s" for m, k in (("cloud", "image"), ("cloud", "clip"), ("edge", "image"))
                for b in (1, 4)}
    assert set(runs) == expected
    for name, run in runs.items():
        assert figures[name]["value"] > 0 and run["s_per_item"] > 0
        assert run["paper_ratio"] == pytest.approx(663.1 / 106 / run["s_per_item"], rel=0.01)
    image1, image4 = runs["gpu.cloud_image_b1_items_per_s"], runs["gpu.cloud_image_b4_items_per_s"]
    assert 2928 < image1["prefill_tokens"] < 2928 + 40  # the real model's image tokens plus the prompt's text
    assert image4["prefill_tokens"] == 4 * image1["prefill_tokens"]
    assert 1152 < runs["gpu.cloud_clip_b1_items_per_s"]["prefill_tokens"] < 1152 + 40
    assert figures["gpu.check_total_s"]["details"]["tiny"] is True
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "whole-GPU counter" in markdown and markdown.count("\n| cloud | image |") == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_without_a_gpu_the_full_check_is_one_line(tmp_path: Path) -> None:
    result = gpu_check("--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no CUDA GPU" in result.stderr

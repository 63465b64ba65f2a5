"""Shared pieces of the benchmark suite: the machine record, figures, the full-size ViLT-B/32
checkpoint on disk, a switcher checkpoint of the right shape, and 640x640 camera-like JPEGs.

Every figure the suite writes is a :class:`Figure`: its value, unit, target, whether the target
holds, the load average (1, 5, 15 minutes) when it was measured, the machine and the git revision.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path("~/.cache/fallwatch/bench").expanduser()
FULL_VILT_RECIPE = {"model": "vilt-b32-vqa-random", "version": 1, "seed": 0}
QUESTION = "Is the person falling?"
# CPU features that decide the edge's best mode: AMX makes bf16 GEMMs several times faster, VNNI
# speeds up int8 (on AVX-512 BF16 without AMX, int8 won; with AMX, bf16 did: docs/benchmarks.md).
MATRIX_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    torch: str
    python: str
    git: str
    isa: str = ""  # torch's CPU capability and the matrix flags present, e.g. "AVX512; amx_bf16 avx512_bf16"

    @classmethod
    def here(cls) -> "Machine":
        import torch

        return cls(cpu_model(), os.cpu_count() or 1, torch.__version__, platform.python_version(), git_revision(),
                   f"{torch.backends.cpu.get_cpu_capability()}; {' '.join(cpu_flags(MATRIX_FLAGS)) or 'none'}")


@dataclass(frozen=True)
class Figure:
    name: str  # e.g. "edge.worker_frames_per_s"
    value: float | None
    unit: str
    target: str  # e.g. ">= 20", or "" when the figure has no target
    met: bool | None  # None: no target
    load_average: tuple[float, float, float]
    machine: Machine
    details: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("name")
        return data


def cpuinfo(field: str) -> str:
    """The first CPU's ``field`` in /proc/cpuinfo ("" where it or the file does not exist)."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    return ""


def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags(wanted: Sequence[str]) -> list[str]:
    """Those of ``wanted`` that /proc/cpuinfo lists for the first CPU."""
    have = set(cpuinfo("flags").split())
    return [f for f in wanted if f in have]


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{'+dirty' if dirty else ''}" if rev else "unknown"


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system, every thread) each process has used so far; 0 for one gone."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            out[name] = 0.0
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def figure(name: str, value: float | None, unit: str, machine: Machine, target: str = "",
           check: Callable[[float], bool] | None = None, **details: object) -> Figure:
    met = None if check is None or value is None else bool(check(value))
    if check is not None and value is None:
        met = False
    return Figure(name, value, unit, target, met, load_average(), machine, dict(details))


def exit_cleanly_on_signals() -> None:
    """SIGTERM and SIGINT raise SystemExit, so context managers stop the redis-servers and role
    processes a benchmark started (a background job would otherwise ignore SIGINT)."""
    import signal
    import sys

    def stop(signum: int, _frame: object) -> None:
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def edge_options(ap: "argparse.ArgumentParser", batch: int = 8) -> None:
    """The edge worker's mode, batch size and checkpoint cache, as every edge benchmark takes them."""
    ap.add_argument("--mode", choices=["int8", "bf16"], default="int8", help="edge model mode")
    ap.add_argument("--batch", type=int, default=batch, help="edge.batch_size")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the full-size ViLT checkpoint is kept")


def bench_start(log_level: str = "warning") -> "Machine":
    """What every benchmark does first: stop cleanly on signals, quiet logs, record the machine."""
    from fallwatch import logging as fw_logging

    exit_cleanly_on_signals()
    fw_logging.configure(log_level, "console")
    return Machine.here()


def write_report(out: Path, name: str, data: object, markdown_text: str) -> None:
    """``out/NAME.json`` and ``out/NAME.md``, and the Markdown printed."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown_text)
    print(markdown_text)


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of the pairwise ratios a[i] / b[i] (interleaved runs: each pair shares the same load)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


# --- models on disk ---------------------------------------------------------------------------


def full_vilt_dir(cache: Path = DEFAULT_CACHE) -> Path:
    """ViLT-B/32 VQA (public config, seeded random weights) saved with ``save_pretrained``, with
    the tiny preset's processor files (same image processing, small vocabulary), so
    ``EdgeModel.load(EdgeSettings(model=str(path)))`` loads it like a downloaded model. Built once."""
    from fallwatch.hub import build_atomically

    return build_atomically(Path(cache) / "vilt-b32-vqa-random", FULL_VILT_RECIPE, lambda d: _build_full_vilt(d, cache))


def _build_full_vilt(out: Path, cache: Path) -> None:
    import torch
    from transformers import ViltForQuestionAnswering, ViltProcessor

    from edge_worker.tiny import ensure_tiny_vilt, vilt_b32_vqa_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FULL_VILT_RECIPE["seed"])
        model = ViltForQuestionAnswering(vilt_b32_vqa_config()).eval()
    model.save_pretrained(out)
    ViltProcessor.from_pretrained(ensure_tiny_vilt(Path(cache))).save_pretrained(out)


def switcher_checkpoint(out: Path, edge_model_id: str, questions: Sequence[str], feature_dim: int,
                        threshold: float | None = 0.5) -> Path:
    """An untrained switcher of the trained shape (feature_dim -> 512 -> 128 -> 1), loadable by
    ``Switcher.load`` for ``edge_model_id``; seeded weights, identity standardisation."""
    import torch

    from switcher.model import SwitcherConfig, SwitcherMLP, save_checkpoint

    cfg = SwitcherConfig(in_features=feature_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mlp = SwitcherMLP(cfg)
    card = {
        "config": cfg.to_dict(), "edge_model_id": edge_model_id, "questions": list(questions),
        "feature_dim": feature_dim, "threshold": threshold,
        "standardise": {"mean": [0.0] * feature_dim, "std": [1.0] * feature_dim},
    }
    save_checkpoint(Path(out), mlp, card)
    return Path(out)


# --- frames -------------------------------------------------------------------------------------


def scene_jpegs(n: int, size: int = 640, quality: int = 85, seed: int = 0) -> list[bytes]:
    """``n`` different camera-like rooms with people (``fallwatch.synth``), JPEG-encoded as ingest does
    (drawn once per process: the sections of one suite run share them)."""
    return list(_scene_jpegs(n, size, quality, seed))


@functools.lru_cache(maxsize=16)
def _scene_jpegs(n: int, size: int, quality: int, seed: int) -> tuple[bytes, ...]:
    from fallwatch.synth import make_scene
    from ingest.jpeg import encode_jpeg

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rgb = make_scene(rng, size).image
        noisy = np.clip(rgb.astype(np.int16) + rng.normal(0, 4, rgb.shape).astype(np.int16), 0, 255)  # sensor noise
        out.append(encode_jpeg(noisy.astype(np.uint8), quality, 1280).data)
    return tuple(out)

"""Model set-up decisions that depend on the GPU, checked without one: bf16 support, the forward
batch picked from free GPU memory, the memory table, private seeding, the energy caveat's process
count, and the transformers range the code is tested with."""

from __future__ import annotations

import contextlib
import os
import tomllib
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement

from cloud_worker import gpu_memory
from cloud_worker.energy import EnergyMeter
from cloud_worker.model import CloudModel, auto_forward_batch, resolve_dtype, split_groups
from cloud_worker.tiny import ensure_tiny_llava
from edge_worker.rng import seeded
from fallwatch.settings import CloudSettings
from tests.published import llava_config

ROOT = Path(__file__).resolve().parent.parent
GPU = torch.device("cuda", 0)


def full_config():
    from transformers import LlavaNextVideoConfig

    return LlavaNextVideoConfig(**llava_config(full_size=True))


def fake_gpu(monkeypatch: pytest.MonkeyPatch, bf16: bool) -> list[object]:
    seen: list[object] = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: seen.append(including_emulation) or bf16)
    return seen


def test_bf16_falls_back_to_fp16_on_gpus_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from structlog.testing import capture_logs

    seen = fake_gpu(monkeypatch, bf16=False)
    with capture_logs() as logs:
        assert resolve_dtype("bf16", GPU) == torch.float16
    assert seen == [False]  # emulated bf16 does not count
    assert [(e["event"], e["used"], e["gpu"]) for e in logs] == [("cloud_dtype_fallback", "fp16", "Tesla T4")]
    fake_gpu(monkeypatch, bf16=True)
    assert resolve_dtype("bf16", GPU) == torch.bfloat16
    assert resolve_dtype("fp16", GPU) == torch.float16


def test_memory_table_for_the_7b_model() -> None:
    config = full_config()
    counts = gpu_memory.param_counts(config)
    assert abs(counts.quantisable + counts.other - 7.063e9) < 1e6
    assert gpu_memory.weight_bytes(counts, "bf16") / gpu_memory.GIB == pytest.approx(13.16, abs=0.01)
    assert gpu_memory.max_image_tokens(config) == 2928
    rows = {(r["gpu_gb"], r["precision"]): r for r in gpu_memory.memory_table(config)}
    assert rows[(80, "bf16")]["batch"] == gpu_memory.MAX_BATCH
    assert rows[(16, "bf16")]["batch"] < rows[(24, "bf16")]["batch"] < rows[(48, "bf16")]["batch"]
    assert rows[(16, "4bit")]["batch"] > rows[(16, "8bit")]["batch"] > rows[(16, "bf16")]["batch"]
    item = gpu_memory.item_bytes(config)
    assert 0.25 * gpu_memory.GIB < item < 0.5 * gpu_memory.GIB  # one 640x640 image prompt in bf16
    assert gpu_memory.batch_for(gpu_memory.RESERVE_BYTES + 3.5 * item, config) == 3
    assert gpu_memory.batch_for(0, config) == 1


def test_forward_batch_comes_from_free_gpu_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    config = full_config()
    free = gpu_memory.RESERVE_BYTES + 5.2 * gpu_memory.item_bytes(config)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free), 80 * gpu_memory.GIB))
    model = SimpleNamespace(config=config, dtype=torch.bfloat16)
    assert auto_forward_batch(model, GPU) == 5
    assert auto_forward_batch(model, torch.device("cpu")) is None


def test_groups_are_split_into_forward_batches(tmp_path: Path) -> None:
    assert split_groups([[0, 2, 5], [1, 4]], 2) == [[0, 2], [5], [1, 4]]
    assert split_groups([[0, 1]], None) == [[0, 1]]
    ensure_tiny_llava(tmp_path)
    whole = CloudModel.load(CloudSettings(model="tiny", device="cpu"), tmp_path)
    split = CloudModel.load(CloudSettings(model="tiny", device="cpu", forward_batch=2), tmp_path)
    assert whole.forward_batch is None and split.forward_batch == 2
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 256, (96, 128, 3), np.uint8) for _ in range(5)]
    passes: list[int] = []
    split.model.register_forward_hook(lambda _m, _a, kw, _o: passes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    np.testing.assert_allclose(split.score(items).yes_no_logits, whole.score(items).yes_no_logits, atol=1e-4)
    assert passes == [2, 2, 1]


def test_seeding_is_private_and_leaves_every_generator_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def global_reseed(*_a: object) -> None:
        raise AssertionError("torch.manual_seed reseeds every CUDA generator")

    monkeypatch.setattr(torch, "manual_seed", global_reseed)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", global_reseed)
    torch.random.default_generator.manual_seed(123)
    before = torch.random.get_rng_state()
    with seeded(0):
        a = torch.rand(3)
    assert torch.equal(torch.random.get_rng_state(), before)
    with seeded(0):
        assert torch.equal(torch.rand(3), a)


def test_energy_meter_counts_the_other_gpu_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    procs = [SimpleNamespace(pid=os.getpid()), SimpleNamespace(pid=4242), SimpleNamespace(pid=4343)]
    fake = SimpleNamespace(NVMLError=RuntimeError, nvmlDeviceGetComputeRunningProcesses=lambda h: procs[:2],
                           nvmlDeviceGetGraphicsRunningProcesses=lambda h: procs[1:])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert EnergyMeter(handle=object(), device=GPU).other_processes() == 2
    assert EnergyMeter().other_processes() is None  # no counter: nothing known


def test_transformers_range_is_pinned_and_holds_the_tested_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra in ("edge", "cloud"):
        (spec,) = [Requirement(r) for r in project["optional-dependencies"][extra] if r.startswith("transformers")]
        assert any(s.operator == "<" for s in spec.specifier), spec
        assert spec.specifier.contains(version("transformers")), (spec, version("transformers"))
    gpu = {Requirement(r).name for r in project["optional-dependencies"]["gpu"]}
    assert {"flash-attn", "bitsandbytes"} <= gpu

"""One command for a GPU host: full-size LLaVA-NeXT-Video-7B and ViLT-B/32 on the GPU, no downloads.

    .venv/bin/python bench/gpu_check.py --out bench/results/gpu          # on a GPU host, < 5 min on an H100
    .venv/bin/python bench/gpu_check.py --out /tmp/gpu-tiny --tiny       # the same code on the CPU, tiny layers

Both models are built from their public configurations (``tests/fixtures``) with random weights,
initialised directly on the device in bf16 (fp16 on GPUs without bf16; fp32 on the CPU), and
scored through ``CloudModel.score`` / ``EdgeModel.score`` as the workers do. For batch 1, 4, 8 and
16 of 640x640 images (both models) and of 8-frame 640x480 clips (the cloud model) it records items/s,
seconds per item and its ratio to the paper's 6.26 s per item (663.1 s for 106 images), peak GPU
memory, prefill tokens, NVML joules per item and how many other processes used the GPU meanwhile.
The NVML counter is the whole GPU's: joules per item are the batch's energy split evenly over its
items, and include any other process's work. Random weights score noise; the figures are speed,
memory and energy only.

Writes ``OUT/gpu_check.json`` (figure name -> value, unit, target, details, as ``bench/run.py``)
and ``OUT/gpu_check.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT, Figure, Machine, figure  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
PAPER_S_PER_ITEM = 663.1 / 106  # 6.26 s
BATCHES = (1, 4, 8, 16)
QUESTION = "Is the person falling? Answer yes or no."
EDGE_QUESTION = "Is the person falling?"
TINY_VILT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TARGET_S = 300


@dataclass(frozen=True)
class Run:
    model: str  # "cloud" or "edge"
    kind: str  # "image" or "clip"
    batch: int
    items_per_s: float | None  # None: out of memory
    s_per_item: float | None
    paper_ratio: float | None  # the paper's 6.26 s per item over ours (> 1: faster)
    peak_gib: float | None  # peak GPU memory allocated by torch during the batch
    prefill_tokens: int | None  # prompt tokens of the whole batch (cloud)
    j_per_item: float | None  # NVML: the whole GPU's energy over the batch / items
    gpu_other_processes: int | None


def read_config(name: str) -> dict[str, Any]:
    doc = json.loads((FIXTURES / name).read_text())
    doc.pop("_comment", None)
    return doc


def cloud_config(tiny: bool) -> Any:
    from transformers import LlavaNextVideoConfig

    from cloud_worker.tiny import shrunk

    config = read_config("llava_next_video_config.json")
    return LlavaNextVideoConfig(**(shrunk(config) if tiny else config))


def vilt_config(tiny: bool) -> Any:
    from transformers import ViltConfig

    config = read_config("vilt_b32_vqa_config.json")
    answers = json.loads((FIXTURES / "vilt_vqa_answers.json").read_text())["answers"]
    config.update(id2label=dict(enumerate(answers)), label2id={a: i for i, a in enumerate(answers)})
    return ViltConfig(**{**config, **(TINY_VILT if tiny else {})})


def on_device(cls: Any, config: Any, device: Any, dtype: Any) -> Any:
    """Random weights allocated and initialised on ``device`` in ``dtype`` (nothing through host memory)."""
    import torch

    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    return model.eval()


def build_cloud(tiny: bool, device: Any) -> Any:
    from transformers import LlavaNextVideoForConditionalGeneration

    from cloud_worker.model import CloudModel, match_processor, resolve_dtype
    from cloud_worker.tiny import build_processor, chat_template, published_tokenizer
    from fallwatch.hub import ModelSource
    from fallwatch.settings import CloudSettings

    config = cloud_config(tiny)
    cfg = CloudSettings(model="llava-next-video-7b-random", device=str(device), dtype="bf16", question=QUESTION)
    model = on_device(LlavaNextVideoForConditionalGeneration, config, device, resolve_dtype(cfg.dtype, device))
    processor = build_processor(published_tokenizer(), config.vision_config.image_size, chat_template())
    processor.image_processor.image_grid_pinpoints = config.image_grid_pinpoints
    match_processor(processor, model, ModelSource(cfg.model, "random weights", True, None))
    return CloudModel(cfg.model, model, processor, cfg, device)


def build_edge(tiny: bool, device: Any) -> Any:
    import torch
    from transformers import BertTokenizer, ViltForQuestionAnswering, ViltImageProcessor, ViltProcessor

    from edge_worker.model import EdgeModel
    from edge_worker.tiny import tiny_vocab

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = on_device(ViltForQuestionAnswering, vilt_config(tiny), device, dtype)
    processor = ViltProcessor(image_processor=ViltImageProcessor(size={"shortest_edge": 384}, size_divisor=32),
                              tokenizer=BertTokenizer(vocab=tiny_vocab(), do_lower_case=True, model_max_length=40))
    return EdgeModel("vilt-b32-vqa-random", model, processor, [EDGE_QUESTION], device)


def inputs(kind: str, batch: int) -> list:
    import numpy as np

    rng = np.random.default_rng(batch)
    shape = (640, 640, 3) if kind == "image" else (8, 480, 640, 3)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(batch)]


def measure(model: Any, name: str, kind: str, batch: int, repeats: int) -> Run:
    """Median wall time of ``repeats`` scorings of one batch, with the peak memory and energy."""
    import torch

    items = inputs(kind, batch)
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(model.device)
    try:
        scores = [model.score(items) for _ in range(repeats)]
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return Run(name, kind, batch, None, None, None, None, None, None, None)
    wall = statistics.median(s.wall_s for s in scores)
    energy = [s.energy_j for s in scores if getattr(s, "energy_j", None) is not None]
    others = [s.gpu_other_processes for s in scores if getattr(s, "gpu_other_processes", None) is not None]
    tokens = getattr(scores[0], "prompt_tokens", None)
    return Run(
        name, kind, batch, significant(batch / wall), significant(wall / batch), significant(PAPER_S_PER_ITEM * batch / wall),
        round(torch.cuda.max_memory_allocated(model.device) / 1024**3, 2) if cuda else None,
        sum(tokens) if tokens else None,
        round(statistics.median(energy) / batch, 2) if energy else None, max(others) if others else None,
    )


def significant(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits: a fast tiny run's seconds per item keep their precision."""
    return float(f"{value:.{digits}g}")


def run_all(tiny: bool, batches: tuple[int, ...], repeats: int) -> tuple[list[Run], dict[str, Any]]:
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not tiny \
        else torch.device("cpu")
    start = time.perf_counter()
    cloud, edge = build_cloud(tiny, device), build_edge(tiny, device)
    info = {"device": gpu_name(device), "cloud_dtype": str(cloud.dtype).removeprefix("torch."),
            "edge_dtype": str(edge.dtype).removeprefix("torch."), "build_s": round(time.perf_counter() - start, 1),
            "tiny": tiny}
    runs = []
    for model, name, kinds in ((cloud, "cloud", ("image", "clip")), (edge, "edge", ("image",))):
        for kind in kinds:
            model.score(inputs(kind, 1))  # warm-up: kernels, allocator
            runs += [measure(model, name, kind, b, repeats) for b in batches]
    info["total_s"] = round(time.perf_counter() - start, 1)
    return runs, info


def gpu_name(device: Any) -> str:
    import torch

    if device.type != "cuda":
        return "cpu"
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} ({props.total_memory / 1024**3:.0f} GiB, compute {props.major}.{props.minor})"


def figures(runs: list[Run], info: dict[str, Any], machine: Machine) -> list[Figure]:
    out = [figure(f"gpu.{r.model}_{r.kind}_b{r.batch}_items_per_s", r.items_per_s, "items/s", machine, **asdict(r))
           for r in runs]
    check = None if info["tiny"] else (lambda v: v < TARGET_S)
    out.append(figure("gpu.check_total_s", info["total_s"], "s", machine, "" if info["tiny"] else f"< {TARGET_S}",
                      check, **info))
    return out


def markdown(runs: list[Run], info: dict[str, Any], machine: Machine) -> str:
    def cell(value: Any) -> str:
        return "n/a" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    lines = [
        "# fallwatch GPU check", "",
        f"{time.strftime('%Y-%m-%d %H:%M')} · {info['device']} · cloud {info['cloud_dtype']}, edge {info['edge_dtype']}"
        f" · torch {machine.torch} · git {machine.git} · {'tiny layers on the CPU' if info['tiny'] else 'full size'}"
        f" · built in {info['build_s']} s, {info['total_s']} s in all", "",
        "Random weights (speed, memory and energy only). Energy is NVML's whole-GPU counter over each batch, split "
        "evenly over its items; other processes on the GPU are counted in it (their number is in the last column). "
        f"x paper = the paper's {PAPER_S_PER_ITEM:.2f} s per item over ours; n/a items/s = out of memory.", "",
        "| model | input | batch | items/s | s/item | x paper | peak GiB | prefill tokens | J/item | other GPU processes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        values = (r.items_per_s, r.s_per_item, r.paper_ratio, r.peak_gib, r.prefill_tokens, r.j_per_item,
                  r.gpu_other_processes)
        lines.append(f"| {r.model} | {r.kind} | {r.batch} | " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json and gpu_check.md")
    ap.add_argument("--tiny", action="store_true", help="tiny layers on the CPU (same code; what the tests run)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per batch (default 3 on a GPU, 1 tiny)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fallwatch import logging as fw_logging

    fw_logging.configure("warning", "console")
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("error: torch sees no CUDA GPU here; run on a GPU host (or add --tiny for the CPU check)", file=sys.stderr)
        return 2
    batches = tuple(int(b) for b in args.batches.split(","))
    runs, info = run_all(args.tiny, batches, args.repeats or (1 if args.tiny else 3))
    machine = Machine.here()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {f.name: f.to_json() for f in figures(runs, info, machine)}
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    text = markdown(runs, info, machine)
    (args.out / "gpu_check.md").write_text(text)
    print(text + f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'} in {info['total_s']} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

"""Benchmark the edge and cloud model adapters on this CPU.

* Full-size ViLT-B/32 VQA (public config, random weights): ms per image at batch 1 and 8 for fp32,
  bf16 weights and int8 dynamic quantisation; for bf16 and int8 against fp32, the largest
  difference over all 3129 answer logits, top-answer agreement and feature cosine similarity.
* The tiny LLaVA-NeXT-Video preset: items per second at batch 1, 4 and 8 (images and 8-frame clips).

Writes ``bench_models.json`` and ``bench_models.md`` into ``--out``. ``--quick`` stays under a
minute. Random weights: the agreement figures say how much the numeric format perturbs the
network, not how accurate it is.

    .venv/bin/python bench/bench_models.py --out bench/results [--quick] [--images DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cloud_worker.model import CloudModel
from edge_worker.model import EdgeModel, EdgeOutputs, quantize_int8
from edge_worker.samples import drawn_clip, read_image
from edge_worker.tiny import ensure_tiny_vilt, vilt_b32_vqa_config
from fallwatch.settings import CloudSettings

QUESTION = "Is the person falling?"


@dataclass(frozen=True)
class EdgeTiming:
    mode: str
    batch: int
    ms_per_image: float  # median over timed batches, preprocessing included
    batches_timed: int


@dataclass(frozen=True)
class Agreement:
    mode: str  # compared against fp32 on the same images
    images: int
    max_abs_logit_diff: float  # over every answer logit of every image
    top_answer_agreement: float  # fraction of images whose arg-max answer matches fp32
    feature_cosine_mean: float
    feature_cosine_min: float


@dataclass(frozen=True)
class CloudThroughput:
    kind: str  # image | clip
    batch: int
    items_per_s: float
    ms_per_item: float


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for bench_models.json / .md")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions: under a minute")
    ap.add_argument("--images", type=Path, help="directory of .jpg/.png frames (default: drawn frames)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    return ap.parse_args()


def load_frames(folder: Path | None, n: int) -> list[np.ndarray]:
    if folder is None:
        clip = drawn_clip(n)
        return [np.ascontiguousarray(f) for f in clip]
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:n]
    if not files:
        raise SystemExit(f"no .jpg/.png images in {folder}")
    return [read_image(p) for p in files]


def full_size_vilt(processor_dir: Path) -> dict[str, EdgeModel]:
    from transformers import ViltForQuestionAnswering, ViltProcessor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fp32 = ViltForQuestionAnswering(vilt_b32_vqa_config()).eval()
    processor = ViltProcessor.from_pretrained(processor_dir)
    models = {
        "fp32": fp32,
        "bf16": copy.deepcopy(fp32).to(torch.bfloat16),
        "int8": quantize_int8(copy.deepcopy(fp32)),
    }
    cpu = torch.device("cpu")
    return {mode: EdgeModel(f"vilt-b32-random-{mode}", m, processor, [QUESTION], cpu) for mode, m in models.items()}


def time_edge(model: EdgeModel, mode: str, frames: list[np.ndarray], batch: int, reps: int) -> tuple[EdgeTiming, EdgeOutputs]:
    """Median ms per image of ``reps`` batches (after one warm-up), and the last batch's outputs."""
    items = [frames[i % len(frames)] for i in range(batch)]
    model.outputs(items)  # warm-up
    walls = []
    for _ in range(reps):
        start = time.perf_counter()
        outputs = model.outputs(items)
        walls.append(time.perf_counter() - start)
    return EdgeTiming(mode, batch, round(1000 * statistics.median(walls) / batch, 2), reps), outputs


def agreement(mode: str, ref: EdgeOutputs, other: EdgeOutputs) -> Agreement:
    logits_ref, logits = ref.logits[:, 0], other.logits[:, 0]
    feats_ref, feats = ref.features[:, 0], other.features[:, 0]
    cos = torch.nn.functional.cosine_similarity(feats_ref, feats, dim=1)
    return Agreement(
        mode=mode,
        images=int(logits.shape[0]),
        max_abs_logit_diff=round(float((logits - logits_ref).abs().max()), 5),
        top_answer_agreement=float((logits.argmax(1) == logits_ref.argmax(1)).float().mean()),
        feature_cosine_mean=round(float(cos.mean()), 6),
        feature_cosine_min=round(float(cos.min()), 6),
    )


def bench_edge(frames: list[np.ndarray], cache: Path, quick: bool) -> tuple[list[EdgeTiming], list[Agreement]]:
    models = full_size_vilt(ensure_tiny_vilt(cache))
    reps = {1: 3, 8: 1} if quick else {1: 10, 8: 3}
    timings, outputs = [], {}
    steps = [(mode, b) for mode in models for b in (1, 8)]
    for mode, batch in tqdm(steps, desc="ViLT-B/32", unit="run"):
        timing, outputs[mode, batch] = time_edge(models[mode], mode, frames, batch, reps[batch])
        timings.append(timing)
    ref = outputs["fp32", 8]  # the same 8 frames in every mode
    return timings, [agreement(mode, ref, outputs[mode, 8]) for mode in ("bf16", "int8")]


def bench_cloud(frames: list[np.ndarray], cache: Path, quick: bool) -> list[CloudThroughput]:
    model = CloudModel.load(CloudSettings(model="tiny", device="cpu", dtype="fp32"), cache)
    clip = drawn_clip(8)
    reps = 2 if quick else 5
    results = []
    for kind, batch in tqdm([(k, b) for k in ("image", "clip") for b in (1, 4, 8)], desc="tiny LLaVA", unit="run"):
        items = [clip if kind == "clip" else frames[i % len(frames)] for i in range(batch)]
        model.score(items)  # warm-up
        wall = statistics.median(model.score(items).wall_s for _ in range(reps))
        results.append(CloudThroughput(kind, batch, round(batch / wall, 2), round(1000 * wall / batch, 2)))
    return results


def environment(args: argparse.Namespace) -> dict[str, object]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": cpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "images": str(args.images) if args.images else "drawn 640x480 frames",
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the machine skews timings
    }


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# Model benchmark", "",
        f"{env['date']} · {env['cpu']} · torch {env['torch']} · transformers {env['transformers']} · "
        f"{env['threads']} threads · {'quick' if env['quick'] else 'full'} run · images: {env['images']} · "
        f"load average {env['load_average_1m_at_end']} at the end", "",
        "## ViLT-B/32 VQA (full size, random weights): ms per image", "",
        "| mode | batch 1 | batch 8 |", "|---|---|---|",
    ]
    timing = {(t["mode"], t["batch"]): t["ms_per_image"] for t in report["edge_timings"]}
    for mode in ("fp32", "bf16", "int8"):
        lines.append(f"| {mode} | {timing[(mode, 1)]:.1f} | {timing[(mode, 8)]:.1f} |")
    lines += ["", "## bf16 and int8 against fp32 (all 3129 answer logits)", "",
              "| mode | images | max abs logit diff | top-answer agreement | feature cosine mean | min |",
              "|---|---|---|---|---|---|"]
    for a in report["edge_agreement"]:
        lines.append(f"| {a['mode']} | {a['images']} | {a['max_abs_logit_diff']:.4f} | "
                     f"{a['top_answer_agreement']:.3f} | {a['feature_cosine_mean']:.6f} | {a['feature_cosine_min']:.6f} |")
    lines += ["", "## tiny LLaVA-NeXT-Video (CPU, fp32)", "", "| input | batch | items/s | ms per item |",
              "|---|---|---|---|"]
    for c in report["cloud_throughput"]:
        lines.append(f"| {c['kind']} | {c['batch']} | {c['items_per_s']:.1f} | {c['ms_per_item']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    frames = load_frames(args.images, 8)
    with tempfile.TemporaryDirectory(prefix="fw-bench-") as tmp:
        timings, agreements = bench_edge(frames, Path(tmp), args.quick)
        cloud = bench_cloud(frames, Path(tmp), args.quick)
    report = {
        "environment": environment(args),
        "edge_timings": [asdict(t) for t in timings],
        "edge_agreement": [asdict(a) for a in agreements],
        "cloud_throughput": [asdict(c) for c in cloud],
        "total_s": round(time.perf_counter() - start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_models.json").write_text(json.dumps(report, indent=2))
    (args.out / "bench_models.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / 'bench_models.json'} and {args.out / 'bench_models.md'} in {report['total_s']} s")


if __name__ == "__main__":
    main()

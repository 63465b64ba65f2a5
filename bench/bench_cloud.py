"""Cloud batching on the tiny LLaVA-NeXT-Video preset, and a worked estimate for the real 7B model.

* ``cloud.batch8_vs_batch1_speedup``: items per second of ``CloudModel.score`` at batch 8 over
  batch 1 (half images, half 8-frame clips, as offloads mix them), the ways alternating (A B A B)
  so all see the same load. Batch 8 is scored as the cloud worker scores it, one forward pass per
  shape group; a single padded pass of all 8 is measured alongside, with the prefill positions
  each way takes (for the tiny preset and for the 7B model's prompt lengths). The tiny preset says how much batching saves in fixed
  per-call costs (processor, Python, kernel launches); on a GPU the 7B model's GEMMs gain more.
* ``cloud.paper_estimate``: prefill FLOPs per item of LLaVA-NeXT-Video-7B (parameter counts of the
  public config; 2928 image tokens for a 640x640 image, 1152 video tokens for an 8-frame clip),
  the time per item on an H100 at a stated MFU, against the paper's 663.1 s for 106 images.

    .venv/bin/python bench/bench_cloud.py --out bench/results/cloud [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from bench_models import load_frames
from common import DEFAULT_CACHE, Machine, figure, load_average, median_ratio

# LLaVA-NeXT-Video-7B, counted from its public config on the meta device (see docs/benchmarks.md).
PARAMS = {"vision": 303.5e6, "projector": 21.0e6, "language": 6607.6e6, "lm_head": 131.3e6}
LM_LAYERS, LM_WIDTH = 32, 4096
VISION_LAYERS, VISION_WIDTH, VISION_TOKENS_PER_CROP = 24, 1024, 577  # CLIP ViT-L/14 at 336 px: 24x24 + CLS
IMAGE_TOKENS, CLIP_TOKENS = 2928, 1152  # 640x640 image (anyres: base + 2x2 crops), 8-frame clip (2x2 pooled)
IMAGE_CROPS, CLIP_FRAMES = 5, 8  # 336 px views through the vision tower
TEXT_TOKENS = 40  # chat template + question (assumed)
H100_BF16_FLOPS = 989e12  # dense bf16 peak, SXM
H100_HBM_BYTES_PER_S = 3.35e12
MFU = 0.40
DECODE_BANDWIDTH_SHARE = 0.6  # generation reads every weight once per token: memory-bound
GENERATED_TOKENS = 32  # a short sentence, if the paper's setup generated one
PAPER_SECONDS, PAPER_IMAGES = 663.1, 106


@dataclass(frozen=True)
class BatchRun:
    batch: str  # "1", "8 one pass" (images and clips padded together), "8 grouped" (4 images, then 4 clips)
    items_per_s: float
    load_average_1m: float


@dataclass(frozen=True)
class ItemEstimate:
    kind: str
    prefill_tokens: int
    vision_tflop: float
    language_tflop: float
    attention_tflop: float
    total_tflop: float
    h100_seconds: float


def mixed_items(frames: list, clip) -> list:
    """8 items as offloads mix them: images and 8-frame clips alternating."""
    return [clip if i % 2 else frames[i % len(frames)] for i in range(8)]


def cloud_speedup(cache: Path, quick: bool) -> tuple[list[BatchRun], float, dict[str, int]]:
    """Items per second of the tiny preset on 8 mixed items: 8 calls of one, one padded pass of 8,
    and ``CloudModel.score`` (one pass per shape group), alternating. The speedup is batch 8 as the
    cloud worker runs it (grouped) over batch 1. Also the prefill positions each way."""
    from cloud_worker.model import CloudModel
    from edge_worker.samples import drawn_clip
    from fallwatch.settings import CloudSettings

    model = CloudModel.load(CloudSettings(model="tiny", device="cpu", dtype="fp32", batch_size=8), cache)
    mixed = mixed_items(load_frames(None, 8), drawn_clip(8))
    ways = {"1": lambda: [model.score([x]) for x in mixed],
            "8 one pass": lambda: model.forward_yes_no(mixed),
            "8 grouped": lambda: model.score(mixed)}
    for way in ways.values():
        way()  # warm-up
    runs, reps = [], 5  # 40 items per timing: one call of 8 takes only ~50 ms
    for _ in tqdm(range(3 if quick else 8), desc="tiny LLaVA b1/b8", leave=False):
        for name, way in ways.items():
            start = time.perf_counter()
            for _ in range(reps):
                way()
            runs.append(BatchRun(name, round(8 * reps / (time.perf_counter() - start), 2), load_average()[0]))
    rate = {name: [r.items_per_s for r in runs if r.batch == name] for name in ways}
    return runs, round(median_ratio(rate["8 grouped"], rate["1"]), 2), prefill_positions(model.score(mixed).prompt_tokens, mixed)


def prefill_positions(lengths: list[int], items: list) -> dict[str, int]:
    """Positions the language model computes for these prompts: padded to the longest in one pass,
    or per shape group."""
    from cloud_worker.model import shape_groups

    grouped = sum(len(idx) * max(lengths[i] for i in idx) for idx in shape_groups(items))
    return {"one_pass": len(lengths) * max(lengths), "grouped": grouped, "unpadded": sum(lengths)}


def grouped_vs_one_pass(runs: list[BatchRun]) -> float:
    return round(median_ratio([r.items_per_s for r in runs if r.batch == "8 grouped"],
                              [r.items_per_s for r in runs if r.batch == "8 one pass"]), 3)


def real_model_positions() -> dict[str, object]:
    """The same count for LLaVA-NeXT-Video-7B prompts: 4 images of 640x640 and 4 8-frame clips."""
    image, clip = IMAGE_TOKENS + TEXT_TOKENS, CLIP_TOKENS + TEXT_TOKENS
    one_pass, grouped = 8 * image, 4 * image + 4 * clip
    return {"one_pass": one_pass, "grouped": grouped, "saved": round(1 - grouped / one_pass, 3)}


def attention_flops(tokens: int, layers: int, width: int, causal: bool) -> float:
    """QK^T and AV: 2 matmuls of 2 * L^2 * width FLOPs per layer (half of them under a causal mask)."""
    return layers * 2 * 2 * tokens * tokens * width * (0.5 if causal else 1.0)


def estimate(kind: str, media_tokens: int, views: int) -> ItemEstimate:
    """Prefill FLOPs: ~2 * params * tokens for every matmul weight, plus attention; one logit row."""
    tokens = media_tokens + TEXT_TOKENS
    vision = views * (2 * PARAMS["vision"] * VISION_TOKENS_PER_CROP
                      + attention_flops(VISION_TOKENS_PER_CROP, VISION_LAYERS, VISION_WIDTH, causal=False))
    projector = 2 * PARAMS["projector"] * views * (VISION_TOKENS_PER_CROP - 1)
    language = 2 * PARAMS["language"] * tokens + 2 * PARAMS["lm_head"]  # logits for the last position only
    attention = attention_flops(tokens, LM_LAYERS, LM_WIDTH, causal=True)
    total = vision + projector + language + attention
    return ItemEstimate(kind, tokens, round((vision + projector) / 1e12, 2), round(language / 1e12, 2),
                        round(attention / 1e12, 2), round(total / 1e12, 2),
                        round(total / (H100_BF16_FLOPS * MFU), 4))


def paper_estimate() -> dict[str, object]:
    image, clip = estimate("image 640x640", IMAGE_TOKENS, IMAGE_CROPS), estimate("clip 8 frames", CLIP_TOKENS, CLIP_FRAMES)
    paper = PAPER_SECONDS / PAPER_IMAGES
    decode_s = 2 * sum(PARAMS.values()) / (H100_HBM_BYTES_PER_S * DECODE_BANDWIDTH_SHARE)  # bf16 weights per token
    return {
        "assumptions": {"params": PARAMS, "text_tokens": TEXT_TOKENS,
                        "gpu": "H100 SXM, 989 TFLOP/s dense bf16, 3.35 TB/s HBM3", "mfu": MFU,
                        "decode_bandwidth_share": DECODE_BANDWIDTH_SHARE,
                        "generation": "fallwatch: none (one prefill pass, yes/no from the last position's logits)"},
        "items": [asdict(image), asdict(clip)],
        "decode_ms_per_token": round(1000 * decode_s, 2),
        "image_with_generation_s": round(image.h100_seconds + GENERATED_TOKENS * decode_s, 3),
        "generated_tokens": GENERATED_TOKENS,
        "paper_seconds_per_item": round(paper, 2),
        "paper_vs_estimate_image": round(paper / image.h100_seconds, 1),
    }


def figures(runs: list[BatchRun], speedup: float, positions: dict[str, int], machine: Machine) -> list:
    est = paper_estimate()
    image_s = est["items"][0]["h100_seconds"]
    return [
        figure("cloud.batch8_vs_batch1_speedup", speedup, "x", machine, runs=[asdict(r) for r in runs],
               grouped_vs_one_pass=grouped_vs_one_pass(runs), tiny_prefill_positions=positions,
               real_7b_prefill_positions=real_model_positions(),
               model="tiny LLaVA-NeXT-Video preset, CPU fp32, half images half 8-frame clips"),
        figure("cloud.paper_estimate", image_s, "s per 640x640 image on an H100 (prefill)", machine, **est),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for cloud.json")
    ap.add_argument("--quick", action="store_true", help="3 alternations instead of 8")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the tiny preset is kept")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    machine = Machine.here()
    runs, speedup, positions = cloud_speedup(args.cache, args.quick)
    result = {f.name: f.to_json() for f in figures(runs, speedup, positions, machine)}
    (args.out / "cloud.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v["value"] for k, v in result.items()}, indent=2))
    print(json.dumps(paper_estimate(), indent=2))


if __name__ == "__main__":
    main()

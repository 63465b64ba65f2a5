"""How much GPU memory the cloud model needs, and how many items fit in one forward pass.

Computed, not guessed per card: weights are the model's parameter count times the bytes per
parameter of its precision; activations are counted per prompt token for one prefill pass as
fallwatch runs it (``use_cache=False``, ``logits_to_keep=1``, SDPA attention, which never
materialises the token-by-token score matrix). In a Llama decoder layer the peak sits in the MLP:
the SiLU output, the up projection and their product (3 x intermediate values) next to the
residual stream, its normalised copy and the input embeddings (3 x hidden values). A 1.3x margin
covers the caching allocator's fragmentation and the vision tower's hidden states.

For LLaVA-NeXT-Video-7B in bf16 that is 13.2 GiB of weights and about 116 KiB per prompt token:
a 640x640 image (2928 image tokens, about 2950 in all) is about 0.33 GiB, an 8-frame clip
(1152 video tokens) about 0.13 GiB. ``bench/gpu_check.py`` measures the real peak on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1024**3
RESERVE_BYTES = 1 * GIB  # CUDA context, cuBLAS workspace, the processor's tensors on the device
MARGIN = 1.3
TEXT_TOKENS = 24  # the chat template and the question around the image/video tokens (Vicuna's tokenizer)
MAX_BATCH = 64  # the bound of cloud.batch_size
BYTES_PER_PARAM = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "8bit": 1.0, "4bit": 0.5625}  # nf4 + its scales
QUANTISED = ("8bit", "4bit")


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the model split by what bitsandbytes quantises (the decoder's Linear layers)."""

    quantisable: int  # decoder and vision Linear weights
    other: int  # embeddings, lm_head, norms, biases, projector


def param_counts(config: Any) -> ParamCounts:
    """Counted on the meta device from ``config``: no memory, no download."""
    import torch
    from transformers import LlavaNextVideoForConditionalGeneration

    with torch.device("meta"):
        model = LlavaNextVideoForConditionalGeneration(config)
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    total = sum(p.numel() for p in model.parameters())
    return ParamCounts(quantisable=linear, other=total - linear)


def weight_bytes(counts: ParamCounts, precision: str) -> float:
    """Bytes of weights in ``precision`` (bf16/fp16/fp32, or 8bit/4bit with the rest in 16 bits)."""
    if precision in QUANTISED:
        return counts.quantisable * BYTES_PER_PARAM[precision] + counts.other * 2.0
    return (counts.quantisable + counts.other) * BYTES_PER_PARAM[precision]


def bytes_per_token(config: Any, activation_bytes: int = 2) -> float:
    """Peak activation bytes per prompt token of one prefill pass (see the module docstring)."""
    text = config.text_config
    return MARGIN * activation_bytes * (3 * text.intermediate_size + 3 * text.hidden_size)


def max_image_tokens(config: Any) -> int:
    """Image tokens of the largest anyres grid: the base tile plus the grid's patches and newlines
    (a 640x640 image reaches it: 2928 for the 7B model at 336 px)."""
    patch, size = config.vision_config.patch_size, config.vision_config.image_size
    base = (size // patch) ** 2
    return base + max((h // patch) * (w // patch) + h // patch for h, w in config.image_grid_pinpoints)


def item_bytes(config: Any, activation_bytes: int = 2) -> float:
    """Activation bytes of the most expensive item (the largest image prompt)."""
    return (max_image_tokens(config) + TEXT_TOKENS) * bytes_per_token(config, activation_bytes)


def batch_for(free_bytes: float, config: Any, activation_bytes: int = 2) -> int:
    """Items per forward pass that fit in ``free_bytes`` (after the weights are loaded), 1..64."""
    fits = int((free_bytes - RESERVE_BYTES) // item_bytes(config, activation_bytes))
    return max(1, min(MAX_BATCH, fits))


def memory_table(config: Any, cards_gb: tuple[int, ...] = (16, 24, 48, 80)) -> list[dict[str, Any]]:
    """Per card size and precision: weights, what is left, and the batch of 640x640 images that fits.
    A card's size is taken as its nominal GB (10^9 bytes): at or below what torch reports for it."""
    counts = param_counts(config)
    rows = []
    for card in cards_gb:
        for precision in ("bf16", "8bit", "4bit"):
            weights = weight_bytes(counts, precision)
            left = card * 1e9 - weights
            batch = batch_for(left, config) if left - RESERVE_BYTES >= item_bytes(config) else 0
            rows.append({"gpu_gb": card, "precision": precision, "weights_gib": round(weights / GIB, 1),
                         "left_gib": round(left / GIB, 1), "batch": batch})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| GPU memory | precision | weights | left for activations | 640x640 images per pass |",
             "|---|---|---|---|---|"]
    for r in rows:
        batch = "does not fit" if r["batch"] == 0 else str(r["batch"])
        lines.append(f"| {r['gpu_gb']} GB | {r['precision']} | {r['weights_gib']} GiB | {r['left_gib']} GiB | {batch} |")
    return "\n".join(lines)

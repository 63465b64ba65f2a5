"""The offline ``tiny`` LLaVA-NeXT-Video preset and the offline processor recipe.

The tiny model is a ``LlavaNextVideoForConditionalGeneration`` with a 2-layer CLIP vision tower
(112 px, 14 px patches), a 2-layer Llama and seeded random weights. Its tokenizer is a Llama-style
BPE (``▁`` word prefix, byte fallback) built here from a small word list, with ``<image>``,
``<video>`` and ``<pad>`` special tokens and left padding. The processor is the official
``LlavaNextVideoProcessor`` carrying fallwatch's shipped chat template. At 112 px a 640x640 image
becomes 336 image tokens and an 8-frame clip 128 video tokens; the real model works at 336 px
(:func:`build_processor` with ``size=336`` reproduces its counts).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from fallwatch.hub import build_atomically
from edge_worker.rng import seeded

RECIPE_VERSION = 1
TINY_SIZE = 112
PATCH = 14
TEMPLATE = "llava_next_video.jinja"
LLAMA_VOCAB = 32000
SHRUNK_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "projection_dim": 32}
SHRUNK_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 4}
SPECIAL_TOKENS = {"image_token": "<image>", "video_token": "<video>"}
WORDS = (
    "USER ASSISTANT SYSTEM Is is Are are the a an person people someone man woman falling fall fallen "
    "lying on floor ground standing sitting walking Answer answer yes no Yes No or Describe describe "
    "briefly what doing in this image video picture The There there and of to"
).split()


def pinpoints(size: int) -> list[list[int]]:
    """LLaVA-NeXT's anyres grid for a base tile of ``size`` px (336 gives the public 7B grid)."""
    return [[size, 2 * size], [2 * size, size], [2 * size, 2 * size], [3 * size, size], [size, 3 * size]]


def chat_template() -> str:
    """The LLaVA-style chat template fallwatch ships, for models that come without one."""
    return resources.files("cloud_worker").joinpath("templates", TEMPLATE).read_text()


def tiny_dir_name(seed: int) -> str:
    return "tiny-llava-next-video" if seed == 0 else f"tiny-llava-next-video-seed{seed}"


def ensure_tiny_llava(root: Path, seed: int = 0) -> Path:
    """The tiny LLaVA-NeXT-Video directory under ``root``, built once (atomically) if missing or stale."""
    recipe = {"model": "tiny-llava-next-video", "version": RECIPE_VERSION, "seed": seed}
    return build_atomically(Path(root) / tiny_dir_name(seed), recipe, lambda d: build_tiny_llava(d, seed))


def _bpe_chain(token: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Add ``token`` and the left-to-right merges that build it from single characters."""
    prefix = token[0]
    for ch in token[1:]:
        pair = (prefix, ch)
        prefix += ch
        if prefix not in vocab:
            vocab[prefix] = len(vocab)
            merges.append(pair)


def tiny_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A deterministic Llama-style BPE vocabulary: specials, 256 byte tokens, ASCII chars, words."""
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for ch in ["▁", *(chr(c) for c in range(33, 127))]:
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # "▁word" first: it wins over the bare word inside a sentence
        _bpe_chain("▁" + word, vocab, merges)
    for word in WORDS:
        _bpe_chain(word, vocab, merges)
    return vocab, merges


def build_tokenizer() -> Any:
    from transformers import LlamaTokenizer

    vocab, merges = tiny_bpe()
    return LlamaTokenizer(
        vocab=vocab, merges=merges, add_bos_token=True, padding_side="left", pad_token="<pad>",
        extra_special_tokens=SPECIAL_TOKENS,
    )


def shrunk(config: dict[str, Any]) -> dict[str, Any]:
    """A LLaVA-NeXT-Video config dict with tiny layers: image size, patches, anyres grid, token ids
    and feature strategy stay as they are (so token counts are the real model's)."""
    out = {**config, "vision_config": {**config["vision_config"], **SHRUNK_VISION},
           "text_config": {**config["text_config"], **SHRUNK_TEXT}}
    return out


def published_tokenizer() -> Any:
    """The tiny word list as a Llama-style tokenizer with LLaVA-NeXT-Video-7B's token ids: padded to
    Llama's 32000 ids, then ``<video>`` 32000, ``<image>`` 32001 and ``<pad>`` 32002 (as its repo
    adds them, without ``extra_special_tokens``), so the full-size config runs offline."""
    from transformers import LlamaTokenizer

    vocab, merges = tiny_bpe()
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), LLAMA_VOCAB)})
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<video>", "<image>", "<pad>"]})
    tokenizer.pad_token = "<pad>"
    return tokenizer


def build_processor(tokenizer: Any, size: int, template: str | None = None) -> Any:
    """The official ``LlavaNextVideoProcessor`` assembled offline for ``size`` px tiles."""
    from transformers import LlavaNextImageProcessor, LlavaNextVideoProcessor, LlavaNextVideoVideoProcessor

    shape = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    return LlavaNextVideoProcessor(
        image_processor=LlavaNextImageProcessor(**shape, image_grid_pinpoints=pinpoints(size)),
        video_processor=LlavaNextVideoVideoProcessor(**shape),
        tokenizer=tokenizer,
        chat_template=template,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def tiny_llava_config(tokenizer: Any) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig

    vocab_size = -(-len(tokenizer) // 64) * 64
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=TINY_SIZE, patch_size=PATCH, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.1,
    )
    return LlavaNextVideoConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints(TINY_SIZE), spatial_pool_stride=2,
        image_seq_length=(TINY_SIZE // PATCH) ** 2, video_seq_length=(TINY_SIZE // PATCH // 2) ** 2,
    )


def build_tiny_llava(out: Path, seed: int = 0) -> None:
    """Write the tiny model and its processor (with the shipped chat template) into ``out``."""
    from transformers import LlavaNextVideoForConditionalGeneration

    tokenizer = build_tokenizer()
    with seeded(seed):
        model = LlavaNextVideoForConditionalGeneration(tiny_llava_config(tokenizer))
    model.save_pretrained(out)
    build_processor(tokenizer, TINY_SIZE, chat_template()).save_pretrained(out)

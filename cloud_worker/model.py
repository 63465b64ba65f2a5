"""The cloud model: LLaVA-NeXT-Video answering "is the person falling?" on images and clips.

``CloudModel.score`` builds one chat prompt per item through the processor's chat template (or
fallwatch's shipped LLaVA template when the model directory has none), left-pads the batch and
runs one forward pass per group of items whose prompts are equally long (images of one size, and
clips), keeping only the last position's logits. No generation is involved. Grouping matters for
the 7B model: a 640x640 image is 2928 image tokens and an 8-frame clip 1152 video tokens, plus
about 20 text tokens each with its Vicuna tokenizer (``fallwatch models check`` prints the exact
prompt lengths; the tiny preset's tokenizer gives others). A mixed batch of 4 + 4 in one pass would
compute 8 x ~2950 positions where grouped passes compute 4 x ~2950 + 4 x ~1170 (30% less prefill).
``cloud.group_by_shape: false`` scores any batch in one pass. A group larger than
``cloud.forward_batch`` (or, unset, than what fits in the GPU memory left after loading) is
split into several passes.

Loading works with both layouts a model directory comes in: fallwatch's own (``save_pretrained``
of the processor) and the published hub repository's (one ``preprocessor_config.json``, no video
processor config, no ``num_additional_image_tokens``, old weight names). The processor is always
assembled from its parts (image processor, video processor, tokenizer, chat template), and its
``patch_size``, ``vision_feature_select_strategy`` and ``num_additional_image_tokens`` are taken
from the loaded model, so image placeholders always match the image features.

Yes/no: tokenizers spell the answer several ways (``▁yes``, ``yes``, ``▁Yes``, ``Yes``, ``YES``,
byte-level ``Ġyes``...). Every spelling that is a single token of the vocabulary counts. The yes
logit is the logsumexp of the next-token logits over all yes spellings, likewise for no, so
``softmax([yes, no])[0]`` is the model's total probability of answering any form of "yes",
renormalised over yes + no.

Energy: on a GPU, the NVML total-energy counter is read before and after the batch; elsewhere
``energy_j`` is None (never estimated). The counter is the whole GPU's: work of other processes
on the same GPU is counted too, and a per-item figure is the batch's energy split evenly over its
items. ``gpu_other_processes`` records how many other processes used the GPU meanwhile.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from cloud_worker import gpu_memory
from cloud_worker.energy import EnergyMeter
from cloud_worker.tiny import chat_template, ensure_tiny_llava
from fallwatch.hub import (
    ModelNotAvailable, ModelSetupError, ModelSource, check_model_type, check_weights, load_pretrained, resolve,
)
from fallwatch.settings import CloudSettings

log = structlog.get_logger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPELLINGS = {"yes": ("yes", "Yes", "YES"), "no": ("no", "No", "NO")}
WORD_PREFIXES = ("", "▁", "Ġ")  # none, sentencepiece word start, byte-level BPE word start
DESCRIBE_PROMPT = "Describe briefly what the person is doing."
EXAMPLE_MODEL = "llava-hf/LLaVA-NeXT-Video-7B-hf"
GPU_EXTRA = "pip install 'fallwatch[cloud,gpu]'"


@dataclass(frozen=True)
class CloudScores:
    p_fall: np.ndarray  # (B,) softmax over next-token logits of the "yes" vs "no" tokens
    yes_no_logits: np.ndarray  # (B, 2)
    wall_s: float
    energy_j: float | None  # the whole GPU's NVML energy counter delta over the call; None: no counter
    prompt_tokens: list[int]  # prompt length per item (image/video tokens included)
    gpu_other_processes: int | None = None  # other processes on the GPU during the call; None: not known


@dataclass(frozen=True)
class TokenCounts:
    prompt: int  # the whole prompt, image/video tokens included
    image: int
    video: int


@dataclass(frozen=True)
class AnswerTokens:
    yes: tuple[int, ...]
    no: tuple[int, ...]


class CloudModel:
    """A loaded LLaVA-NeXT-Video model with its processor; build it with :meth:`load`."""

    def __init__(self, model_id: str, model: Any, processor: Any, cfg: CloudSettings, device: torch.device,
                 forward_batch: int | None = None):
        self.model_id = model_id
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.dtype = model.dtype
        self.question = cfg.question
        self.num_frames = cfg.num_frames
        self.group_by_shape = cfg.group_by_shape
        self.forward_batch = forward_batch or cfg.forward_batch  # None: a whole shape group per pass
        self.answers = answer_tokens(self.tokenizer, model_id)
        self._prompts = {kind: self._prompt(kind, cfg.question) for kind in ("image", "video")}
        self._energy = EnergyMeter.for_device(device)

    @classmethod
    def load(cls, cfg: CloudSettings, cache_dir: Path | None = None) -> "CloudModel":
        """Load ``cfg.model`` (hub id, local directory or ``tiny``) as configured by ``cfg``."""
        from transformers import AutoConfig, LlavaNextVideoForConditionalGeneration

        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        kwargs = model_kwargs(cfg, dtype, device)
        source = resolve(cfg.model, "cloud", ensure_tiny_llava, cache_dir)
        config = load_pretrained("cloud", source, AutoConfig.from_pretrained)
        check_model_type("cloud", source, config, "llava_next_video", EXAMPLE_MODEL)
        processor = load_processor(source)
        model, info = load_pretrained("cloud", source, LlavaNextVideoForConditionalGeneration.from_pretrained,
                                      output_loading_info=True, **kwargs)
        check_weights("cloud", source, info)
        match_processor(processor, model, source)
        batch = cfg.forward_batch or auto_forward_batch(model, device)
        log.info("cloud_model_loaded", model=cfg.model, dtype=str(dtype), device=str(device),
                 quantization=cfg.quantization, forward_batch=batch)
        return cls(cfg.model, model.eval(), processor, cfg, device, batch)

    def _prompt(self, kind: str, text: str) -> str:
        conversation = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def prepare(self, items: Sequence[np.ndarray], question: str | None = None) -> dict[str, torch.Tensor]:
        """Processor output for a left-padded batch of images (HxWx3) and clips (TxHxWx3), on the device."""
        if len(items) == 0:
            raise ValueError("CloudModel needs at least one item")
        prompts, images, videos = [], [], []
        for item in items:
            kind = item_kind(item)
            item = item if item.flags.writeable else item.copy()  # torch cannot share read-only memory
            prompts.append(self._prompt(kind, question) if question else self._prompts[kind])
            (images if kind == "image" else videos).append(
                item if kind == "image" else sample_frames(item, self.num_frames)
            )
        enc = self.processor(  # the torchvision processors resize on the model's device (a GPU's, if any)
            text=prompts, images=images or None, videos=videos or None, padding=True, return_tensors="pt",
            device=str(self.device),
        )
        return {k: self._to_device(v) for k, v in enc.items()}

    def _to_device(self, value: torch.Tensor) -> torch.Tensor:
        if value.is_floating_point():
            return value.to(self.device, self.dtype)
        return value.to(self.device)

    def score(self, items: Sequence[np.ndarray]) -> CloudScores:
        """p(fall) for each image or clip, in input order: one forward pass per shape group (or one in
        all with ``group_by_shape`` off). Wall time and energy cover the whole call."""
        if len(items) == 0:
            raise ValueError("CloudModel needs at least one item")
        start = time.perf_counter()
        energy_start = self._energy.read_j()
        groups = shape_groups(items) if self.group_by_shape else [list(range(len(items)))]
        groups = split_groups(groups, self.forward_batch)
        others = self._energy.other_processes()
        yes_no = np.zeros((len(items), 2), dtype=np.float32)
        prompt_tokens = [0] * len(items)
        for idx in groups:
            logits, lengths = self.forward_yes_no([items[i] for i in idx])
            yes_no[idx] = logits
            for i, n in zip(idx, lengths):
                prompt_tokens[i] = n
        energy_end = self._energy.read_j()
        p_fall = torch.softmax(torch.from_numpy(yes_no), dim=1)[:, 0].numpy()
        return CloudScores(
            p_fall=p_fall.astype(np.float32),
            yes_no_logits=yes_no,
            wall_s=time.perf_counter() - start,
            energy_j=None if energy_start is None or energy_end is None else energy_end - energy_start,
            prompt_tokens=prompt_tokens,
            gpu_other_processes=_most(others, self._energy.other_processes()),
        )

    def forward_yes_no(self, items: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        """ONE forward pass over the left-padded batch: (B, 2) yes/no logits and each prompt's length."""
        inputs = self.prepare(items)
        mask = inputs["attention_mask"]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt starts at 0
        with torch.inference_mode():
            out = self.model(**inputs, position_ids=position_ids, logits_to_keep=1, use_cache=False)
        logits = out.logits[:, -1, :].float()
        yes_no = torch.stack([self._combine(logits, self.answers.yes), self._combine(logits, self.answers.no)], dim=1)
        return yes_no.cpu().numpy().astype(np.float32), [int(n) for n in mask.sum(dim=1).tolist()]

    @staticmethod
    def _combine(logits: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
        return torch.logsumexp(logits[:, list(ids)], dim=1)

    def token_counts(self, item: np.ndarray) -> TokenCounts:
        """How many prompt, image and video tokens ``item`` takes."""
        ids = self.prepare([item])["input_ids"][0]
        cfg = self.model.config
        return TokenCounts(
            prompt=int(ids.numel()),
            image=int((ids == cfg.image_token_id).sum()),
            video=int((ids == cfg.video_token_id).sum()),
        )

    def describe(self, item: np.ndarray, max_new_tokens: int = 40) -> str:
        """A short free-text description of ``item`` (greedy generation), e.g. for notifications."""
        inputs = self.prepare([item], question=DESCRIBE_PROMPT)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
            )
        new_tokens = out[0, inputs["input_ids"].shape[1]:]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def answer_tokens(tokenizer: Any, model_id: str) -> AnswerTokens:
    """Every single-token spelling of "yes" and "no" in the tokenizer's vocabulary."""
    vocab = tokenizer.get_vocab()
    found = {}
    for answer, spellings in SPELLINGS.items():
        ids = {vocab[p + s] for s in spellings for p in WORD_PREFIXES if p + s in vocab}
        for text in (*spellings, *(" " + s for s in spellings)):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
        ids.discard(tokenizer.unk_token_id)
        if not ids:
            raise ModelNotAvailable(f"cloud model {model_id!r}: its tokenizer has no single token for {answer!r}")
        found[answer] = tuple(sorted(ids))
    if set(found["yes"]) & set(found["no"]):
        raise ModelNotAvailable(f"cloud model {model_id!r}: 'yes' and 'no' share a token id")
    return AnswerTokens(yes=found["yes"], no=found["no"])


def item_kind(item: np.ndarray) -> str:
    """"image" for HxWx3 uint8, "video" for TxHxWx3 uint8; ValueError otherwise."""
    if not isinstance(item, np.ndarray) or item.dtype != np.uint8 or item.shape[-1:] != (3,):
        shape = getattr(item, "shape", None)
        raise ValueError(f"expected a uint8 HxWx3 image or TxHxWx3 clip, got {type(item).__name__} {shape}")
    if item.ndim == 3:
        return "image"
    if item.ndim == 4 and item.shape[0] > 0:
        return "video"
    raise ValueError(f"expected a uint8 HxWx3 image or TxHxWx3 clip, got shape {item.shape}")


def shape_groups(items: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of ``items`` grouped so that each group's prompts are equally long: images by height
    and width (the anyres grid, hence the token count, follows the size), clips all together (every
    clip is sampled to the same number of frames and resized to one crop). First-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(items):
        key = (0,) if item_kind(item) == "video" else (1, *item.shape[:2])
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def sample_frames(clip: np.ndarray, num_frames: int) -> np.ndarray:
    """``num_frames`` frames taken uniformly over the clip (repeats when it is shorter), C-contiguous."""
    if clip.shape[0] == num_frames:
        return np.ascontiguousarray(clip)
    idx = np.linspace(0, clip.shape[0] - 1, num_frames).round().astype(np.int64)
    return np.ascontiguousarray(clip[idx])


def split_groups(groups: list[list[int]], size: int | None) -> list[list[int]]:
    """Each group cut into passes of at most ``size`` items (None: uncut)."""
    if not size:
        return groups
    return [g[i:i + size] for g in groups for i in range(0, len(g), size)]


def _most(a: int | None, b: int | None) -> int | None:
    return None if a is None and b is None else max(x for x in (a, b) if x is not None)


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available else cpu; a CUDA device without CUDA is a clear error. CUDA
    devices come back with their index (``cuda`` → ``cuda:N``, the current device)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSetupError(f"cloud.device is {name!r} but torch sees no CUDA device; set cloud.device: cpu (or auto)")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 (compute capability 8.0+, or ROCm); emulated bf16 does not count."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The configured dtype; half precision falls back to fp32 on the CPU, bf16 to fp16 on a GPU
    without bf16 (before Ampere), each with a log line."""
    if device.type == "cpu" and name != "fp32":
        log.info("cloud_dtype_fallback", requested=name, used="fp32", device="cpu")
        return torch.float32
    if device.type == "cuda" and name == "bf16" and not bf16_supported(device):
        log.warning("cloud_dtype_fallback", requested=name, used="fp16", device=str(device),
                    gpu=torch.cuda.get_device_name(device), reason="no native bf16 on this GPU")
        return torch.float16
    return DTYPES[name]


def needs_package(setting: str, package: str, module: str, instead: str) -> None:
    """A one-line error naming the install line when an optional package is missing."""
    if importlib.util.find_spec(module) is None:
        raise ModelSetupError(
            f"{setting} needs the {package} package, which is not installed ({GPU_EXTRA} or pip install {package}), "
            f"or set {instead}"
        )


def model_kwargs(cfg: CloudSettings, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """``from_pretrained`` arguments: dtype, attention kernel, straight onto the device (``device_map``:
    no copy of the 14 GB of weights through host memory), bitsandbytes quantisation."""
    if cfg.attn_implementation == "flash_attention_2":
        needs_package("cloud.attn_implementation=flash_attention_2", "flash-attn", "flash_attn",
                      "cloud.attn_implementation: sdpa")
        _needs_cuda("cloud.attn_implementation=flash_attention_2", device, "cloud.attn_implementation: sdpa")
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": cfg.attn_implementation}
    if device.type != "cpu":
        if importlib.util.find_spec("accelerate") is None:
            raise ModelSetupError(f"loading onto {device} needs the accelerate package (pip install 'fallwatch[cloud]')")
        kwargs["device_map"] = {"": str(device)}
    return {**kwargs, **_quantization(cfg, dtype, device)}


def _needs_cuda(setting: str, device: torch.device, instead: str) -> None:
    if device.type != "cuda":
        raise ModelSetupError(f"{setting} needs a CUDA GPU (cloud.device is {device}); set {instead}")


def _quantization(cfg: CloudSettings, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    if cfg.quantization == "none":
        return {}
    setting = f"cloud.quantization={cfg.quantization}"
    needs_package(setting, "bitsandbytes", "bitsandbytes", "cloud.quantization: none")
    _needs_cuda(setting, device, "cloud.quantization: none")
    from transformers import BitsAndBytesConfig

    bits = {"4bit": {"load_in_4bit": True, "bnb_4bit_compute_dtype": dtype}, "8bit": {"load_in_8bit": True}}
    return {"quantization_config": BitsAndBytesConfig(**bits[cfg.quantization]), "device_map": {"": str(device)}}


def load_processor(source: ModelSource) -> Any:
    """The official ``LlavaNextVideoProcessor`` assembled from the directory's parts.

    ``AutoProcessor`` needs a directory that describes every part; on the published layout (no
    ``video_preprocessor_config.json``) its video-processor lookup resolves to the processor
    itself and recurses without end. Here the image processor reads ``preprocessor_config.json``,
    the video processor ``video_preprocessor_config.json`` or, missing that, the same file; the
    tokenizer its own files (left padding); the chat template comes from the processor's files,
    else the tokenizer's, else fallwatch's shipped LLaVA template."""
    from transformers import AutoTokenizer, LlavaNextImageProcessor, LlavaNextVideoProcessor, LlavaNextVideoVideoProcessor

    saved, _ = load_pretrained("cloud", source, LlavaNextVideoProcessor.get_processor_dict)
    tokenizer = load_pretrained("cloud", source, AutoTokenizer.from_pretrained, padding_side="left")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    template = saved.get("chat_template") or getattr(tokenizer, "chat_template", None)
    if not template:
        log.info("cloud_chat_template_fallback", model=source.name)
    return LlavaNextVideoProcessor(
        image_processor=load_pretrained("cloud", source, LlavaNextImageProcessor.from_pretrained),
        video_processor=load_pretrained("cloud", source, LlavaNextVideoVideoProcessor.from_pretrained),
        tokenizer=tokenizer,
        chat_template=template or chat_template(),
    )


def extra_vision_tokens(model: Any) -> int:
    """Tokens the vision tower adds to its patches (CLIP's CLS: 1; SigLIP: 0), read off its embeddings."""
    tower = model.model.vision_tower
    embeddings = getattr(tower, "embeddings", None) or getattr(getattr(tower, "vision_model", None), "embeddings", None)
    positions, patches = getattr(embeddings, "num_positions", None), getattr(embeddings, "num_patches", None)
    if positions is None or patches is None:
        return int(model.config.vision_config.model_type == "clip_vision_model")
    return int(positions - patches)


def match_processor(processor: Any, model: Any, source: ModelSource) -> None:
    """Set the processor's patch size, feature strategy and extra tokens from the loaded model, and
    check that its placeholder tokens are the model's: the image/video placeholders then always
    match the features the model computes (transformers defaults the extra tokens to 0, one too few
    for CLIP: 2927 placeholders for 2928 features of a 640x640 image)."""
    config = model.config
    processor.patch_size = int(config.vision_config.patch_size)
    processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    processor.num_additional_image_tokens = extra_vision_tokens(model)
    for kind in ("image", "video"):
        expected, found = getattr(config, f"{kind}_token_id"), getattr(processor, f"{kind}_token_id")
        if expected != found:
            raise ModelNotAvailable(
                f"cloud model at {source.location}: its tokenizer gives {getattr(processor, f'{kind}_token')!r} the id "
                f"{found} but its config.json expects {kind}_token_index {expected}; the tokenizer and model do not match"
            )


def auto_forward_batch(model: Any, device: torch.device) -> int | None:
    """Items per forward pass that fit in the GPU memory left after loading (None off the GPU)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    activation_bytes = torch.finfo(model.dtype).bits // 8
    batch = gpu_memory.batch_for(free, model.config, activation_bytes)
    log.info("cloud_forward_batch_auto", device=str(device), free_gib=round(free / gpu_memory.GIB, 2),
             total_gib=round(total / gpu_memory.GIB, 2), forward_batch=batch)
    return batch

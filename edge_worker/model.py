"""The edge model: ViLT VQA answering "is the person falling?" on single frames.

``EdgeModel.score`` returns, per image, p(fall) = softmax over the [yes, no] answer logits
(averaged over the configured questions) and the 1536-d feature the DMD switcher reads: the
activation after ``classifier[:3]`` (Linear → LayerNorm → GELU), i.e. the input of the final
answer Linear. ViLT-B/32 gives 1536 features; the ``tiny`` preset gives ``2 * hidden`` = 64.
``feature_dim`` always reports the loaded model's size.

The model runs once per question: ``vilt`` → ``classifier[:3]`` → ``classifier[3]``, so features
and logits come from the same forward pass. That pass sees the question's real tokens only (not
its padding) and computes the last encoder layer for the first token only, the one the pooler
reads: the same pooled output as ViLT's own forward pass (checked on every load; if it differs,
ViLT's forward is used) for about a quarter less compute on a 640x640 frame; each layer's attention
runs one frame at a time on views of its projections, without the copies into head-major order
that ViLT's own attention makes (docs/benchmarks.md).
Scores are reproducible bit for bit. Images of different sizes in one batch are padded by the
image processor and masked with ``pixel_mask``; a batch scores like its items one by one (within
float tolerance).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from fallwatch.hub import (
    ModelNotAvailable, ModelSetupError, check_model_type, check_weights, load_pretrained, resolve,
)
from edge_worker.rng import seeded
from edge_worker.tiny import ensure_tiny_vilt
from fallwatch.settings import EdgeSettings

log = structlog.get_logger(__name__)

YES, NO = "yes", "no"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class EdgeScores:
    p_fall: np.ndarray  # (B,) float32 in [0,1]: softmax over [yes, no] answer logits, averaged over questions
    features: np.ndarray  # (B, F) float32: classifier[:3] activation, mean over questions
    yes_no_logits: np.ndarray  # (B, Q, 2) float32: [yes, no] logits per question
    wall_s: float  # wall time of the batch


@dataclass(frozen=True)
class EdgeOutputs:
    features: torch.Tensor  # (B, Q, F) float32, per question
    logits: torch.Tensor  # (B, Q, A) float32, every answer of the VQA head


@dataclass(frozen=True)
class _Question:
    text: str
    input_ids: torch.Tensor  # (1, L): padded to the model's text positions
    attention_mask: torch.Tensor  # (1, L)
    token_type_ids: torch.Tensor  # (1, L)
    length: int  # up to the last real token: the forward pass runs on these only

    def tokens(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, token_type_ids) without the padding, expanded to ``batch``."""
        return tuple(t[:, :self.length].expand(batch, -1)  # type: ignore[return-value]
                     for t in (self.input_ids, self.attention_mask, self.token_type_ids))


class EdgeModel:
    """A loaded ViLT VQA model with its processor; build it with :meth:`load`."""

    def __init__(self, model_id: str, model: Any, processor: Any, questions: Sequence[str], device: torch.device):
        self.model_id = model_id
        self.model = model
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.questions = tuple(questions)
        self.feature_dim = int(model.classifier[3].in_features)
        self.patch_size = int(model.config.patch_size)
        self.yes_no_ids = answer_ids(model.config, model_id)
        self._encoded = [self._encode_question(q) for q in self.questions]
        self._fast = self._check_fast_path()
        from transformers.image_processing_backends import TorchvisionBackend

        if not isinstance(self.image_processor, TorchvisionBackend):
            log.warning("edge_slow_image_processor", model=model_id, processor=type(self.image_processor).__name__)

    @classmethod
    def load(cls, cfg: EdgeSettings, cache_dir: Path | None = None) -> "EdgeModel":
        """Load ``cfg.model`` (hub id, local directory or ``tiny``) as configured by ``cfg``."""
        from transformers import AutoConfig, ViltForQuestionAnswering, ViltProcessor

        _check_modes(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        source = resolve(cfg.model, "edge", ensure_tiny_vilt, cache_dir)
        config = load_pretrained("edge", source, AutoConfig.from_pretrained)
        check_model_type("edge", source, config, "vilt", "dandelin/vilt-b32-finetuned-vqa")
        answer_ids(config, cfg.model)  # fail before the weights load
        processor = load_pretrained("edge", source, ViltProcessor.from_pretrained)
        device = torch.device(cfg.device)
        model, info = load_pretrained("edge", source, ViltForQuestionAnswering.from_pretrained, dtype=DTYPES[cfg.dtype],
                                      output_loading_info=True)
        check_weights("edge", source, info)
        model = model.to(device).eval()  # 118M parameters: no need for device_map (and accelerate)
        if cfg.int8:
            model = quantize_int8(model)
        log.info("edge_model_loaded", model=cfg.model, dtype=cfg.dtype, int8=cfg.int8, device=cfg.device)
        return cls(cfg.model, model, processor, cfg.questions, device)

    def _encode_question(self, text: str) -> _Question:
        max_len = int(self.model.config.max_position_embeddings)
        enc = self.tokenizer(text, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
        token_types = enc.get("token_type_ids", torch.zeros_like(enc["input_ids"]))
        length = int(enc["attention_mask"][0].nonzero().max()) + 1
        tensors = (t.to(self.device) for t in (enc["input_ids"], enc["attention_mask"], token_types))
        return _Question(text, *tensors, length=length)

    def preprocess(self, images: Sequence[np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
        """``pixel_values`` (B,3,H,W) in the model's dtype and ``pixel_mask`` (B,H,W) for a batch."""
        tensors = [as_chw_uint8(img) for img in images]
        enc = self.image_processor(images=tensors, return_tensors="pt")
        return {
            "pixel_values": enc["pixel_values"].to(self.device, self.dtype),
            "pixel_mask": enc["pixel_mask"].to(self.device),
        }

    def image_tokens(self, image: np.ndarray | torch.Tensor) -> int:
        """Number of image tokens ViLT sees for ``image``: its unpadded patches plus the image CLS."""
        mask = self.preprocess([image])["pixel_mask"][0]
        rows, cols = int(mask[:, 0].sum()), int(mask[0].sum())
        return (rows // self.patch_size) * (cols // self.patch_size) + 1

    def outputs(self, images: Sequence[np.ndarray | torch.Tensor]) -> EdgeOutputs:
        """Features and ALL answer logits per question, in fp32 (what :meth:`score` reduces)."""
        if len(images) == 0:
            raise ValueError("EdgeModel needs at least one image")
        # ViLT shuffles its patch tokens with torch.multinomial: a fixed private seed makes the
        # scores reproducible bit for bit and leaves the caller's RNG untouched.
        with torch.inference_mode(), seeded(0, self.device):
            pixels = self.preprocess(images)
            per_question = [self._forward(q, pixels) for q in self._encoded]
        return EdgeOutputs(
            features=torch.stack([f for f, _ in per_question], dim=1).float(),
            logits=torch.stack([lg for _, lg in per_question], dim=1).float(),
        )

    def score(self, images: Sequence[np.ndarray | torch.Tensor]) -> EdgeScores:
        """Score RGB uint8 frames (HxWx3 arrays or 3xHxW tensors) in one batch."""
        start = time.perf_counter()
        out = self.outputs(images)
        yes_no = out.logits[..., list(self.yes_no_ids)]  # (B, Q, 2)
        p_fall = torch.softmax(yes_no, dim=-1)[..., 0].mean(dim=1)
        return EdgeScores(
            p_fall=p_fall.cpu().numpy().astype(np.float32),
            features=out.features.mean(dim=1).cpu().numpy().astype(np.float32),
            yes_no_logits=yes_no.cpu().numpy().astype(np.float32),
            wall_s=time.perf_counter() - start,
        )

    def _forward(self, q: _Question, pixels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One question over a batch, on the question's real tokens only: under the attention mask
        the padding changes nothing, but it is 40 of 185 tokens of a 640x640 frame's forward pass."""
        input_ids, attention_mask, token_type_ids = q.tokens(pixels["pixel_values"].shape[0])
        if self._fast:
            pooled = pooled_output(self.model.vilt, input_ids, attention_mask, token_type_ids, pixels)
        else:
            pooled = self.model.vilt(input_ids=input_ids, attention_mask=attention_mask,
                                     token_type_ids=token_type_ids, **pixels).pooler_output
        features = self.model.classifier[:3](pooled)
        return features, self.model.classifier[3](features)

    def _check_fast_path(self) -> bool:
        """Whether :func:`pooled_output` agrees with the model's own forward pass on this model (two
        frames of different sizes, so the pixel mask pads); if not, the model's forward is used."""
        q = self._encoded[0]
        images = [torch.full((3, 64, 80), 90, dtype=torch.uint8), torch.full((3, 64, 64), 160, dtype=torch.uint8)]
        try:
            with torch.inference_mode():
                pixels = self.preprocess(images)
                tokens = q.tokens(len(images))
                with seeded(0, self.device):
                    fast = pooled_output(self.model.vilt, *tokens, pixels).float()
                with seeded(0, self.device):
                    ref = self.model.vilt(input_ids=tokens[0], attention_mask=tokens[1], token_type_ids=tokens[2],
                                          **pixels).pooler_output.float()
        except (AttributeError, TypeError, ValueError, RuntimeError) as exc:
            log.warning("edge_fast_path_disabled", model=self.model_id, error=str(exc))
            return False
        cosine = float(torch.nn.functional.cosine_similarity(fast, ref, dim=1).min())
        if cosine < 0.999:
            log.warning("edge_fast_path_disabled", model=self.model_id, cosine=round(cosine, 6))
            return False
        return True


def pooled_output(vilt: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                  pixels: dict[str, torch.Tensor]) -> torch.Tensor:
    """``ViltModel(...).pooler_output``, computed by :func:`_layer` (the same layer without its
    attention's copies), with the last encoder layer computed for the first token only: the pooler
    reads nothing else, and the other tokens' attention and MLP in that layer are about 7% of the
    forward pass."""
    hidden, mask = vilt.embeddings(input_ids, attention_mask, token_type_ids, pixels["pixel_values"],
                                   pixels["pixel_mask"], None, None, image_token_type_idx=1)
    additive = None  # every token attends to every token: no mask to add
    if not bool(mask.all()):
        additive = (1.0 - mask[:, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min  # (B, 1, L)
    *layers, last = vilt.encoder.layer
    for layer in layers:
        hidden = _layer(layer, hidden, additive)
    return vilt.pooler(vilt.layernorm(_layer(last, hidden, additive, first_only=True)))


def _layer(layer: Any, hidden: torch.Tensor, additive_mask: torch.Tensor | None,
           first_only: bool = False) -> torch.Tensor:
    """A ViltLayer's output (B, L, H), or for token 0 only (B, 1, H) when ``first_only``: its query
    attends to every token."""
    x = layer.layernorm_before(hidden)
    residual = hidden[:, :1] if first_only else hidden
    h = layer.attention.output(_attention(layer.attention.attention, x, additive_mask, first_only), None) + residual
    return layer.output(layer.intermediate(layer.layernorm_after(h)), h)


def _attention(attn: Any, x: torch.Tensor, additive_mask: torch.Tensor | None, first_only: bool) -> torch.Tensor:
    """ViltSelfAttention's context (B, Lq, H), one frame at a time: each frame's query, key and value
    are read as (heads, tokens, head size) views of the projections, so that the two batched products
    run on them as they are. The batched 4-D ``matmul`` copies all three, and the context, into
    head-major order first; that copying was about 6% of a 640x640 frame's time, and more at 640x480.
    The 1/sqrt(head size) scale and the padding mask ride the first product (``baddbmm``)."""
    batch, length, width = x.shape
    heads, size = attn.num_attention_heads, attn.attention_head_size
    query = attn.query(x[:, :1] if first_only else x)
    key, value = attn.key(x), attn.value(x)
    queries = query.shape[1]
    beta = 0.0 if additive_mask is None else 1.0  # beta=0: the zeros are not even read
    mask = x.new_zeros(batch, 1, 1) if additive_mask is None else additive_mask  # (B, 1, 1 or L): broadcast
    context = x.new_empty(batch, queries, heads, size)
    for b in range(batch):
        scores = torch.baddbmm(mask[b], query[b].view(queries, heads, size).transpose(0, 1),
                               key[b].view(length, heads, size).permute(1, 2, 0), beta=beta, alpha=1 / math.sqrt(size))
        probs = torch.softmax(scores, dim=-1)
        context[b] = torch.bmm(probs, value[b].view(length, heads, size).transpose(0, 1)).transpose(0, 1)
    return context.view(batch, queries, width)


def answer_ids(config: Any, model_id: str) -> tuple[int, int]:
    """The (yes, no) answer ids from ``config.label2id``; a clear error if the model lacks them."""
    label2id = {str(k).strip().lower(): int(v) for k, v in (config.label2id or {}).items()}
    missing = [a for a in (YES, NO) if a not in label2id]
    if missing:
        raise ModelNotAvailable(
            f"edge model {model_id!r} has no answer {' or '.join(map(repr, missing))} in config.label2id; "
            "it needs a VQA head with yes/no answers (e.g. dandelin/vilt-b32-finetuned-vqa)"
        )
    return label2id[YES], label2id[NO]


def as_chw_uint8(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A 3xHxW uint8 tensor view of an RGB frame (copies only when numpy cannot share the memory)."""
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 3xHxW tensor, got {image.dtype} {tuple(image.shape)}")
        return image
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 RGB array, got {image.dtype} {image.shape}")
    if not image.flags.writeable or any(s < 0 for s in image.strides):
        image = image.copy()  # torch cannot view negative strides or read-only memory
    return torch.from_numpy(image).permute(2, 0, 1)


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """CPU dynamic int8 quantisation of every Linear (weights int8, activations quantised on the fly).

    ``torch.ao.quantization.quantize_dynamic`` is deprecated in torch 2.x but still works; its
    deprecation warnings are silenced here rather than repeated on every load.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _check_modes(cfg: EdgeSettings) -> None:
    if cfg.int8 and (cfg.dtype != "fp32" or cfg.device != "cpu"):
        raise ModelSetupError(
            f"edge.int8 (dynamic quantisation) needs edge.dtype=fp32 and edge.device=cpu, "
            f"got dtype={cfg.dtype} device={cfg.device}"
        )
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSetupError(f"edge.device is {cfg.device!r} but torch sees no CUDA device; set edge.device: cpu")

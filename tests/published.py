"""Model directories in the layouts the two real models are published in, with tiny weights.

``write_llava_next_video`` writes what ``llava-hf/LLaVA-NeXT-Video-7B-hf`` ships (its config with
the real image sizes, anyres grid, token ids and feature strategy; one ``preprocessor_config.json``
naming ``LlavaNextImageProcessor``; no ``video_preprocessor_config.json``; a ``processor_config.json``
without ``num_additional_image_tokens``; ``chat_template.json``; a Llama tokenizer with ``<video>``
32000, ``<image>`` 32001 and ``<pad>`` 32002; sharded safetensors with the weight names from before
transformers renamed them). ``write_vilt_vqa`` writes what ``dandelin/vilt-b32-finetuned-vqa``
ships (its config and 3129-answer table, a feature-extractor-era ``preprocessor_config.json``, a
BERT WordPiece tokenizer, ``pytorch_model.bin``). Only the layer sizes are shrunk, so a test builds
either in a second; the facts come from the JSON files in ``tests/fixtures``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cloud_worker.tiny import published_tokenizer, shrunk

FIXTURES = Path(__file__).parent / "fixtures"
TINY_VILT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def fixture(name: str) -> dict[str, Any]:
    """A fixture JSON without its ``_comment``."""
    doc = json.loads((FIXTURES / name).read_text())
    doc.pop("_comment", None)
    return doc


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def llava_config(full_size: bool = False) -> dict[str, Any]:
    """The published config.json; with ``full_size`` off, only the layer sizes are shrunk."""
    config = fixture("llava_next_video_config.json")
    return config if full_size else shrunk(config)


def old_llava_name(name: str) -> str:
    """A LLaVA-NeXT-Video weight name as checkpoints spelled it before transformers' renames."""
    renames = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
               ("model.vision_tower.", "vision_tower.vision_model."),
               ("model.multi_modal_projector.", "multi_modal_projector."), ("model.image_newline", "image_newline"))
    for new, old in renames:
        if name.startswith(new):
            return old + name[len(new):]
    raise ValueError(f"unexpected weight name {name}")


def tiny_llava_state(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Seeded tiny weights (bf16, as published), keyed by today's names."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaNextVideoForConditionalGeneration(LlavaNextVideoConfig(**config))
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


def save_sharded(out: Path, state: dict[str, torch.Tensor], shards: int = 2) -> None:
    """``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``, as the hub has them."""
    from safetensors.torch import save_file

    names = sorted(state)
    weight_map, total = {}, 0
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_llava_next_video(out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write the published LLaVA-NeXT-Video layout into ``out``; returns the weights by today's names."""
    config = llava_config()
    write_llava_files(out, config)
    state = tiny_llava_state(config, seed)
    save_sharded(out, {old_llava_name(k): v for k, v in state.items()})
    return state


def write_llava_files(out: Path, config: dict[str, Any]) -> None:
    """Every file of the published layout but the weights."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                                                 "pad_token_id": 0, "transformers_version": "4.42.0.dev0"})
    published_tokenizer().backend_tokenizer.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", fixture("llava_next_video_tokenizer_config.json"))
    write_json(out / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                                 "unk_token": "<unk>"})
    write_json(out / "preprocessor_config.json", fixture("llava_next_video_preprocessor_config.json"))
    write_json(out / "processor_config.json", fixture("llava_next_video_processor_config.json"))
    write_json(out / "chat_template.json", fixture("llava_next_video_chat_template.json"))


def vilt_config(full_size: bool = False) -> dict[str, Any]:
    """The published ViLT VQA config.json with its 3129 answers; ``full_size`` off shrinks the layers."""
    config = fixture("vilt_b32_vqa_config.json")
    answers = fixture("vilt_vqa_answers.json")["answers"]
    config["id2label"] = {str(i): a for i, a in enumerate(answers)}
    config["label2id"] = {a: i for i, a in enumerate(answers)}
    if not full_size:
        config.update(TINY_VILT)
    return config


def vilt_vocab() -> list[str]:
    """A WordPiece vocabulary with BERT's special tokens at their bert-base-uncased ids."""
    from edge_worker.tiny import tiny_vocab

    words = [t for t in tiny_vocab() if not t.startswith("[")]
    return ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]


def write_vilt_vqa(out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write the published ViLT VQA layout into ``out``; returns the weights."""
    from transformers import ViltConfig, ViltForQuestionAnswering

    out.mkdir(parents=True, exist_ok=True)
    config = vilt_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViltForQuestionAnswering(ViltConfig(**config))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, out / "pytorch_model.bin")
    write_json(out / "config.json", config)
    write_json(out / "preprocessor_config.json", fixture("vilt_b32_vqa_preprocessor_config.json"))
    write_json(out / "tokenizer_config.json", fixture("vilt_b32_vqa_tokenizer_config.json"))
    write_json(out / "special_tokens_map.json", {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]",
                                                 "sep_token": "[SEP]", "unk_token": "[UNK]"})
    (out / "vocab.txt").write_text("\n".join(vilt_vocab()) + "\n")
    return state

"""The cloud model (LLaVA-NeXT-Video) on the offline tiny preset, plus full-size 7B facts."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud_worker.model import CloudModel, answer_tokens, item_kind, sample_frames, shape_groups
from cloud_worker.tiny import build_processor, build_tokenizer, chat_template, ensure_tiny_llava
from fallwatch.hub import ModelNotAvailable
from fallwatch.settings import CloudSettings

QUESTION = "Is the person falling? Answer yes or no."


def cfg(**kw: object) -> CloudSettings:
    return CloudSettings(model="tiny", device="cpu", **kw)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    ensure_tiny_llava(root)
    return root


@pytest.fixture(scope="module")
def cloud(tiny_root: Path) -> CloudModel:
    return CloudModel.load(cfg(), cache_dir=tiny_root)


def mixed_items(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(480, 640, 3), (12, 240, 320, 3), (640, 640, 3), (3, 100, 120, 3)]
    return [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]


def count_forward_passes(cloud: CloudModel, items: list[np.ndarray]) -> tuple[object, list[int]]:
    """Score ``items`` and record the batch size of every forward pass of the model."""
    passes: list[int] = []
    hook = cloud.model.register_forward_hook(lambda _m, _a, kw, _o: passes.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    try:
        return cloud.score(items), passes
    finally:
        hook.remove()


def test_tiny_scores_a_mixed_batch_one_pass_per_shape_group(cloud: CloudModel) -> None:
    items = mixed_items()  # two images of different sizes, two clips
    scores, passes = count_forward_passes(cloud, items)
    assert sorted(passes) == [1, 1, 2]  # each image alone, both clips together
    assert scores.p_fall.shape == (4,) and scores.p_fall.dtype == np.float32
    assert np.all((scores.p_fall >= 0) & (scores.p_fall <= 1))
    assert scores.yes_no_logits.shape == (4, 2)
    np.testing.assert_allclose(
        scores.p_fall, torch.softmax(torch.from_numpy(scores.yes_no_logits), 1)[:, 0].numpy(), rtol=1e-6
    )
    assert scores.energy_j is None  # CPU: no counter, nothing estimated
    assert scores.wall_s > 0
    assert scores.prompt_tokens == [cloud.token_counts(item).prompt for item in items]


def test_grouping_off_scores_the_batch_in_one_padded_pass(tiny_root: Path, cloud: CloudModel) -> None:
    items = mixed_items(3)
    one_pass = CloudModel.load(cfg(group_by_shape=False), cache_dir=tiny_root)
    ungrouped, passes = count_forward_passes(one_pass, items)
    assert passes == [4]
    grouped = cloud.score(items)
    np.testing.assert_allclose(grouped.yes_no_logits, ungrouped.yes_no_logits, atol=1e-4)
    assert grouped.prompt_tokens == ungrouped.prompt_tokens


def test_shape_groups_keep_prompts_of_one_length_together(cloud: CloudModel) -> None:
    rng = np.random.default_rng(4)
    items = [rng.integers(0, 256, s, dtype=np.uint8) for s in
             [(480, 640, 3), (8, 64, 64, 3), (480, 640, 3), (640, 640, 3), (3, 100, 120, 3), (480, 640, 3)]]
    groups = shape_groups(items)
    assert groups == [[0, 2, 5], [1, 4], [3]]
    for idx in groups:
        assert len({cloud.token_counts(items[i]).prompt for i in idx}) == 1
    with pytest.raises(ValueError, match="at least one item"):
        cloud.score([])


def test_batch_matches_single_items(cloud: CloudModel) -> None:
    items = mixed_items(1)
    batch = cloud.score(items)
    for i, item in enumerate(items):
        single = cloud.score([item])
        np.testing.assert_allclose(single.yes_no_logits[0], batch.yes_no_logits[i], atol=1e-4)
        assert single.prompt_tokens[0] == batch.prompt_tokens[i]


def test_preprocessing_runs_on_the_model_device(cloud: CloudModel, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    real = type(cloud.processor).__call__

    def spy(self: object, *args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("device"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(cloud.processor), "__call__", spy)
    enc = cloud.prepare(mixed_items(5))
    assert seen == ["cpu"]
    assert enc["pixel_values"].device.type == "cpu" and enc["pixel_values_videos"].device.type == "cpu"


def test_yes_no_logits_are_logsumexp_over_spellings(cloud: CloudModel) -> None:
    vocab = cloud.tokenizer.get_vocab()
    assert {vocab["▁yes"], vocab["yes"], vocab["▁Yes"], vocab["Yes"]} <= set(cloud.answers.yes)
    assert {vocab["▁no"], vocab["no"], vocab["▁No"], vocab["No"]} <= set(cloud.answers.no)
    item = mixed_items(2)[0]
    inputs = cloud.prepare([item])
    with torch.inference_mode():
        last = cloud.model(**inputs).logits[0, -1]
    expected = [torch.logsumexp(last[list(ids)], 0).item() for ids in (cloud.answers.yes, cloud.answers.no)]
    np.testing.assert_allclose(cloud.score([item]).yes_no_logits[0], expected, atol=1e-4)


def test_tokenizer_without_yes_is_rejected() -> None:
    class NoYes:
        unk_token_id = 0

        def get_vocab(self) -> dict[str, int]:
            return {"<unk>": 0, "▁no": 1}

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [1] if text.strip().lower() == "no" else [0, 0]

    with pytest.raises(ModelNotAvailable, match="'my/llava'.*no single token for 'yes'"):
        answer_tokens(NoYes(), "my/llava")


def test_tiny_token_counts(cloud: CloudModel) -> None:
    image = np.zeros((640, 640, 3), np.uint8)
    counts = cloud.token_counts(image)
    assert (counts.image, counts.video) == (336, 0)  # 112 px: 8x8 base + 16x16 grid with 16 newlines
    clip = cloud.token_counts(np.zeros((20, 120, 160, 3), np.uint8))
    assert (clip.image, clip.video) == (0, 8 * 4 * 4)  # 8 frames of 8x8 patches pooled by 2


def test_clips_are_sampled_uniformly() -> None:
    clip = np.arange(20, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    assert sample_frames(clip, 8)[:, 0, 0, 0].tolist() == [0, 3, 5, 8, 11, 14, 16, 19]
    assert sample_frames(clip[:3], 8)[:, 0, 0, 0].tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    assert sample_frames(clip[:8], 8).flags.c_contiguous
    assert item_kind(clip) == "video" and item_kind(clip[0]) == "image"
    with pytest.raises(ValueError, match="uint8"):
        item_kind(clip.astype(np.float32))


def test_prompts_use_the_chat_template(cloud: CloudModel, tiny_root: Path, tmp_path: Path) -> None:
    assert cloud._prompts["video"] == f"USER: <video>\n{QUESTION} ASSISTANT:"
    assert cloud._prompts["image"] == f"USER: <image>\n{QUESTION} ASSISTANT:"
    bare = shutil.copytree(tiny_root / "tiny-llava-next-video", tmp_path / "bare")
    (bare / "chat_template.jinja").unlink()
    model = CloudModel.load(CloudSettings(model=str(bare), device="cpu"))
    assert model.processor.chat_template == chat_template()
    assert model._prompts == cloud._prompts


def test_same_seed_same_model_other_seed_other_model(tmp_path: Path) -> None:
    a, b = ensure_tiny_llava(tmp_path / "a"), ensure_tiny_llava(tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    c = ensure_tiny_llava(tmp_path / "a", seed=3)
    items = mixed_items(3)[:2]
    s_a = CloudModel.load(CloudSettings(model=str(a), device="cpu")).score(items)
    s_b = CloudModel.load(cfg(), tmp_path / "b").score(items)
    s_c = CloudModel.load(CloudSettings(model=str(c), device="cpu")).score(items)
    np.testing.assert_array_equal(s_a.yes_no_logits, s_b.yes_no_logits)
    assert not np.allclose(s_a.yes_no_logits, s_c.yes_no_logits)


def test_tiny_loads_fast(tiny_root: Path) -> None:
    CloudModel.load(cfg(), tiny_root)
    start = time.perf_counter()
    CloudModel.load(cfg(), tiny_root)
    assert time.perf_counter() - start < 1.0


def test_describe_generates_text_deterministically(cloud: CloudModel) -> None:
    item = mixed_items(4)[1]
    text = cloud.describe(item, max_new_tokens=6)
    assert isinstance(text, str) and text == cloud.describe(item, max_new_tokens=6)


def test_half_precision_falls_back_to_fp32_on_cpu(cloud: CloudModel) -> None:
    assert CloudSettings().dtype == "bf16"
    assert cloud.dtype == torch.float32


def test_settings_errors_are_clear(tiny_root: Path) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cloud.device is 'cuda'.*no CUDA"):
            CloudModel.load(CloudSettings(model="tiny", device="cuda"), tiny_root)
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match="cloud.quantization=4bit needs the bitsandbytes package"):
            CloudModel.load(cfg(quantization="4bit"), tiny_root)


def test_missing_hub_model_says_how_to_fetch_it(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailable, match="hf download fallwatch-test/no-such-llava"):
        CloudModel.load(CloudSettings(model="fallwatch-test/no-such-llava", device="cpu"), tmp_path)


# --- full-size LLaVA-NeXT-Video-7B facts, from the public config; nothing is downloaded ----------


def llava_next_video_7b_config():
    """llava-hf/LLaVA-NeXT-Video-7B-hf: CLIP ViT-L/14-336 + Vicuna-7B (Llama), anyres grid, pool stride 2.

    vocab 32064 (32000 Llama + <video> 32000, <image> 32001, <pad>, padded to a multiple of 64):
    with it the lm_head is 131.3M parameters and the total comes out at 7.063B as published.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig

    vision = CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32064, max_position_embeddings=4096)
    return LlavaNextVideoConfig(
        vision_config=vision, text_config=text, image_token_index=32001, video_token_index=32000,
        projector_hidden_act="gelu", spatial_pool_stride=2, vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    )


def test_llava_next_video_7b_has_7_063b_parameters() -> None:
    from transformers import LlavaNextVideoForConditionalGeneration

    with torch.device("meta"):
        model = LlavaNextVideoForConditionalGeneration(llava_next_video_7b_config())
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert abs(total - 7.063e9) < 1e6, total
    assert abs(vision - 303.5e6) < 0.1e6, vision
    assert model.lm_head.weight.numel() == 32064 * 4096


def test_336_px_token_counts_match_the_7b_model() -> None:
    processor = build_processor(build_tokenizer(), size=336, template=chat_template())
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    video_id = processor.tokenizer.convert_tokens_to_ids("<video>")

    def count(kind: str, item: np.ndarray, token: int) -> int:
        prompt = f"USER: <{kind}>\n{QUESTION} ASSISTANT:"
        media = {"images": [item]} if kind == "image" else {"videos": [item]}
        return int((processor(text=[prompt], return_tensors="pt", **media)["input_ids"] == token).sum())

    assert count("image", np.zeros((640, 640, 3), np.uint8), image_id) == 2928
    assert count("image", np.zeros((480, 640, 3), np.uint8), image_id) == 2340
    assert count("video", np.zeros((8, 480, 640, 3), np.uint8), video_id) == 1152

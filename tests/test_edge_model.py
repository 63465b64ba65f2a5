"""The edge model (ViLT VQA) on the offline tiny preset, plus full-size ViLT-B/32 facts."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fallwatch.hub import ModelNotAvailable
from edge_worker.model import EdgeModel, as_chw_uint8
from edge_worker.tiny import ANSWERS, HIDDEN, ensure_tiny_vilt, vilt_b32_vqa_config
from fallwatch.settings import EdgeSettings

QUESTIONS = ["Is the person falling?", "Is someone lying on the floor?"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    ensure_tiny_vilt(root)
    return root


@pytest.fixture(scope="module")
def edge(tiny_root: Path) -> EdgeModel:
    return EdgeModel.load(EdgeSettings(model="tiny", questions=QUESTIONS), cache_dir=tiny_root)


def frames(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(480, 640, 3), (640, 640, 3), (300, 500, 3)]
    return [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]


def test_tiny_scores_have_documented_shapes_and_ranges(edge: EdgeModel) -> None:
    scores = edge.score(frames())
    assert edge.feature_dim == 2 * HIDDEN == 64
    assert edge.questions == tuple(QUESTIONS)
    assert scores.p_fall.shape == (3,) and scores.p_fall.dtype == np.float32
    assert np.all((scores.p_fall >= 0) & (scores.p_fall <= 1))
    assert scores.features.shape == (3, 64) and scores.features.dtype == np.float32
    assert scores.yes_no_logits.shape == (3, 2, 2) and scores.yes_no_logits.dtype == np.float32
    assert scores.wall_s > 0
    expected = torch.softmax(torch.from_numpy(scores.yes_no_logits), dim=-1)[..., 0].mean(dim=1).numpy()
    np.testing.assert_allclose(scores.p_fall, expected, rtol=1e-6)


def test_features_are_the_input_of_the_answer_layer(tiny_root: Path) -> None:
    model = EdgeModel.load(EdgeSettings(model="tiny", questions=QUESTIONS[:1]), cache_dir=tiny_root)
    scores = model.score(frames())
    with torch.inference_mode():
        logits = model.model.classifier[3](torch.from_numpy(scores.features))
    np.testing.assert_allclose(logits[:, list(model.yes_no_ids)].numpy(), scores.yes_no_logits[:, 0], atol=1e-5)
    assert model.yes_no_ids == (ANSWERS.index("yes"), ANSWERS.index("no"))


def test_batch_matches_single_items(edge: EdgeModel) -> None:
    images = frames(1)
    batch = edge.score(images)
    for i, image in enumerate(images):
        single = edge.score([image])
        np.testing.assert_allclose(single.yes_no_logits[0], batch.yes_no_logits[i], atol=1e-4)
        np.testing.assert_allclose(single.features[0], batch.features[i], atol=1e-4)


def test_different_images_score_differently(edge: EdgeModel) -> None:
    a, b = edge.score(frames(2)[:1]), edge.score(frames(3)[:1])
    assert not np.allclose(a.features, b.features)


def test_accepts_chw_tensors_and_flipped_views(edge: EdgeModel) -> None:
    bgr = frames(4)[0]
    rgb_view = bgr[..., ::-1]  # negative stride, like cv2's BGR -> RGB
    rgb = np.ascontiguousarray(rgb_view)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    read_only = rgb.copy()
    read_only.flags.writeable = False
    results = [edge.score([x]).yes_no_logits for x in (rgb, rgb_view, tensor, read_only)]
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        as_chw_uint8(rgb.astype(np.float32))


def test_image_tokens_follow_vilt_resizing(edge: EdgeModel) -> None:
    assert edge.image_tokens(np.zeros((640, 640, 3), np.uint8)) == 145  # 384x384 -> 12x12 patches + CLS
    assert edge.image_tokens(np.zeros((480, 640, 3), np.uint8)) == 193  # 384x512 -> 12x16 + CLS


def test_same_seed_same_model_other_seed_other_model(tmp_path: Path) -> None:
    a, b = ensure_tiny_vilt(tmp_path / "a"), ensure_tiny_vilt(tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    c = ensure_tiny_vilt(tmp_path / "a", seed=1)
    assert c.name == "tiny-vilt-seed1"
    image = frames()[:1]
    s_a = EdgeModel.load(EdgeSettings(model=str(a)), None).score(image)
    s_b = EdgeModel.load(EdgeSettings(model="tiny"), tmp_path / "b").score(image)
    s_c = EdgeModel.load(EdgeSettings(model=str(c)), None).score(image)
    np.testing.assert_array_equal(s_a.features, s_b.features)
    assert not np.allclose(s_a.features, s_c.features)


def test_tiny_is_built_once_and_rebuilt_when_stale(tmp_path: Path) -> None:
    path = ensure_tiny_vilt(tmp_path)
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert ensure_tiny_vilt(tmp_path) == path and weights.stat().st_mtime_ns == stamp
    (path / "fallwatch_tiny.json").write_text(json.dumps({"model": "tiny-vilt", "version": -1, "seed": 0}))
    ensure_tiny_vilt(tmp_path)
    assert json.loads((path / "fallwatch_tiny.json").read_text())["version"] != -1
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-vilt"]  # no temp dirs left behind


def test_tiny_loads_fast(tiny_root: Path) -> None:
    EdgeModel.load(EdgeSettings(model="tiny"), tiny_root)  # imports done
    start = time.perf_counter()
    EdgeModel.load(EdgeSettings(model="tiny"), tiny_root)
    assert time.perf_counter() - start < 1.0


def test_missing_hub_model_says_how_to_fetch_it(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailable) as err:
        EdgeModel.load(EdgeSettings(model="fallwatch-test/no-such-vilt"), cache_dir=tmp_path)
    assert "'fallwatch-test/no-such-vilt'" in str(err.value)
    assert "hf download fallwatch-test/no-such-vilt" in str(err.value)
    assert time.perf_counter() - start < 5.0


def test_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        EdgeModel.load(EdgeSettings(model=str(tmp_path / "nowhere")))


def test_model_without_yes_no_answers_is_rejected(tiny_root: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_root / "tiny-vilt", tmp_path / "no-yes")
    config = json.loads((copy / "config.json").read_text())
    config["id2label"] = {str(i): f"answer{i}" for i in range(len(ANSWERS))}
    config["label2id"] = {f"answer{i}": i for i in range(len(ANSWERS))}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotAvailable, match=r"no-yes.*no answer 'yes' or 'no'"):
        EdgeModel.load(EdgeSettings(model=str(copy)))


@pytest.fixture(scope="module")
def narrow_tiny(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset's architecture with weights at the usual 0.02 scale, as trained models have
    (the preset's deliberately wide weights amplify rounding through every layer)."""
    from transformers import ViltForQuestionAnswering

    from edge_worker.tiny import tiny_vilt_config, tiny_vocab

    out = shutil.copytree(tiny_root / "tiny-vilt", tmp_path_factory.mktemp("narrow") / "vilt")
    config = tiny_vilt_config(len(tiny_vocab()))
    config.initializer_range = 0.02
    torch.manual_seed(0)
    ViltForQuestionAnswering(config).save_pretrained(out)
    return out


def test_int8_and_bf16_stay_close_to_fp32(narrow_tiny: Path) -> None:
    images = frames(5)
    reference = EdgeModel.load(EdgeSettings(model=str(narrow_tiny), questions=QUESTIONS)).score(images).yes_no_logits
    for cfg in ({"int8": True}, {"dtype": "bf16"}):
        model = EdgeModel.load(EdgeSettings(model=str(narrow_tiny), questions=QUESTIONS, **cfg))
        scores = model.score(images)
        assert scores.features.dtype == np.float32
        np.testing.assert_allclose(scores.yes_no_logits, reference, atol=0.1)
    int8 = EdgeModel.load(EdgeSettings(model=str(narrow_tiny), int8=True))
    layer = type(int8.model.classifier[0])
    assert layer is not torch.nn.Linear and "quantized.dynamic" in layer.__module__


def test_int8_needs_fp32_on_cpu(tiny_root: Path) -> None:
    with pytest.raises(ValueError, match="edge.int8"):
        EdgeModel.load(EdgeSettings(model="tiny", int8=True, dtype="bf16"), tiny_root)


@pytest.mark.slow
def test_full_size_vilt_b32_has_1536_features_and_145_image_tokens(tiny_root: Path) -> None:
    """Public ViLT-B/32 VQA config (dandelin/vilt-b32-finetuned-vqa), random weights, nothing downloaded."""
    from transformers import ViltForQuestionAnswering, ViltProcessor

    config = vilt_b32_vqa_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vilt = ViltForQuestionAnswering(config).eval()
    processor = ViltProcessor.from_pretrained(tiny_root / "tiny-vilt")  # same preprocessing as the real one
    model = EdgeModel("vilt-b32-random", vilt, processor, ["Is the person falling?"], torch.device("cpu"))
    image = np.random.default_rng(0).integers(0, 256, (640, 640, 3), dtype=np.uint8)
    scores = model.score([image])
    assert config.num_labels == 3129 and model.yes_no_ids == (3, 9)
    assert model.feature_dim == 1536 and scores.features.shape == (1, 1536)
    assert model.image_tokens(image) == 145
    q = model._encoded[0]
    with torch.inference_mode():
        out = vilt.vilt(input_ids=q.input_ids, attention_mask=q.attention_mask, token_type_ids=q.token_type_ids,
                        **model.preprocess([image]))
    assert out.last_hidden_state.shape[1] == 40 + 145


def test_concurrent_builds_leave_one_complete_directory(tmp_path: Path) -> None:
    import threading

    from fallwatch.hub import build_atomically

    builds: list[int] = []

    def build(d: Path) -> None:
        (d / "weights.bin").write_bytes(b"x" * 1000)
        builds.append(1)
        time.sleep(0.05)  # every builder is mid-way while the others start

    recipe = {"model": "demo", "version": 1, "seed": 0}
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(build_atomically(tmp_path / "demo", recipe, build)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "demo"] * 4 and len(builds) >= 1
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["fallwatch_tiny.json", "weights.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


# --- the forward pass: the question's own tokens, the last layer for the pooled token only ------------


def _plain_logits(model: EdgeModel, images: list[np.ndarray]) -> np.ndarray:
    """(B, Q, A) logits of ViltForQuestionAnswering's own forward pass on the padded questions."""
    batch, per_question = len(images), []
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        pixels = model.preprocess(images)
        for q in model._encoded:
            torch.manual_seed(0)
            out = model.model(input_ids=q.input_ids.expand(batch, -1), attention_mask=q.attention_mask.expand(batch, -1),
                              token_type_ids=q.token_type_ids.expand(batch, -1), **pixels)
            per_question.append(out.logits.float())
    return torch.stack(per_question, dim=1).numpy()


def test_forward_matches_vilt_on_padded_questions_with_mixed_sizes(edge: EdgeModel) -> None:
    assert edge._fast
    images = frames(8)
    np.testing.assert_allclose(edge.outputs(images).logits.numpy(), _plain_logits(edge, images), atol=2e-5)


def test_encoder_runs_on_the_question_tokens_only(edge: EdgeModel) -> None:
    seen: list[int] = []
    first = edge.model.vilt.encoder.layer[0].layernorm_before  # the first thing every path runs in a layer
    hook = first.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    image = frames(9)[1]
    try:
        edge.score([image])
    finally:
        hook.remove()
    assert all(q.length == int(q.attention_mask.sum()) < q.input_ids.shape[1] == 40 for q in edge._encoded)
    assert seen == [q.length + edge.image_tokens(image) for q in edge._encoded]


def test_a_forward_that_disagrees_with_vilt_is_not_used(tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_worker.model as edge_model

    monkeypatch.setattr(edge_model, "pooled_output", lambda vilt, *a: torch.zeros(2, vilt.config.hidden_size))
    model = EdgeModel.load(EdgeSettings(model="tiny", questions=QUESTIONS), cache_dir=tiny_root)
    assert not model._fast
    images = frames(10)
    np.testing.assert_allclose(model.outputs(images).logits.numpy(), _plain_logits(model, images), atol=2e-5)

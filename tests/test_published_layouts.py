"""Both models load and score from directories laid out like their published hub repositories
(real configuration values, tiny weights, old weight names), through the public loading API;
every load failure is one clear line."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cloud_worker.model import CloudModel, load_processor, match_processor
from fallwatch.hub import ModelNotAvailable, ModelSetupError, resolve
from edge_worker.model import EdgeModel
from fallwatch import cli
from fallwatch.settings import CloudSettings, EdgeSettings
from tests.published import llava_config, vilt_config, write_llava_files, write_llava_next_video, write_vilt_vqa

pytestmark = pytest.mark.slow
QUESTION = "Is the person falling? Answer yes or no."


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("published") / "LLaVA-NeXT-Video-7B-hf"
    return out, write_llava_next_video(out)


@pytest.fixture(scope="module")
def vilt_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("published") / "vilt-b32-finetuned-vqa"
    return out, write_vilt_vqa(out)


@pytest.fixture(scope="module")
def llava(llava_dir: tuple[Path, dict[str, torch.Tensor]]) -> CloudModel:
    return CloudModel.load(CloudSettings(model=str(llava_dir[0]), device="cpu"))


def frames(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (640, 640, 3), np.uint8), rng.integers(0, 256, (8, 480, 640, 3), np.uint8)


def assert_same_weights(model: torch.nn.Module, written: dict[str, torch.Tensor]) -> None:
    """Every written tensor arrived, unchanged (none left at transformers' random initialisation)."""
    loaded = model.state_dict()
    assert set(written) <= set(loaded)
    for name, tensor in written.items():
        assert torch.equal(loaded[name].to(tensor.dtype), tensor), name


def test_published_layout_is_the_old_one(llava_dir: tuple[Path, dict[str, torch.Tensor]]) -> None:
    out, _ = llava_dir
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in index
    assert "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight" in index
    assert "multi_modal_projector.linear_1.weight" in index and "language_model.lm_head.weight" in index
    assert not (out / "video_preprocessor_config.json").exists()
    assert json.loads((out / "preprocessor_config.json").read_text())["image_processor_type"] == "LlavaNextImageProcessor"
    assert "num_additional_image_tokens" not in json.loads((out / "processor_config.json").read_text())


def test_llava_published_layout_loads_and_scores(llava: CloudModel,
                                                 llava_dir: tuple[Path, dict[str, torch.Tensor]]) -> None:
    assert_same_weights(llava.model, llava_dir[1])
    processor = llava.processor
    assert (processor.patch_size, processor.vision_feature_select_strategy) == (14, "default")
    assert processor.num_additional_image_tokens == 1
    assert (processor.image_token_id, processor.video_token_id) == (32001, 32000)
    assert llava._prompts["image"] == f"USER: <image>\n{QUESTION} ASSISTANT:"  # the repo's own chat template
    image, clip = frames()
    assert llava.token_counts(image).image == 2928 and llava.token_counts(clip).video == 1152
    scores = llava.score([image, clip, image[:480]])
    assert np.all((scores.p_fall > 0) & (scores.p_fall < 1))
    single = llava.score([clip])
    np.testing.assert_allclose(single.yes_no_logits[0], scores.yes_no_logits[1], atol=1e-4)


def test_vilt_published_layout_loads_and_scores(vilt_dir: tuple[Path, dict[str, torch.Tensor]]) -> None:
    out, written = vilt_dir
    assert (out / "pytorch_model.bin").is_file() and not list(out.glob("*.safetensors"))
    model = EdgeModel.load(EdgeSettings(model=str(out), device="cpu"))
    assert_same_weights(model.model, written)
    assert model.yes_no_ids == (3, 9) and len(model.model.config.id2label) == 3129
    image, _ = frames(1)
    assert model.image_tokens(image) == 145  # 384x384: 12x12 patches + CLS, as the real model
    scores = model.score([image, image[:480]])
    assert scores.features.shape == (2, 64) and np.all((scores.p_fall > 0) & (scores.p_fall < 1))


def test_full_size_config_features_match_placeholders(tmp_path: Path) -> None:
    """LLaVA-NeXT-Video-7B's own config on the meta device: 2928 image features for 640x640 and 1152
    video features for 8 frames, and the processor loaded from the published layout writes exactly
    as many placeholders."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    config = llava_config(full_size=True)
    write_llava_files(tmp_path, config)
    with torch.device("meta"):
        model = LlavaNextVideoForConditionalGeneration(LlavaNextVideoConfig(**config))
    source = resolve(str(tmp_path), "cloud", lambda root: root, None)
    processor = load_processor(source)
    match_processor(processor, model, source)
    image, clip = frames(2)
    enc = processor(text=["USER: <image>\nhi ASSISTANT:"], images=[image], return_tensors="pt")
    features = model.model.get_image_features(pixel_values=enc["pixel_values"].to("meta"),
                                              image_sizes=enc["image_sizes"]).pooler_output
    assert sum(f.shape[0] for f in features) == 2928 == int((enc["input_ids"] == 32001).sum())
    enc = processor(text=["USER: <video>\nhi ASSISTANT:"], videos=[clip], return_tensors="pt")
    features = model.model.get_video_features(pixel_values_videos=enc["pixel_values_videos"].to("meta")).pooler_output
    assert sum(f.shape[0] for f in features) == 1152 == int((enc["input_ids"] == 32000).sum())


# --- every load failure is one line saying what to do --------------------------------------------


def broken_copy(llava_dir: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> Path:
    return shutil.copytree(llava_dir[0], tmp_path / "copy")


def load_error(path: Path, **kw: object) -> str:
    with pytest.raises(ModelNotAvailable) as err:
        CloudModel.load(CloudSettings(**{"model": str(path), "device": "cpu", **kw}))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_file_is_one_line(llava_dir: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    out = broken_copy(llava_dir, tmp_path)
    (out / "model-00002-of-00002.safetensors").unlink()
    assert "cannot be loaded" in load_error(out)
    (out / "tokenizer.json").unlink()
    assert "cannot be loaded" in load_error(out)


def test_unknown_weight_names_are_refused(llava_dir: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    out = broken_copy(llava_dir, tmp_path)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for file in set(index["weight_map"].values()):
        state = load_file(out / file)
        save_file({f"llm.{k}": v for k, v in state.items()}, str(out / file), metadata={"format": "pt"})
    index["weight_map"] = {f"llm.{k}": v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    assert "weights are missing or mis-shaped" in load_error(out)


def test_another_model_type_is_refused(vilt_dir: tuple[Path, dict[str, torch.Tensor]]) -> None:
    assert "is a 'vilt' model, not 'llava_next_video'" in load_error(vilt_dir[0])


def test_missing_optional_packages_name_the_install_line(llava_dir: tuple[Path, dict[str, torch.Tensor]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("flash_attn", "bitsandbytes") else real(name, *a))
    with pytest.raises(ModelSetupError, match=r"flash-attn package.*pip install 'fallwatch\[cloud,gpu\]'"):
        CloudModel.load(CloudSettings(model=str(llava_dir[0]), device="cpu", attn_implementation="flash_attention_2"))
    message = load_error(llava_dir[0], quantization="8bit")
    assert "bitsandbytes" in message and "pip install" in message


def test_no_gpu_is_one_line(llava_dir: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "torch sees no CUDA device" in load_error(llava_dir[0], device="cuda")
    with pytest.raises(ModelSetupError, match="edge.device is 'cuda'"):
        EdgeModel.load(EdgeSettings(model="tiny", device="cuda"))


def test_cli_prints_a_load_failure_as_one_line(llava_dir: tuple[Path, dict[str, torch.Tensor]],
                                               vilt_dir: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    if "models" not in {g.name for g in cli.app.registered_groups}:
        cli._load_plugins()
    out = broken_copy(llava_dir, tmp_path)
    (out / "preprocessor_config.json").unlink()
    result = CliRunner().invoke(cli.app, ["models", "check", "--edge", str(vilt_dir[0]), "--cloud", str(out)])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(out) in errors[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_checks_both_published_layouts(llava_dir: tuple[Path, dict[str, torch.Tensor]],
                                           vilt_dir: tuple[Path, dict[str, torch.Tensor]]) -> None:
    if "models" not in {g.name for g in cli.app.registered_groups}:
        cli._load_plugins()
    result = CliRunner().invoke(cli.app, ["models", "check", "--edge", str(vilt_dir[0]), "--cloud", str(llava_dir[0]),
                                          "--cloud-device", "cpu", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["cloud"]["image_tokens"] == 2340 and report["cloud"]["video_tokens"] == 1152  # 640x480 test image
    assert report["edge"]["feature_dim"] == 64 and report["edge"]["image_tokens"] == 193  # 384x512: 12x16 + CLS


def test_vilt_fixture_keeps_the_public_answer_table() -> None:
    config = vilt_config(full_size=True)
    assert (config["hidden_size"], config["num_hidden_layers"], config["patch_size"]) == (768, 12, 32)
    assert len(config["id2label"]) == 3129
    assert (config["label2id"]["yes"], config["label2id"]["no"]) == (3, 9)

"""`fallwatch models check` and `fallwatch models make-tiny`, offline with the tiny presets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edge_worker.samples import drawn_clip, drawn_image, read_clip
from fallwatch import cli

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def plugins() -> None:
    if "models" not in {g.name for g in cli.app.registered_groups}:
        cli._load_plugins()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def run(*args: str):
    return runner.invoke(cli.app, ["models", *args])


def write_video(path: Path, frames: int, size: tuple[int, int] = (160, 120)) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            img = np.full((size[1], size[0], 3), 20 * i, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())


def test_check_tiny_json(cache: Path) -> None:
    result = run("check", "--edge", "tiny", "--cloud", "tiny", "--json", "--cache-dir", str(cache))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    edge, cloud = report["edge"], report["cloud"]
    assert report["ok"] is True
    assert edge["feature_dim"] == 64 and edge["image_tokens"] == 193 and edge["text_tokens"] == 40  # 640x480 frame
    assert cloud["video_tokens"] == 128 and cloud["image_tokens"] > 0
    assert 0 <= edge["p_fall"] <= 1 and 0 <= cloud["p_fall_image"] <= 1 and 0 <= cloud["p_fall_video"] <= 1
    assert edge["ms_per_item"] > 0 and cloud["ms_per_item"] > 0 and edge["load_s"] > 0
    assert cloud["device"] == "cpu" and cloud["dtype"] == "float32" and cloud["energy_j"] is None
    assert (cache / "tiny-vilt" / "config.json").is_file()
    assert (cache / "tiny-llava-next-video" / "config.json").is_file()


def test_check_scores_given_files(cache: Path, tmp_path: Path) -> None:
    image, video = tmp_path / "square.png", tmp_path / "clip.mp4"
    Image.fromarray(np.zeros((320, 320, 3), np.uint8)).save(image)
    write_video(video, frames=5)
    result = run("check", "--edge", "tiny", "--cloud", "tiny", "--json", "--cache-dir", str(cache),
                 "--image", str(image), "--video", str(video))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["inputs"] == {"image": str(image), "video": str(video)}
    assert report["edge"]["image_tokens"] == 145  # square: 384x384
    assert report["cloud"]["image_tokens"] == 336 and report["cloud"]["video_tokens"] == 128


def test_check_human_output(cache: Path) -> None:
    result = run("check", "--edge", "tiny", "--cloud", "tiny", "--cloud-device", "cpu", "--cache-dir", str(cache))
    assert result.exit_code == 0, result.stderr
    assert "feature size 64" in result.stdout and "128 video tokens" in result.stdout
    assert result.stdout.rstrip().endswith("ok")


def test_missing_model_is_one_red_line(cache: Path) -> None:
    result = run("check", "--edge", "fallwatch-test/absent-vilt", "--cloud", "tiny", "--cache-dir", str(cache))
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "hf download fallwatch-test/absent-vilt" in errors[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_make_tiny_writes_both_models(tmp_path: Path) -> None:
    result = run("make-tiny", "--out", str(tmp_path))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "tiny-vilt"), str(tmp_path / "tiny-llava-next-video")]
    for name in ("tiny-vilt", "tiny-llava-next-video"):
        assert (tmp_path / name / "model.safetensors").is_file()
    # the built directories load as ordinary local models
    result = run("check", "--edge", str(tmp_path / "tiny-vilt"), "--cloud", str(tmp_path / "tiny-llava-next-video"),
                 "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["edge"]["feature_dim"] == 64


def test_samples() -> None:
    image, clip = drawn_image(), drawn_clip(6)
    assert image.shape == (480, 640, 3) and image.dtype == np.uint8 and image.flags.writeable
    assert clip.shape == (6, 480, 640, 3)
    assert not np.array_equal(clip[0], clip[-1])  # the figure moves
    np.testing.assert_array_equal(clip[-1], image)  # and ends lying like the test image


def test_read_clip_picks_uniform_frames(tmp_path: Path) -> None:
    video = tmp_path / "ramp.mp4"
    write_video(video, frames=12)
    clip = read_clip(video, 4)
    assert clip.shape == (4, 120, 160, 3)
    means = clip.reshape(4, -1).mean(axis=1)
    np.testing.assert_allclose(means, [0, 80, 140, 220], atol=8)  # frames 0, 4, 7, 11 of a 20-per-frame ramp
    assert read_clip(video, 30).shape[0] == 12  # a short video gives all its frames

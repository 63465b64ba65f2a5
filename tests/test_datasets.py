"""Dataset loaders: YOLO folders, fall rule, class counts, group-aware re-split, clips, bad files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fallwatch.datasets import (
    DatasetError,
    dataset_stats,
    group_of,
    load_clips,
    load_yolo,
    read_clip_frames,
    read_rgb,
    resplit,
    write_yolo,
)


def _image(path: Path, colour: int = 100, size: tuple[int, int] = (32, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (colour, 50, 200)).save(path)


def _labelled(root: Path, split: str, name: str, lines: list[str] | None) -> None:
    _image(root / split / "images" / f"{name}.jpg")
    (root / split / "labels").mkdir(parents=True, exist_ok=True)
    if lines is not None:
        (root / split / "labels" / f"{name}.txt").write_text("".join(f"{line}\n" for line in lines))


BOX = "0.5 0.5 0.2 0.3"


@pytest.fixture
def yolo(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    _labelled(root, "train", "a_jpg.rf.111", [f"0 {BOX}"])
    _labelled(root, "train", "a_jpg.rf.222", [f"0 {BOX}"])
    _labelled(root, "train", "b_jpg.rf.333", [f"1 {BOX}", f"0 {BOX}"])  # any fall box -> fall
    _labelled(root, "train", "c_jpg.rf.444", [f"1 {BOX}", f"1 {BOX}"])
    _labelled(root, "train", "d_jpg.rf.555", [])  # empty: no person, no fall
    _labelled(root, "train", "e_jpg", None)  # no label file: unlabelled
    return root


def test_load_yolo_fall_rule_groups_and_counts(yolo: Path) -> None:
    items = load_yolo(yolo, "train")
    by_id = {i.id: i for i in items}
    assert [i.id for i in items] == sorted(by_id)
    assert by_id["a_jpg.rf.111"].fall is True
    assert by_id["b_jpg.rf.333"].fall is True
    assert by_id["c_jpg.rf.444"].fall is False
    assert by_id["d_jpg.rf.555"].fall is False
    assert by_id["e_jpg"].fall is None
    assert by_id["a_jpg.rf.222"].group == "a_jpg" and by_id["e_jpg"].group == "e_jpg"
    stats = dataset_stats(items)
    assert (stats.images, stats.fall, stats.no_fall, stats.unlabeled, stats.groups) == (6, 3, 2, 1, 5)
    assert dict(stats.boxes_per_class) == {0: 3, 1: 3}


def test_fall_classes_are_configurable(yolo: Path) -> None:
    by_id = {i.id: i for i in load_yolo(yolo, "train", fall_classes=frozenset({1}))}
    assert by_id["a_jpg.rf.111"].fall is False
    assert by_id["b_jpg.rf.333"].fall is True
    assert by_id["c_jpg.rf.444"].fall is True


def test_group_of_export_names() -> None:
    assert group_of("fall001_jpg.rf.20fb8092751d2f9e2cfecbfeb4f0fe67.jpg") == "fall001_jpg"
    assert group_of("/x/y/plain.png") == "plain"


@pytest.mark.parametrize(
    "line, message",
    [("0 0.5 0.5 0.2", "expected"), ("x 0.5 0.5 0.2 0.3", "not numbers"), ("0 0.5 0.5 3.0 0.3", "normalised")],
)
def test_unparsable_label_is_rejected_with_file_and_line(yolo: Path, line: str, message: str) -> None:
    bad = yolo / "train" / "labels" / "c_jpg.rf.444.txt"
    bad.write_text(f"1 {BOX}\n{line}\n")
    with pytest.raises(DatasetError, match=message) as err:
        load_yolo(yolo, "train")
    assert "c_jpg.rf.444.txt:2" in str(err.value)


def test_unreadable_image_is_rejected_with_its_name(yolo: Path) -> None:
    (yolo / "train" / "images" / "broken_jpg.rf.9.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match="broken_jpg.rf.9.jpg"):
        load_yolo(yolo, "train")
    with pytest.raises(DatasetError, match="broken_jpg.rf.9.jpg"):
        read_rgb(yolo / "train" / "images" / "broken_jpg.rf.9.jpg")


def test_missing_split_is_named(yolo: Path) -> None:
    with pytest.raises(DatasetError, match="valid"):
        load_yolo(yolo, "valid")


def test_read_rgb_shape_and_dtype(tmp_path: Path) -> None:
    _image(tmp_path / "x.png", colour=7, size=(20, 10))
    arr = read_rgb(tmp_path / "x.png")
    assert arr.shape == (10, 20, 3) and arr.dtype == np.uint8 and tuple(arr[0, 0]) == (7, 50, 200)


def _many(tmp_path: Path, groups: int) -> list:
    root = tmp_path / "many"
    rng = np.random.default_rng(3)
    for g in range(groups):
        cls = int(rng.integers(2))
        for c in range(int(rng.integers(1, 4))):
            _labelled(root, "train", f"src{g:03d}_jpg.rf.{c}", [f"{cls} {BOX}"])
    return load_yolo(root, "train")


def test_resplit_keeps_groups_together_and_follows_ratios(tmp_path: Path) -> None:
    items = _many(tmp_path, 120)
    ratios = {"train": 0.7, "valid": 0.2, "test": 0.1}
    splits = resplit(items, ratios, seed=5)
    assert sorted(i.id for s in splits.values() for i in s) == sorted(i.id for i in items)
    owner: dict[str, str] = {}
    for name, members in splits.items():
        for item in members:
            assert owner.setdefault(item.group, name) == name, f"group {item.group} in two splits"
    for name, ratio in ratios.items():
        assert abs(len(splits[name]) / len(items) - ratio) < 0.03, (name, len(splits[name]))
    falls = {n: np.mean([i.fall for i in s]) for n, s in splits.items()}
    overall = np.mean([i.fall for i in items])
    assert all(abs(f - overall) < 0.1 for f in falls.values()), falls


def test_resplit_is_seeded(tmp_path: Path) -> None:
    items = _many(tmp_path, 40)
    ratios = {"train": 0.5, "test": 0.5}
    first = {k: [i.id for i in v] for k, v in resplit(items, ratios, seed=1).items()}
    assert first == {k: [i.id for i in v] for k, v in resplit(items, ratios, seed=1).items()}
    assert first != {k: [i.id for i in v] for k, v in resplit(items, ratios, seed=2).items()}


def test_write_yolo_round_trips(tmp_path: Path, yolo: Path) -> None:
    items = [i for i in load_yolo(yolo, "train") if i.fall is not None]
    splits = resplit(items, {"train": 0.6, "test": 0.4}, seed=0)
    write_yolo(splits, tmp_path / "out", link=True)
    for name, members in splits.items():
        again = load_yolo(tmp_path / "out", name)
        assert [(i.id, i.fall, i.group) for i in again] == [(i.id, i.fall, i.group) for i in members]


def _video(path: Path, frames: int, value_step: int = 10) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for n in range(frames):
            arr = np.full((48, 64, 3), min(255, n * value_step), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_read_clip_frames_uniform_sampling(tmp_path: Path) -> None:
    _video(tmp_path / "c.mp4", frames=21)
    everything = read_clip_frames(tmp_path / "c.mp4")
    assert everything.shape == (21, 48, 64, 3) and everything.dtype == np.uint8
    sampled = read_clip_frames(tmp_path / "c.mp4", num_frames=3)
    assert sampled.shape == (3, 48, 64, 3)
    brightness = sampled.reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(brightness, [0, 100, 200], atol=6)  # frames 0, 10, 20


def test_read_clip_frames_rejects_bad_file(tmp_path: Path) -> None:
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetError, match="bad.mp4"):
        read_clip_frames(tmp_path / "bad.mp4")


def test_load_clips_csv_json_and_folders(tmp_path: Path) -> None:
    for name in ("f1", "n1"):
        _video(tmp_path / "v" / f"{name}.mp4", frames=2)
    (tmp_path / "v" / "list.csv").write_text("path,fall\nf1.mp4,1\nn1.mp4,no_fall\n")
    clips = load_clips(tmp_path / "v" / "list.csv")
    assert [(c.id, c.fall) for c in clips] == [("f1", True), ("n1", False)]
    assert clips[0].path == tmp_path / "v" / "f1.mp4"
    (tmp_path / "v" / "list.json").write_text(json.dumps([{"path": "f1.mp4", "fall": True, "id": "x"}]))
    assert [(c.id, c.fall) for c in load_clips(tmp_path / "v" / "list.json")] == [("x", True)]
    _video(tmp_path / "tree" / "fall" / "a.mp4", frames=2)
    _video(tmp_path / "tree" / "no_fall" / "b.mp4", frames=2)
    assert [(c.id, c.fall) for c in load_clips(tmp_path / "tree")] == [("a", True), ("b", False)]
    assert Counter(c.fall for c in load_clips(tmp_path / "tree" / "fall")) == {None: 1}


def test_load_clips_errors_name_the_file(tmp_path: Path) -> None:
    _video(tmp_path / "f1.mp4", frames=2)
    (tmp_path / "bad.csv").write_text("path,fall\nf1.mp4,maybe\n")
    with pytest.raises(DatasetError, match="bad.csv row 1"):
        load_clips(tmp_path / "bad.csv")
    (tmp_path / "missing.csv").write_text("path,fall\nnope.mp4,1\n")
    with pytest.raises(DatasetError, match="nope.mp4"):
        load_clips(tmp_path / "missing.csv")

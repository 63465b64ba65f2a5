"""Synthetic dataset: layout, export-style names and augmentation, labels, clips, determinism."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from fallwatch.datasets import dataset_stats, load_clips, load_yolo, read_clip_frames, read_rgb
from fallwatch.synth import (
    FALL_CLASS,
    Pose,
    SynthConfig,
    augment_in_boxes,
    make_dataset,
    make_person,
    make_room,
    make_scene,
    pose_joints,
)

SMALL = SynthConfig(seed=3, sources={"train": 4, "valid": 2, "test": 2}, train_copies=3, image_size=160,
                    clips=2, clip_size=(160, 120), clip_fps=8, clip_seconds=1.5)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    make_dataset(SMALL, out)
    return out


def test_layout_names_and_counts(synth: Path) -> None:
    name = re.compile(r"^synth\d{4}_jpg\.rf\.[0-9a-f]{32}$")
    expected = {"train": 12, "valid": 2, "test": 2}
    for split, n in expected.items():
        items = load_yolo(synth, split)
        assert len(items) == n
        assert all(name.match(i.id) for i in items), [i.id for i in items]
        assert all(i.fall is not None for i in items)
    train = load_yolo(synth, "train")
    assert dataset_stats(train).groups == 4
    assert {len([i for i in train if i.group == g]) for g in {i.group for i in train}} == {3}
    assert (synth / "data.yaml").exists() and (synth / "synth.json").exists()


def test_copies_differ_only_inside_boxes(synth: Path) -> None:
    train = load_yolo(synth, "train")
    group = train[0].group
    copies = [i for i in train if i.group == group]
    labels = {(i.path.parent.parent / "labels" / f"{i.id}.txt").read_text() for i in copies}
    assert len(labels) == 1  # augmentation stays inside the box: the boxes do not move
    size = SMALL.image_size
    inside = np.zeros((size, size), dtype=bool)
    for line in labels.pop().splitlines():
        _, xc, yc, w, h = (float(v) for v in line.split())
        x0, x1 = int((xc - w / 2) * size) - 8, int(np.ceil((xc + w / 2) * size)) + 8
        y0, y1 = int((yc - h / 2) * size) - 8, int(np.ceil((yc + h / 2) * size)) + 8
        inside[max(0, y0):y1, max(0, x0):x1] = True  # plus a JPEG-block margin
    images = [read_rgb(i.path).astype(int) for i in copies]
    for other in images[1:]:
        diff = np.abs(images[0] - other).mean(axis=2)
        assert diff[~inside].mean() < 1.0


def test_augment_in_boxes_exact() -> None:
    image = np.random.default_rng(0).integers(0, 255, size=(40, 50, 3), dtype=np.uint8)
    box = (10.0, 5.0, 30.0, 25.0)  # square 20x20: rotation keeps pixels exact
    rng = np.random.default_rng(1)
    out = augment_in_boxes(image, [(0, box)], rng)
    outside = np.ones((40, 50), bool)
    outside[5:25, 10:30] = False
    assert np.array_equal(out[outside], image[outside])
    crop = image[5:25, 10:30]
    candidates = [np.rot90(c, k) for c in (crop, crop[:, ::-1]) for k in (0, 1, 3)]
    assert any(np.array_equal(out[5:25, 10:30], c) for c in candidates)


def test_lying_is_class_fall_and_box_covers_the_person() -> None:
    for seed in range(12):
        scene = make_scene(np.random.default_rng(seed), 200)
        for cls, (x0, y0, x1, y1) in scene.boxes:
            assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 200
            if cls == FALL_CLASS:
                assert (x1 - x0) > (y1 - y0), "a lying person is wider than tall"
    rng = np.random.default_rng(0)
    room = make_room(rng, 200, 200)
    standing = make_person(rng, room, pose_joints(Pose.STANDING, rng), False)
    x0, y0, x1, y1 = standing.box(200, 200)
    assert (y1 - y0) > (x1 - x0)


def test_clips_are_labelled_and_readable(synth: Path) -> None:
    clips = load_clips(synth / "clips")
    assert [c.fall for c in clips] == [True, False]
    frames = read_clip_frames(clips[0].path)
    assert frames.shape == (12, 120, 160, 3)
    # a fall clip ends with the person on the floor: the last frame differs from the first
    assert np.abs(frames[-1].astype(int) - frames[0].astype(int)).mean() > 1.0


def test_deterministic_for_a_seed(synth: Path, tmp_path: Path) -> None:
    make_dataset(SMALL, tmp_path / "again")
    assert _digest(tmp_path / "again") == _digest(synth)
    make_dataset(SynthConfig(**{**SMALL.__dict__, "seed": 4}), tmp_path / "other")
    other = _digest(tmp_path / "other")
    assert set(other) != set(_digest(synth))  # the hash in every copy's name depends on the seed
    assert other["clips/fall_000.mp4"] != _digest(synth)["clips/fall_000.mp4"]

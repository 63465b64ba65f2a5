"""Camera masks: validation, fills on the frames that reach the stream, and the preview image."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest
import yaml
from ingest_media import index_frame, read_index, write_mp4
from PIL import Image

from fallwatch.schemas import FrameMessage, decode
from fallwatch.settings import ConfigError, MaskSettings, Settings, load_settings
from ingest.camera import run_camera
from ingest.masks import FILL, OUTLINE, Masker, region
from tests.helpers import wait_for

BED = {"kind": "ignore", "name": "bed", "points": [[0.05, 0.05], [0.45, 0.05], [0.45, 0.35], [0.05, 0.35]]}
DOOR = {"kind": "privacy", "name": "bathroom", "points": [[0.6, 0.0], [0.95, 0.0], [0.95, 0.35], [0.7, 0.35]]}
MASKS = [MaskSettings(**BED), MaskSettings(**DOOR)]
W, H = 160, 120


def inner(masks: list[MaskSettings], margin: int = 3) -> np.ndarray:
    """Pixels at least ``margin`` inside the masks (JPEG blurs a few pixels at every edge)."""
    kernel = np.ones((2 * margin + 1,) * 2, np.uint8)
    eroded = cv2.erode(region(masks, W, H).astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return eroded.astype(bool)


def outer(masks: list[MaskSettings], margin: int = 3) -> np.ndarray:
    """Pixels at least ``margin`` away from every mask."""
    grown = cv2.dilate(region(masks, W, H).astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8))
    return ~grown.astype(bool)


def jpeg_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB")).astype(np.int16)


def config_file(tmp_path, settings: Settings, **camera) -> str:
    path = tmp_path / "fallwatch.yaml"
    path.write_text(yaml.safe_dump({
        "redis": {"url": settings.redis.url.get_secret_value()},
        "cameras": [{"id": "room12", "name": "Room 12", **camera}],
    }))
    return str(path)


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("points, message", [
    ([[0.1, 0.1], [1.2, 0.1], [0.5, 0.9]], "within the frame"),
    ([[0.1, -0.1], [0.9, 0.1], [0.5, 0.9]], "within the frame"),
    ([[0.1, 0.1], [0.5, 0.5], [0.9, 0.9]], "no area"),
    ([[0.2, 0.2], [0.2, 0.2], [0.2, 0.2]], "no area"),
    ([[0.1, 0.1], [0.9, 0.1]], "at least 3"),
])
def test_masks_outside_the_frame_or_degenerate_are_config_errors(tmp_path, points, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"cameras": [{"id": "c", "url": "x.mp4", "masks": [{"kind": "ignore", "points": points}]}]}))
    with pytest.raises(ConfigError) as exc:
        load_settings(path)
    assert [p for p, _ in exc.value.errors] == ["cameras.0.masks.0.points"]
    assert message in exc.value.errors[0][1]


def test_config_validate_names_the_bad_mask(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"cameras": [{"id": "c", "url": "x.mp4", "masks": [BED, {"kind": "privacy", "points": [[0, 0], [2, 0], [1, 1]]}]}]}))
    res = subprocess.run([sys.executable, "-m", "fallwatch", "config", "validate", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "cameras.0.masks.1.points" in res.stderr and "within the frame" in res.stderr
    assert "Traceback" not in res.stderr


# --- fills ----------------------------------------------------------------------------------


def test_masker_fills_inside_and_leaves_the_rest_alone():
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (H, W, 3), np.uint8)
    original = frame.copy()
    out = Masker(MASKS).apply(frame)
    assert out is frame  # in place: no copy per frame
    bed, door = region(MASKS[:1], W, H), region(MASKS[1:], W, H)
    assert (out[bed] == FILL["ignore"]).all() and (out[door] == FILL["privacy"]).all()
    untouched = ~(bed | door)
    assert np.array_equal(out[untouched], original[untouched])
    readonly = original.copy()
    readonly.flags.writeable = False
    assert (Masker(MASKS).apply(readonly)[door] == 0).all()  # a read-only frame is copied, not refused


def test_privacy_wins_where_masks_overlap_and_sizes_are_cached():
    both = [MaskSettings(kind="privacy", points=[(0, 0), (0.5, 0), (0.5, 0.5)]),
            MaskSettings(kind="ignore", points=[(0, 0), (0.6, 0), (0.6, 0.6), (0, 0.6)])]
    masker = Masker(both)
    small, big = np.full((H, W, 3), 200, np.uint8), np.full((2 * H, 2 * W, 3), 200, np.uint8)
    masker.apply(small), masker.apply(big)
    assert (small[region(both[:1], W, H)] == 0).all()
    assert (big[region(both[:1], 2 * W, 2 * H)] == 0).all()
    assert len(masker._layers) == 2 and masker.layers(W, H) is masker.layers(W, H)


def test_masked_camera_frames_reach_the_stream_filled(settings, keys, r, tmp_path):
    video = write_mp4(tmp_path / "room.mp4", 72, fps=18, width=W, height=H)
    cfg = load_settings(config_file(tmp_path, settings, url=str(video), fps=6.0, masks=[BED, DOOR]))
    stop = threading.Event()
    t = threading.Thread(target=run_camera, args=(cfg, cfg.cameras[0], r, keys, stop), daemon=True)
    t.start()
    try:
        assert wait_for(lambda: r.xlen(keys.frames_stream()) >= 4, timeout=30)
    finally:
        stop.set()
        t.join(15)
    frames = [decode(f, FrameMessage) for _, f in r.xrange(keys.frames_stream())]
    bed, door, rest = inner(MASKS[:1]), inner(MASKS[1:]), outer(MASKS)
    for msg, images in frames:
        got = jpeg_rgb(images[0])
        i = read_index(got)  # the frame index, read below the masks
        for inside, kind in ((door, "privacy"), (bed, "ignore")):  # JPEG leaves a little ringing at edges
            off = np.abs(got[inside] - np.array(FILL[kind]))
            assert off.mean() <= 2 and off.max() <= 24, (msg.frame_id, kind, off.mean(), off.max())
        expected = index_frame(i, W, H).astype(np.int16)
        diff = np.abs(got[rest] - expected[rest])
        assert diff.mean() < 3 and np.percentile(diff, 99) < 40, (msg.frame_id, diff.mean())
    assert len({read_index(jpeg_rgb(imgs[0])) for _, imgs in frames}) >= 3  # different pictures


# --- preview --------------------------------------------------------------------------------


def test_cameras_preview_draws_the_masks_on_one_frame(settings, tmp_path):
    video = write_mp4(tmp_path / "room.mp4", 18, fps=18, width=W, height=H)
    config = config_file(tmp_path, settings, url=str(video), masks=[BED, DOOR])
    out = tmp_path / "shots" / "room12.png"
    res = subprocess.run([sys.executable, "-m", "fallwatch", "--config", config, "cameras", "preview",
                          "--camera", "room12", "--out", str(out)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "FALLWATCH_LOGGING__FORMAT": "json"})
    assert res.returncode == 0, res.stderr
    assert f"wrote {out} (160x120, 2 masks)" in res.stdout
    img = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB).astype(np.int16)  # PNG: lossless
    frame0 = index_frame(0, W, H).astype(np.int16)
    bed, door = inner(MASKS[:1]), inner(MASKS[1:])
    assert (img[door] == FILL["privacy"]).all()  # privacy: as the stream gets it
    tinted = np.round(frame0[bed] * 0.5 + np.array(FILL["ignore"]) * 0.5)
    assert np.abs(img[bed] - tinted).max() <= 3  # ignore: the bed stays visible under a tint
    corner = (round(0.05 * (W - 1)), round(0.05 * (H - 1)))  # outline on the bed's first corner
    assert tuple(img[corner[1], corner[0]]) == OUTLINE["ignore"]
    rest = outer(MASKS)
    assert np.abs(img[rest] - frame0[rest]).mean() < 3  # H.264 of the video, nothing drawn


def test_cameras_preview_bad_input_is_one_line_and_exit_2(settings, tmp_path):
    video = write_mp4(tmp_path / "room.mp4", 4, fps=18, width=W, height=H)
    config = config_file(tmp_path, settings, url=str(video), masks=[BED])
    for args, message in ((["--camera", "nope", "--out", str(tmp_path / "a.png")], "no camera 'nope'"),
                          (["--camera", "room12", "--out", str(tmp_path / "a.gif")], "use a .png or .jpg")):
        res = subprocess.run([sys.executable, "-m", "fallwatch", "--config", config, "cameras", "preview", *args],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "a.png").exists()

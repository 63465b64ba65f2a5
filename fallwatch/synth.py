"""A licence-free synthetic fall dataset, deterministic for a seed.

Simple stick-and-block people (head, torso, limbs) stand, sit or lie in simple rooms (wall,
floor, furniture blocks, random colours). The output mimics the Roboflow export of "Fall
Detection - Eldercare Robot" so every tool that reads the real data reads this too::

    OUT/data.yaml
    OUT/{train,valid,test}/images/synth0007_jpg.rf.<hash>.jpg
    OUT/{train,valid,test}/labels/synth0007_jpg.rf.<hash>.txt     # "<cls> xc yc w h", 0 = fall (lying), 1 = not fallen
    OUT/clips/fall_000.mp4, OUT/clips/no_fall_001.mp4, ...         # H.264
    OUT/clips/labels.csv                                           # id,path,fall  (read by load_clips)

Training copies get the export's augmentation, applied inside each bounding box: a horizontal
flip with probability 1/2, then one of no / clockwise / counter-clockwise 90-degree rotation.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FALL_CLASS, NOT_FALLEN_CLASS = 0, 1
Point = tuple[float, float]


class Pose(str, Enum):
    STANDING = "standing"
    SITTING = "sitting"
    LYING = "lying"


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    sources: Mapping[str, int] = field(default_factory=lambda: {"train": 16, "valid": 6, "test": 6})
    train_copies: int = 3  # augmented copies of each training source, like the export
    image_size: int = 320  # square images (the export is 640x640)
    clips: int = 8  # half falls, half not
    clip_size: tuple[int, int] = (320, 240)
    clip_fps: int = 10
    clip_seconds: float = 2.5
    jpeg_quality: int = 90


@dataclass(frozen=True)
class SynthSummary:
    out: Path
    images: Mapping[str, int]
    falls: Mapping[str, int]
    clips: int


# --- scene model ---------------------------------------------------------------------------------

# Joint positions of a 1-unit-tall person, feet at y = 0, up is -y, facing +x when it matters.
_STANDING: dict[str, Point] = {
    "head": (0.0, -0.91), "neck": (0.0, -0.80), "hip": (0.0, -0.48),
    "shoulder_l": (-0.10, -0.78), "elbow_l": (-0.14, -0.62), "hand_l": (-0.15, -0.47),
    "shoulder_r": (0.10, -0.78), "elbow_r": (0.14, -0.62), "hand_r": (0.15, -0.47),
    "hip_l": (-0.06, -0.48), "knee_l": (-0.06, -0.25), "foot_l": (-0.07, 0.0),
    "hip_r": (0.06, -0.48), "knee_r": (0.06, -0.25), "foot_r": (0.07, 0.0),
}
_SITTING: dict[str, Point] = {
    "head": (-0.02, -0.71), "neck": (-0.02, -0.60), "hip": (0.0, -0.27),
    "shoulder_l": (-0.05, -0.58), "elbow_l": (0.02, -0.44), "hand_l": (0.14, -0.38),
    "shoulder_r": (0.01, -0.58), "elbow_r": (0.06, -0.44), "hand_r": (0.18, -0.38),
    "hip_l": (-0.02, -0.27), "knee_l": (0.20, -0.28), "foot_l": (0.20, 0.0),
    "hip_r": (0.02, -0.27), "knee_r": (0.24, -0.28), "foot_r": (0.24, 0.0),
}
_BONES = [
    ("shoulder_l", "elbow_l"), ("elbow_l", "hand_l"), ("shoulder_r", "elbow_r"), ("elbow_r", "hand_r"),
    ("hip_l", "knee_l"), ("knee_l", "foot_l"), ("hip_r", "knee_r"), ("knee_r", "foot_r"),
    ("shoulder_l", "shoulder_r"),
]
_TORSO_W, _LIMB_W, _HEAD_R = 0.13, 0.055, 0.075


@dataclass(frozen=True)
class Person:
    joints: Mapping[str, Point]  # unit-height pose, already rotated, feet frame
    x: float  # pixel position of the pose origin
    floor_y: float  # pixel row the lowest point rests on
    height: float  # pixel height of a standing person here
    skin: tuple[int, int, int]
    shirt: tuple[int, int, int]
    pants: tuple[int, int, int]
    hair: tuple[int, int, int]
    lying: bool

    def pixel(self, name: str) -> Point:
        jx, jy = self.joints[name]
        return self.x + jx * self.height, self.floor_y + (jy - _lowest(self.joints)) * self.height

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Pixel box (x0, y0, x1, y1) around every drawn part, clipped to the image."""
        pad = max(_HEAD_R, _TORSO_W / 2) * self.height
        pts = [self.pixel(n) for n in self.joints]
        x0, y0 = min(p[0] for p in pts) - pad, min(p[1] for p in pts) - pad
        x1, y1 = max(p[0] for p in pts) + pad, max(p[1] for p in pts) + pad
        return max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)


def _lowest(joints: Mapping[str, Point]) -> float:
    return max(y for _, y in joints.values())


@dataclass(frozen=True)
class Block:
    box: tuple[float, float, float, float]
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class Room:
    width: int
    height: int
    horizon: float  # pixel row where the wall meets the floor
    wall: tuple[int, int, int]
    floor: tuple[int, int, int]
    blocks: tuple[Block, ...]
    noise_seed: int


def rotate(joints: Mapping[str, Point], degrees: float, pivot: Point = (0.0, 0.0)) -> dict[str, Point]:
    """Rotate a pose clockwise on screen (y points down) by ``degrees`` about ``pivot``."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    px, py = pivot
    return {n: (px + (x - px) * c - (y - py) * s, py + (x - px) * s + (y - py) * c) for n, (x, y) in joints.items()}


def blend(a: Mapping[str, Point], b: Mapping[str, Point], t: float) -> dict[str, Point]:
    return {n: (a[n][0] * (1 - t) + b[n][0] * t, a[n][1] * (1 - t) + b[n][1] * t) for n in a}


def mirror(joints: Mapping[str, Point]) -> dict[str, Point]:
    return {n: (-x, y) for n, (x, y) in joints.items()}


def walking(phase: float) -> dict[str, Point]:
    """The standing pose mid-stride; ``phase`` in radians."""
    swing = 0.09 * math.sin(phase)
    pose = dict(_STANDING)
    pose["knee_l"], pose["foot_l"] = (-0.06 + swing * 0.6, -0.25), (-0.07 + swing * 1.4, 0.0)
    pose["knee_r"], pose["foot_r"] = (0.06 - swing * 0.6, -0.25), (0.07 - swing * 1.4, 0.0)
    pose["hand_l"], pose["hand_r"] = (-0.15 - swing, -0.47), (0.15 + swing, -0.47)
    return pose


def lying(rng: np.random.Generator) -> dict[str, Point]:
    """A person on the floor: the standing pose turned by about 90 degrees, limbs a little spread."""
    pose = dict(_STANDING)
    spread = float(rng.uniform(0.0, 0.12))
    pose["hand_l"], pose["hand_r"] = (-0.15 - spread, -0.47 - spread), (0.15 + spread, -0.47 + spread / 2)
    pose["foot_l"] = (-0.07 - spread / 2, 0.0)
    angle = float(rng.choice([-1, 1])) * float(rng.uniform(80, 100))
    return rotate(pose, angle)


def pose_joints(pose: Pose, rng: np.random.Generator) -> dict[str, Point]:
    if pose is Pose.LYING:
        return lying(rng)
    base = _SITTING if pose is Pose.SITTING else walking(float(rng.uniform(0, 2 * math.pi)))
    return mirror(base) if rng.random() < 0.5 else dict(base)


def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))  # type: ignore[return-value]


_SKINS = [(255, 224, 189), (234, 192, 134), (198, 134, 66), (141, 85, 36), (92, 58, 33)]


def make_room(rng: np.random.Generator, width: int, height: int) -> Room:
    horizon = float(rng.uniform(0.35, 0.55)) * height
    blocks = []
    for _ in range(int(rng.integers(1, 4))):
        w = float(rng.uniform(0.12, 0.35)) * width
        h = float(rng.uniform(0.10, 0.40)) * height
        x0 = float(rng.uniform(0, width - w))
        base = horizon + float(rng.uniform(0.0, 0.25)) * (height - horizon)
        blocks.append(Block((x0, base - h, x0 + w, base), _colour(rng, 40, 220)))
    return Room(width, height, horizon, _colour(rng, 120, 250), _colour(rng, 60, 200),
                tuple(blocks), int(rng.integers(0, 2**31)))


def make_person(rng: np.random.Generator, room: Room, joints: Mapping[str, Point], lying: bool) -> Person:
    depth = float(rng.uniform(0.35, 0.95))
    floor_y = room.horizon + depth * (room.height - room.horizon)
    height = room.height * (0.30 + 0.35 * depth)
    if lying:
        height = min(height, room.width * 0.7)
    xs = [x for x, _ in joints.values()]
    lo, hi = (-min(xs) + 0.1) * height, room.width - (max(xs) + 0.1) * height
    x = float(rng.uniform(lo, hi)) if hi > lo else room.width / 2
    return Person(joints, x, floor_y, height, _SKINS[int(rng.integers(len(_SKINS)))], _colour(rng),
                  _colour(rng), _colour(rng, 0, 90), lying)


# --- drawing -----------------------------------------------------------------------------------


def render(room: Room, people: list[Person], chairs: list[Block] | None = None) -> np.ndarray:
    img = Image.new("RGB", (room.width, room.height), room.wall)
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, room.horizon, room.width, room.height], fill=room.floor)
    for block in (*room.blocks, *(chairs or [])):
        draw.rectangle(block.box, fill=block.colour, outline=tuple(c // 2 for c in block.colour))
    for person in sorted(people, key=lambda p: p.floor_y):
        _draw_person(draw, person)
    noise = np.random.default_rng(room.noise_seed).integers(-6, 7, size=(room.height, room.width, 3), dtype=np.int16)
    return np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)


def _draw_person(draw: ImageDraw.ImageDraw, p: Person) -> None:
    px = p.pixel
    limb = max(2, int(_LIMB_W * p.height))
    for a, b in _BONES:
        colour = p.pants if a.startswith(("hip", "knee")) else p.shirt
        draw.line([px(a), px(b)], fill=colour, width=limb)
    for hand in ("hand_l", "hand_r"):
        _disc(draw, px(hand), limb * 0.6, p.skin)
    draw.line([px("neck"), px("hip")], fill=p.shirt, width=max(3, int(_TORSO_W * p.height)))
    _disc(draw, px("head"), _HEAD_R * p.height, p.skin)
    hx, hy = px("head")
    nx, ny = px("neck")
    r = _HEAD_R * p.height
    _disc(draw, (hx + (hx - nx) * 0.25, hy + (hy - ny) * 0.25), r * 0.8, p.hair)


def _disc(draw: ImageDraw.ImageDraw, centre: Point, r: float, colour: tuple[int, int, int]) -> None:
    x, y = centre
    draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def chair_under(person: Person) -> Block:
    """A seat block under a sitting person's hips."""
    hx, hy = person.pixel("hip")
    kx, _ = person.pixel("knee_l")
    x0, x1 = sorted((hx, kx))
    return Block((x0 - 0.05 * person.height, hy + 0.02 * person.height, x1, person.floor_y), (110, 70, 40))


# --- still images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    image: np.ndarray
    boxes: tuple[tuple[int, tuple[float, float, float, float]], ...]  # (class, pixel box)


def make_scene(rng: np.random.Generator, size: int, fall: bool | None = None) -> Scene:
    """One still: one person (sometimes a second one standing) in a random room; ``fall`` says
    whether the main person lies on the floor (None: a coin flip)."""
    room = make_room(rng, size, size)
    if fall is None:
        fall = bool(rng.random() < 0.5)
    pose = Pose.LYING if fall else [Pose.STANDING, Pose.SITTING][int(rng.integers(2))]
    people = [make_person(rng, room, pose_joints(pose, rng), pose is Pose.LYING)]
    if rng.random() < 0.2:
        people.append(make_person(rng, room, pose_joints(Pose.STANDING, rng), False))
    chairs = [chair_under(people[0])] if pose is Pose.SITTING else []
    image = render(room, people, chairs)
    boxes = tuple((FALL_CLASS if p.lying else NOT_FALLEN_CLASS, p.box(size, size)) for p in people)
    return Scene(image, boxes)


def augment_in_boxes(image: np.ndarray, boxes, rng: np.random.Generator) -> np.ndarray:
    """The export's augmentation inside each box: flip (p=1/2), then none / cw / ccw 90 degrees."""
    out = image.copy()
    for _, (x0, y0, x1, y1) in boxes:
        flip, turn = rng.random() < 0.5, int(rng.integers(3))
        out = _augment_box(out, (int(x0), int(y0), int(math.ceil(x1)), int(math.ceil(y1))), flip, turn)
    return out


def _augment_box(image: np.ndarray, box: tuple[int, int, int, int], flip: bool, turn: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    if x1 - x0 < 2 or y1 - y0 < 2:
        return image
    crop = Image.fromarray(image[y0:y1, x0:x1])
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if turn:
        crop = crop.transpose(Image.Transpose.ROTATE_270 if turn == 1 else Image.Transpose.ROTATE_90)
        crop = crop.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    image[y0:y1, x0:x1] = np.asarray(crop)
    return image


def yolo_lines(boxes, width: int, height: int) -> str:
    lines = []
    for cls, (x0, y0, x1, y1) in boxes:
        xc, yc = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
        lines.append(f"{cls} {xc:.6f} {yc:.6f} {(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}")
    return "\n".join(lines) + "\n"


def copy_name(seed: int, source: str, copy: int) -> str:
    digest = hashlib.md5(f"{seed}:{source}:{copy}".encode()).hexdigest()
    return f"{source}.rf.{digest}"


def write_images(cfg: SynthConfig, out: Path, tick: Callable[[], None] = lambda: None) -> tuple[dict, dict]:
    """The YOLO tree; returns (images per split, fall images per split)."""
    counts: dict[str, int] = {}
    falls: dict[str, int] = {}
    number = 0
    for split, n_sources in cfg.sources.items():
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        (out / split / "labels").mkdir(parents=True, exist_ok=True)
        copies = cfg.train_copies if split == "train" else 1
        counts[split] = falls[split] = 0
        for j in range(n_sources):
            number += 1
            source = f"synth{number:04d}_jpg"
            rng = np.random.default_rng([cfg.seed, number])
            scene = make_scene(rng, cfg.image_size, fall=j % 2 == 0)  # half of every split falls
            is_fall = any(cls == FALL_CLASS for cls, _ in scene.boxes)
            for c in range(copies):
                image = augment_in_boxes(scene.image, scene.boxes, rng) if split == "train" else scene.image
                name = copy_name(cfg.seed, source, c)
                Image.fromarray(image).save(out / split / "images" / f"{name}.jpg", quality=cfg.jpeg_quality)
                (out / split / "labels" / f"{name}.txt").write_text(yolo_lines(scene.boxes, cfg.image_size, cfg.image_size))
                counts[split] += 1
                falls[split] += int(is_fall)
                tick()
    return counts, falls


# --- clips -------------------------------------------------------------------------------------


def clip_poses(fall: bool, variant: int, n: int) -> list[tuple[dict[str, Point], float]]:
    """(pose, x offset in person heights) per frame. Falls: walk, tip over, lie still.
    Non-falls alternate between walking across the room and sitting down (a hard negative)."""
    frames = []
    start, end = int(n * 0.35), int(n * 0.6)
    for i in range(n):
        step = min(i, start) * 0.04
        if fall:
            t = min(1.0, max(0.0, (i - start) / max(1, end - start)))
            pose = rotate(walking(i * 0.8) if t == 0 else dict(_STANDING), 90 * t * t, pivot=(0.0, 0.0))
            frames.append((pose, step))
        elif variant % 2 == 0:
            frames.append((walking(i * 0.8), i * 0.04))
        else:
            t = min(1.0, max(0.0, (i - start) / max(1, end - start)))
            frames.append((blend(walking(i * 0.8) if t == 0 else _STANDING, _SITTING, t), step))
    return frames


def write_clip(path: Path, frames: list[np.ndarray], fps: int) -> None:
    import av  # noqa: PLC0415 - lazily: video support is optional

    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"threads": "1", "crf": "23"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_clip_frames(cfg: SynthConfig, index: int, fall: bool) -> list[np.ndarray]:
    rng = np.random.default_rng([cfg.seed, 10_000 + index])
    width, height = cfg.clip_size
    room = make_room(rng, width, height)
    person = make_person(rng, room, _STANDING, False)
    person = replace(person, height=min(person.height, width * 0.45), x=width * 0.3)
    n = max(2, int(round(cfg.clip_seconds * cfg.clip_fps)))
    poses = clip_poses(fall, index // 2, n)
    sits_down = not fall and (index // 2) % 2 == 1
    seated = replace(person, joints=_SITTING, x=person.x + poses[-1][1] * person.height)
    chairs = [chair_under(seated)] if sits_down else []
    frames = []
    for pose, dx in poses:
        who = replace(person, joints=pose, x=person.x + dx * person.height)
        frames.append(render(room, [who], chairs))
    return frames


def write_clips(cfg: SynthConfig, out: Path, tick: Callable[[], None] = lambda: None) -> int:
    clip_dir = out / "clips"
    clip_dir.mkdir(parents=True, exist_ok=True)
    rows = ["id,path,fall"]
    for index in range(cfg.clips):
        fall = index % 2 == 0
        clip_id = f"{'fall' if fall else 'no_fall'}_{index:03d}"
        write_clip(clip_dir / f"{clip_id}.mp4", make_clip_frames(cfg, index, fall), cfg.clip_fps)
        rows.append(f"{clip_id},{clip_id}.mp4,{int(fall)}")
        tick()
    (clip_dir / "labels.csv").write_text("\n".join(rows) + "\n")
    return cfg.clips


def make_dataset(cfg: SynthConfig, out: Path, progress: bool = False) -> SynthSummary:
    """Write the whole synthetic dataset under ``out`` (created if needed)."""
    from tqdm import tqdm  # noqa: PLC0415 - only when writing a dataset

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(n * (cfg.train_copies if s == "train" else 1) for s, n in cfg.sources.items()) + cfg.clips
    with tqdm(total=total, desc="synth", unit="item", disable=not progress) as bar:
        counts, falls = write_images(cfg, out, bar.update)
        clips = write_clips(cfg, out, bar.update) if cfg.clips else 0
    _write_meta(cfg, out, counts, falls)
    return SynthSummary(out, counts, falls, clips)


def _write_meta(cfg: SynthConfig, out: Path, counts: Mapping[str, int], falls: Mapping[str, int]) -> None:
    splits = "\n".join(f"{s}: {s}/images" for s in cfg.sources)
    (out / "data.yaml").write_text(f"{splits}\nnc: 2\nnames: ['fall', 'not_fallen']\n")
    meta = {"generator": "fallwatch.synth", "seed": cfg.seed, "images": counts, "falls": falls,
            "clips": cfg.clips, "classes": {"0": "fall", "1": "not_fallen"}}
    (out / "synth.json").write_text(json.dumps(meta, indent=2) + "\n")

"""Labelled images and clips for distillation, evaluation and replay.

Two layouts are read:

* YOLO folders, as exported by Roboflow: ``<root>/<split>/images/*.jpg`` with
  ``<root>/<split>/labels/<stem>.txt`` holding ``<cls> <xc> <yc> <w> <h>`` lines. An image is a
  fall when any of its boxes has a fall class (default ``{0}``: the Fall Detection - Eldercare
  Robot export uses 0 = fall, 1 = not fallen). An empty label file means "no person, no fall";
  a missing one means "unlabelled" (``fall=None``).
* Clip lists: a CSV (``path,fall[,id]``) or JSON list (``[{"path":..., "fall":...}]``) file, or a
  folder with ``clips.csv``/``labels.csv``, or with ``fall/`` and ``no_fall/`` sub-folders of
  videos, or just videos (unlabelled). Paths are relative to the list file's folder.

Augmented copies of one source photo share the file-name prefix before ``.rf.`` (their
``group``); :func:`resplit` keeps every group inside one split so copies never leak between
train and test.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fallwatch.errors import UserError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v"})
DEFAULT_FALL_CLASSES = frozenset({0})
AUGMENT_MARK = ".rf."


class DatasetError(UserError, ValueError):
    """A dataset file or folder cannot be used; the message names it."""


@dataclass(frozen=True)
class LabeledImage:
    id: str
    path: Path
    fall: bool | None
    group: str  # source-photo name: the file name before ".rf."
    classes: tuple[int, ...] = ()  # class id of every box in the label file


@dataclass(frozen=True)
class LabeledClip:
    id: str
    path: Path
    fall: bool | None


@dataclass(frozen=True)
class DatasetStats:
    images: int
    fall: int
    no_fall: int
    unlabeled: int
    groups: int
    boxes_per_class: Mapping[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "images": self.images, "fall": self.fall, "no_fall": self.no_fall, "unlabeled": self.unlabeled,
            "groups": self.groups, "boxes_per_class": {str(k): v for k, v in sorted(self.boxes_per_class.items())},
        }


# --- YOLO images -------------------------------------------------------------------------------


def group_of(name: str) -> str:
    """The source-photo name of an (augmented) image file: everything before ``.rf.``."""
    base = Path(name).name
    if AUGMENT_MARK in base:
        return base.split(AUGMENT_MARK, 1)[0]
    return Path(base).stem


def parse_label_file(path: Path) -> tuple[int, ...]:
    """Class ids of the boxes in one YOLO label file; DatasetError naming the file and line."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read label file ({exc})") from None
    classes: list[int] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            classes.append(_parse_label_line(path, lineno, line))
    return tuple(classes)


def _parse_label_line(path: Path, lineno: int, line: str) -> int:
    parts = line.split()
    where = f"{path}:{lineno}"
    if len(parts) < 5:
        raise DatasetError(f"{where}: expected '<cls> <xc> <yc> <w> <h>', got {line.strip()!r}")
    try:
        cls = int(parts[0])
        coords = [float(p) for p in parts[1:]]
    except ValueError:
        raise DatasetError(f"{where}: not numbers: {line.strip()!r}") from None
    if cls < 0:
        raise DatasetError(f"{where}: negative class id {cls}")
    if any(not (-0.01 <= c <= 1.01) for c in coords[:4]):
        raise DatasetError(f"{where}: box coordinates must be normalised to [0, 1]: {line.strip()!r}")
    return cls


def _check_image(path: Path) -> None:
    try:
        with Image.open(path) as img:
            if img.width < 1 or img.height < 1:
                raise DatasetError(f"{path}: empty image")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: not a readable image ({exc})") from None


def load_yolo(root: Path, split: str, fall_classes: frozenset[int] = DEFAULT_FALL_CLASSES,
              on_bad: Callable[[str, str], None] | None = None) -> list[LabeledImage]:
    """Every image of ``<root>/<split>``, sorted by file name, with its fall label and group. A bad image
    or label file raises DatasetError, or, given ``on_bad(file, why)``, is reported there and left out."""
    images_dir = Path(root) / split / "images"
    labels_dir = Path(root) / split / "labels"
    if not images_dir.is_dir():
        found = sorted(p.parent.name for p in Path(root).glob("*/images") if p.is_dir())
        raise DatasetError(f"{images_dir}: no such folder (expected <root>/<split>/images; "
                           f"splits here: {', '.join(found) or 'none'})")
    paths = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetError(f"{images_dir}: no images")
    items = []
    for p in paths:
        try:
            items.append(_labeled_image(p, labels_dir / f"{p.stem}.txt", fall_classes))
        except DatasetError as exc:
            if on_bad is None:
                raise
            on_bad(str(p), str(exc))
    return items


def _labeled_image(path: Path, label_path: Path, fall_classes: frozenset[int]) -> LabeledImage:
    _check_image(path)
    if label_path.exists():
        classes = parse_label_file(label_path)
        fall: bool | None = any(c in fall_classes for c in classes)
    else:
        classes, fall = (), None
    return LabeledImage(id=path.stem, path=path, fall=fall, group=group_of(path.name), classes=classes)


def label_path_of(image: LabeledImage) -> Path:
    """Where the YOLO label file of an image lives (it may not exist)."""
    return image.path.parent.parent / "labels" / f"{image.path.stem}.txt"


def dataset_stats(items: Sequence[LabeledImage]) -> DatasetStats:
    boxes: Counter[int] = Counter()
    for item in items:
        boxes.update(item.classes)
    return DatasetStats(
        images=len(items),
        fall=sum(1 for i in items if i.fall is True),
        no_fall=sum(1 for i in items if i.fall is False),
        unlabeled=sum(1 for i in items if i.fall is None),
        groups=len({i.group for i in items}),
        boxes_per_class=dict(boxes),
    )


def read_rgb(path: Path) -> np.ndarray:
    """An image file as an HxWx3 uint8 RGB array; DatasetError naming the file if it is bad."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - any file at all: PIL raises OSError, SyntaxError, struct.error, bombs ...
        raise DatasetError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


# --- group-aware re-split ----------------------------------------------------------------------


def resplit(
    items: Sequence[LabeledImage], ratios: Mapping[str, float], seed: int = 0
) -> dict[str, list[LabeledImage]]:
    """Split images by the given ratios, keeping each group (source photo) in one split.

    Groups are shuffled with ``seed`` and handed out, fall groups and other groups separately,
    each to the split furthest below its target image count, so both the ratios and the class
    balance are followed as closely as whole groups allow.
    """
    names, weights = _check_ratios(ratios)
    groups: dict[str, list[LabeledImage]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    out: dict[str, list[LabeledImage]] = {n: [] for n in names}
    for stratum in (True, False):
        members = [g for g in order if any(i.fall for i in groups[g]) is stratum]
        _deal_groups([groups[g] for g in members], names, weights, out)
    return {n: sorted(v, key=lambda i: i.path.name) for n, v in out.items()}


def _check_ratios(ratios: Mapping[str, float]) -> tuple[list[str], list[float]]:
    if not ratios or any(r < 0 for r in ratios.values()) or sum(ratios.values()) <= 0:
        raise DatasetError(f"split ratios must be non-negative with a positive sum, got {dict(ratios)}")
    total = sum(ratios.values())
    return list(ratios), [r / total for r in ratios.values()]


def _deal_groups(
    groups: Iterable[list[LabeledImage]], names: list[str], weights: list[float], out: dict[str, list[LabeledImage]]
) -> None:
    groups = list(groups)
    total = sum(len(g) for g in groups)
    taken = dict.fromkeys(names, 0)
    for members in groups:
        deficit = {n: w * total - taken[n] for n, w in zip(names, weights)}
        target = max(names, key=lambda n: deficit[n])
        out[target].extend(members)
        taken[target] += len(members)


def write_yolo(splits: Mapping[str, Sequence[LabeledImage]], out_root: Path, link: bool = False) -> None:
    """Write images (copies, or hard links with ``link``) and their label files as a YOLO tree."""
    for split, items in splits.items():
        img_dir, lbl_dir = Path(out_root) / split / "images", Path(out_root) / split / "labels"
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        for item in items:
            _place(item.path, img_dir / item.path.name, link)
            label = label_path_of(item)
            if label.exists():
                _place(label, lbl_dir / label.name, link)


def _place(src: Path, dst: Path, link: bool) -> None:
    if dst.exists():
        dst.unlink()
    if link:
        try:
            dst.hardlink_to(src)
            return
        except OSError:
            pass  # another file system: copy instead
    shutil.copy2(src, dst)


# --- clips -------------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "fall", "y", "t"}
_FALSE = {"0", "false", "no", "no_fall", "nofall", "not_fallen", "n", "f"}


def parse_fall(value: object, where: str) -> bool | None:
    """A fall label from a CSV/JSON cell: 1/0, true/false, yes/no, fall/no_fall; empty = None."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "":
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DatasetError(f"{where}: cannot read fall label {value!r} (use 1/0, true/false, fall/no_fall)")


def load_clips(spec: Path) -> list[LabeledClip]:
    """Clips listed in a CSV/JSON file, or found in a folder (see the module docstring)."""
    spec = Path(spec)
    if spec.is_file():
        return _clips_from_file(spec)
    if not spec.is_dir():
        raise DatasetError(f"{spec}: no such clip list or folder")
    for name in ("clips.csv", "labels.csv", "clips.json", "labels.json"):
        if (spec / name).is_file():
            return _clips_from_file(spec / name)
    return _clips_from_folders(spec)


def _clips_from_file(path: Path) -> list[LabeledClip]:
    if path.suffix.lower() == ".json":
        rows = _json_rows(path)
    elif path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    else:
        raise DatasetError(f"{path}: a clip list must be .csv or .json")
    clips = [_clip_from_row(path, n, row) for n, row in enumerate(rows, start=1)]
    if not clips:
        raise DatasetError(f"{path}: lists no clips")
    ids = Counter(c.id for c in clips)
    dupes = sorted(i for i, n in ids.items() if n > 1)
    if dupes:
        raise DatasetError(f"{path}: duplicate clip ids {dupes}")
    return clips


def _json_rows(path: Path) -> list[dict[str, object]]:
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not a readable JSON clip list ({exc})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DatasetError(f"{path}: expected a JSON list of objects with 'path' and 'fall'")
    return rows


def _csv_rows(path: Path) -> list[dict[str, object]]:
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise DatasetError(f"{path}: CSV needs a header with a 'path' column (and 'fall')")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a readable CSV clip list ({exc})") from None


def _clip_from_row(list_path: Path, n: int, row: Mapping[str, object]) -> LabeledClip:
    where = f"{list_path} row {n}"
    raw = row.get("path")
    if not raw:
        raise DatasetError(f"{where}: missing 'path'")
    path = Path(str(raw))
    if not path.is_absolute():
        path = list_path.parent / path
    if not path.is_file():
        raise DatasetError(f"{where}: clip {path} does not exist")
    clip_id = str(row.get("id") or path.stem)
    return LabeledClip(id=clip_id, path=path, fall=parse_fall(row.get("fall", row.get("label")), where))


def _clips_from_folders(root: Path) -> list[LabeledClip]:
    labelled = {"fall": True, "no_fall": False}
    clips: list[LabeledClip] = []
    if any((root / d).is_dir() for d in labelled):
        for sub, fall in labelled.items():
            clips += [LabeledClip(p.stem, p, fall) for p in _videos_in(root / sub)]
    else:
        clips = [LabeledClip(p.stem, p, None) for p in _videos_in(root)]
    if not clips:
        raise DatasetError(f"{root}: no clips (expected clips.csv, fall/ and no_fall/ folders, or videos)")
    return sorted(clips, key=lambda c: c.id)


def _videos_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)


def read_clip_frames(path: Path, num_frames: int | None = None) -> np.ndarray:
    """Frames of a video as TxHxWx3 uint8 RGB; ``num_frames`` samples uniformly over the clip."""
    if num_frames is not None and num_frames < 1:
        raise DatasetError(f"{path}: num_frames must be >= 1, got {num_frames}")
    total = _count_frames(path)
    wanted = _uniform_indices(total, num_frames)
    frames = _decode(path, set(wanted))
    if len(frames) < len(set(wanted)):  # the container's frame count was too high: count again
        total = _count_decoded(path)
        wanted = _uniform_indices(total, num_frames)
        frames = _decode(path, set(wanted))
    if not frames:
        raise DatasetError(f"{path}: no video frames")
    return np.stack([frames[i] for i in wanted])


def _uniform_indices(total: int, num_frames: int | None) -> list[int]:
    if total <= 0:
        return []
    if num_frames is None:
        return list(range(total))
    return [int(round(x)) for x in np.linspace(0, total - 1, num_frames)]


def _open(path: Path):
    import av  # noqa: PLC0415 - lazily: video support is optional

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise DatasetError(f"{path}: not a readable video ({exc})") from None
    if not container.streams.video:
        container.close()
        raise DatasetError(f"{path}: has no video stream")
    return container


def _count_frames(path: Path) -> int:
    container = _open(path)
    try:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for p in container.demux(stream) if p.size)
    finally:
        container.close()


def _count_decoded(path: Path) -> int:
    container = _open(path)
    try:
        return sum(1 for _ in container.decode(video=0))
    finally:
        container.close()


def _decode(path: Path, keep: set[int]) -> dict[int, np.ndarray]:
    import av  # noqa: PLC0415 - lazily: video support is optional

    container = _open(path)
    frames: dict[int, np.ndarray] = {}
    last = max(keep) if keep else -1
    try:
        for index, frame in enumerate(container.decode(video=0)):
            if index in keep:
                frames[index] = frame.to_ndarray(format="rgb24")
            if index >= last:
                break
    except av.error.FFmpegError as exc:
        raise DatasetError(f"{path}: video decoding failed at frame {len(frames)} ({exc})") from None
    finally:
        container.close()
    return frames

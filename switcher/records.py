"""The distillation directory (DMD_DIR): what `fallwatch distill` writes and the switcher reads.

Layout::

    DMD_DIR/meta.json        models, questions, feature size, dataset, split, complete flag
    DMD_DIR/items.jsonl      one DmdItem per line, in dataset order
    DMD_DIR/shards/*.npy     features of one batch each (float32, rows in items order)
    DMD_DIR/features.npy     all features (N, F) float32, row i = line i of items.jsonl (when complete)
    DMD_DIR/paper.json       optional: [{"image_path", "last_hidden_layer", "label"}] (label = agreement)

Each batch first writes its shard (temporary file, fsync, rename), then appends its item lines
(one write, fsync). After a crash an item is either fully recorded or absent, so a re-run skips
what is done and redoes the rest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "fallwatch-dmd/1"
META, ITEMS, SHARDS, FEATURES, PAPER = "meta.json", "items.jsonl", "shards", "features.npy", "paper.json"


class DmdError(ValueError):
    """A distillation directory is missing, incomplete or inconsistent; the message names it."""


@dataclass(frozen=True)
class DmdMeta:
    edge_model_id: str
    questions: tuple[str, ...]
    feature_dim: int
    cloud_model_id: str
    cloud_question: str
    dataset: str
    split: str
    kind: str  # "image" | "clip"
    complete: bool = False
    items: int = 0
    format: str = FORMAT
    extra: dict[str, object] = field(default_factory=dict)

    def identity(self) -> dict[str, object]:
        """The fields that must match for a re-run to continue this directory."""
        return {k: getattr(self, k) for k in ("edge_model_id", "questions", "feature_dim", "cloud_model_id",
                                              "cloud_question", "dataset", "split", "kind")}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "DmdMeta":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["questions"] = tuple(known.get("questions", ()))  # type: ignore[arg-type]
        return cls(**known)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DmdItem:
    id: str
    path: str
    label: bool | None  # ground truth fall, None when unlabelled
    edge_p_fall: float
    edge_pred: bool
    cloud_p_fall: float
    cloud_pred: bool
    agree: bool  # edge_pred == cloud_pred: the switcher's training target
    edge_time_s: float  # batch wall time / batch size
    cloud_time_s: float
    edge_energy_j: float | None
    cloud_energy_j: float | None
    shard: str  # file under shards/ holding this item's features
    row: int  # row in that shard


@dataclass(frozen=True)
class DmdData:
    """A loaded distillation directory: items, their features (N, F) and the metadata."""

    meta: DmdMeta
    items: tuple[DmdItem, ...]
    features: np.ndarray

    def __len__(self) -> int:
        return len(self.items)

    def column(self, name: str, dtype: type = float) -> np.ndarray:
        return np.array([getattr(i, name) for i in self.items], dtype=dtype)

    @property
    def agree(self) -> np.ndarray:
        return self.column("agree", bool)

    @property
    def has_labels(self) -> np.ndarray:
        return np.array([i.label is not None for i in self.items], dtype=bool)

    def labels(self) -> np.ndarray:
        """Ground truth as a bool array; DmdError if any item is unlabelled."""
        if not self.has_labels.all():
            missing = [i.id for i in self.items if i.label is None][:5]
            raise DmdError(f"{self.meta.dataset} ({self.meta.split}): items without ground truth, e.g. {missing}")
        return self.column("label", bool)

    def labelled(self) -> "DmdData":
        """Only the items that have ground truth."""
        keep = self.has_labels
        return DmdData(self.meta, tuple(i for i, k in zip(self.items, keep) if k), self.features[keep])

    def energy(self, name: str) -> np.ndarray | None:
        """Per-item energy in joules, or None when any item was not measured."""
        values = [getattr(i, name) for i in self.items]
        if not values or any(v is None for v in values):
            return None
        return np.array(values, dtype=float)


# --- writing -----------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_meta(out: Path, meta: DmdMeta) -> None:
    data = asdict(meta)
    data["questions"] = list(meta.questions)
    atomic_write_bytes(out / META, (json.dumps(data, indent=2) + "\n").encode())


def read_versioned_json(path: Path, fmt: str, error: type[Exception], missing: str) -> dict[str, object]:
    """A JSON object whose "format" must be ``fmt``; ``error`` naming the file otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(missing) from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise error(f"{path}: format {found!r}, expected {fmt!r}")
    return data


def read_meta(out: Path) -> DmdMeta:
    missing = f"{out}: not a distillation directory (no {META}); run `fallwatch distill` first"
    return DmdMeta.from_dict(read_versioned_json(Path(out) / META, FORMAT, DmdError, missing))


def append_batch(out: Path, shard: str, features: np.ndarray, items: Sequence[DmdItem]) -> None:
    """Record one finished batch: its feature shard first, then its item lines (fsynced)."""
    (out / SHARDS).mkdir(exist_ok=True)
    atomic_save_npy(out / SHARDS / shard, np.ascontiguousarray(features, dtype=np.float32))
    with open(out / ITEMS, "a") as fh:
        fh.write(_lines(items))
        fh.flush()
        os.fsync(fh.fileno())


def _lines(items: Iterable[DmdItem]) -> str:
    return "".join(json.dumps(asdict(i)) + "\n" for i in items)


def rewrite_items(out: Path, items: Sequence[DmdItem]) -> None:
    """Replace items.jsonl with ``items`` in this order (atomically)."""
    atomic_write_bytes(Path(out) / ITEMS, _lines(items).encode())


def read_items(out: Path, repair: bool = False) -> list[DmdItem]:
    """The recorded items. A torn last line (crash mid-write) is dropped, and with ``repair``
    removed from the file; any other bad line is an error."""
    path = Path(out) / ITEMS
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    items: list[DmdItem] = []
    for n, line in enumerate(lines, start=1):
        try:
            items.append(DmdItem(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as exc:
            if n == len(lines) and not line.endswith("\n"):
                if repair:
                    atomic_write_bytes(path, "".join(lines[:-1]).encode())
                break
            raise DmdError(f"{path}:{n}: bad item line ({exc})") from None
    return items


def gather_features(out: Path, items: Sequence[DmdItem], feature_dim: int) -> np.ndarray:
    """Features of ``items`` in order, read from their shards."""
    matrix = np.zeros((len(items), feature_dim), dtype=np.float32)
    cache: dict[str, np.ndarray] = {}
    for n, item in enumerate(items):
        if item.shard not in cache:
            cache[item.shard] = _load_shard(Path(out) / SHARDS / item.shard, feature_dim)
        matrix[n] = cache[item.shard][item.row]
    return matrix


def _load_shard(path: Path, feature_dim: int) -> np.ndarray:
    try:
        shard = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DmdError(f"{path}: cannot read feature shard ({exc})") from None
    if shard.ndim != 2 or shard.shape[1] != feature_dim:
        raise DmdError(f"{path}: features of shape {shard.shape}, expected (n, {feature_dim})")
    return shard


def finish(out: Path, meta: DmdMeta, items: Sequence[DmdItem]) -> DmdMeta:
    """Write features.npy for all items and mark the directory complete."""
    atomic_save_npy(out / FEATURES, gather_features(out, items, meta.feature_dim))
    done = DmdMeta(**{**asdict(meta), "questions": meta.questions, "complete": True, "items": len(items)})
    write_meta(out, done)
    return done


def write_paper_json(out: Path, data: DmdData) -> Path:
    """The paper's export: [{"image_path", "last_hidden_layer", "label"}], label = 1 when the models agree."""
    rows = [
        {"image_path": item.path, "last_hidden_layer": [float(x) for x in feats], "label": int(item.agree)}
        for item, feats in zip(data.items, data.features)
    ]
    path = Path(out) / PAPER
    atomic_write_bytes(path, json.dumps(rows).encode())
    return path


# --- reading -----------------------------------------------------------------------------------


def load_dmd(path: Path) -> DmdData:
    """A complete distillation directory; DmdError naming the directory otherwise."""
    path = Path(path)
    meta = read_meta(path)
    if not meta.complete:
        raise DmdError(f"{path}: distillation is incomplete; run `fallwatch distill` again with the same --out to finish it")
    items = read_items(path)
    if len(items) != meta.items:
        raise DmdError(f"{path}: {ITEMS} has {len(items)} items, {META} says {meta.items}")
    features = _load_features(path, items, meta)
    return DmdData(meta, tuple(items), features)


def _load_features(path: Path, items: Sequence[DmdItem], meta: DmdMeta) -> np.ndarray:
    try:
        features = np.load(path / FEATURES, allow_pickle=False)
    except (OSError, ValueError):
        return gather_features(path, items, meta.feature_dim)
    if features.shape != (len(items), meta.feature_dim):
        raise DmdError(f"{path / FEATURES}: shape {features.shape}, expected ({len(items)}, {meta.feature_dim})")
    return features.astype(np.float32, copy=False)


def concat(datasets: Iterable[DmdData]) -> DmdData:
    """Several distillation directories of the same edge model as one (e.g. train + extra)."""
    datasets = list(datasets)
    first = datasets[0].meta
    for d in datasets[1:]:
        if (d.meta.edge_model_id, d.meta.questions, d.meta.feature_dim) != (first.edge_model_id, first.questions, first.feature_dim):
            raise DmdError(f"{d.meta.dataset}: distilled with edge model {d.meta.edge_model_id!r}, "
                           f"expected {first.edge_model_id!r} with the same questions")
    items = tuple(i for d in datasets for i in d.items)
    return DmdData(first, items, np.concatenate([d.features for d in datasets]))


def write_arrays(
    out: Path,
    meta: DmdMeta,
    features: np.ndarray,
    edge_p_fall: np.ndarray,
    cloud_p_fall: np.ndarray,
    labels: Sequence[bool | None] | None = None,
    edge_time_s: np.ndarray | None = None,
    cloud_time_s: np.ndarray | None = None,
    cloud_energy_j: np.ndarray | None = None,
) -> DmdData:
    """A complete distillation directory from arrays (scores computed elsewhere, or test data)."""
    n = len(features)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = [None] * n if labels is None else list(labels)
    edge_t = np.zeros(n) if edge_time_s is None else np.asarray(edge_time_s, dtype=float)
    cloud_t = np.zeros(n) if cloud_time_s is None else np.asarray(cloud_time_s, dtype=float)
    items = []
    for k in range(n):
        e, c = bool(edge_p_fall[k] >= 0.5), bool(cloud_p_fall[k] >= 0.5)
        items.append(DmdItem(
            id=f"item{k:06d}", path=f"item{k:06d}", label=None if labels[k] is None else bool(labels[k]),
            edge_p_fall=float(edge_p_fall[k]), edge_pred=e, cloud_p_fall=float(cloud_p_fall[k]), cloud_pred=c,
            agree=e == c, edge_time_s=float(edge_t[k]), cloud_time_s=float(cloud_t[k]), edge_energy_j=None,
            cloud_energy_j=None if cloud_energy_j is None else float(cloud_energy_j[k]), shard="00000000.npy", row=k,
        ))
    write_meta(out, DmdMeta(**{**asdict(meta), "questions": meta.questions, "feature_dim": int(features.shape[1])}))
    if (out / ITEMS).exists():
        (out / ITEMS).unlink()
    append_batch(out, "00000000.npy", features, items)
    finish(out, read_meta(out), items)
    return load_dmd(out)

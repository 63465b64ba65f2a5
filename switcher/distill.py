"""Dual-Model Distillation: run a dataset through the edge and the cloud model, zero-shot.

Per item it records both models' fall probability and prediction, whether they agree (the
switcher's training target; no human label is needed for it), the edge features, the ground
truth when the dataset has it, and the measured time (and energy, where metered) of each model
per item (batch wall time / batch size). Images go to both models; for a clip the cloud model
sees the clip and the edge model its middle sampled frame, as the edge worker does live.

Resumable: finished batches are recorded durably (see :mod:`switcher.records`), and a re-run
with the same ``out`` skips them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog

from fallwatch.datasets import DEFAULT_FALL_CLASSES, load_clips, load_yolo, read_clip_frames, read_rgb
from switcher import records
from switcher.records import DmdError, DmdItem, DmdMeta

log = structlog.get_logger(__name__)

Kind = Literal["image", "clip"]


@dataclass(frozen=True)
class DistillItem:
    id: str
    path: Path
    label: bool | None
    kind: Kind


@dataclass(frozen=True)
class BatchDone:
    """Passed to ``on_batch`` after a batch is recorded."""

    index: int  # batch number in this run, from 0
    items: int  # items recorded so far, earlier runs included
    total: int


def dataset_items(dataset: Path, split: str, fall_classes: frozenset[int] = DEFAULT_FALL_CLASSES) -> list[DistillItem]:
    """Images of ``<dataset>/<split>`` for a YOLO folder, else the clips ``load_clips`` finds."""
    dataset = Path(dataset)
    if dataset.is_dir() and (dataset / split / "images").is_dir():
        return [DistillItem(i.id, i.path, i.fall, "image") for i in load_yolo(dataset, split, fall_classes)]
    return [DistillItem(c.id, c.path, c.fall, "clip") for c in load_clips(dataset)]


def load_inputs(item: DistillItem, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(edge image HxWx3, cloud input HxWx3 or TxHxWx3) for one item."""
    if item.kind == "image":
        image = read_rgb(item.path)
        return image, image
    clip = read_clip_frames(item.path, num_frames)
    return clip[len(clip) // 2], clip


def _model_meta(edge: Any, cloud: Any, items: Sequence[DistillItem], dataset: str, split: str) -> DmdMeta:
    kinds = {i.kind for i in items}
    return DmdMeta(
        edge_model_id=str(edge.model_id), questions=tuple(edge.questions), feature_dim=int(edge.feature_dim),
        cloud_model_id=str(getattr(cloud, "model_id", "?")), cloud_question=str(getattr(cloud, "question", "")),
        dataset=dataset, split=split, kind="clip" if kinds == {"clip"} else "image",
    )


def _open(out: Path, fresh: DmdMeta) -> DmdMeta:
    """Start ``out``, or check that it continues the same distillation."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / records.META).exists():
        old = records.read_meta(out)
        if old.identity() != fresh.identity():
            diff = {k: (v, fresh.identity()[k]) for k, v in old.identity().items() if v != fresh.identity()[k]}
            raise DmdError(f"{out}: holds a distillation with other settings {diff} (recorded, now); use a new --out")
        return old
    records.write_meta(out, fresh)
    return fresh


def _check_ids(items: Sequence[DistillItem]) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DmdError(f"item id {item.id!r} appears twice ({item.path}); ids must be unique")
        seen.add(item.id)


def _per_item(total: float | None, n: int) -> float | None:
    return None if total is None else float(total) / n


def score_batch(batch: Sequence[DistillItem], edge: Any, cloud: Any, num_frames: int, shard: str) -> tuple[np.ndarray, list[DmdItem]]:
    """Both models on one batch: (features (B, F), item records)."""
    inputs = [load_inputs(item, num_frames) for item in batch]
    e = edge.score([edge_in for edge_in, _ in inputs])
    c = cloud.score([cloud_in for _, cloud_in in inputs])
    n = len(batch)
    rows = []
    for row, item in enumerate(batch):
        e_pred, c_pred = bool(e.p_fall[row] >= 0.5), bool(c.p_fall[row] >= 0.5)
        rows.append(DmdItem(
            id=item.id, path=str(item.path), label=item.label,
            edge_p_fall=float(e.p_fall[row]), edge_pred=e_pred, cloud_p_fall=float(c.p_fall[row]), cloud_pred=c_pred,
            agree=e_pred == c_pred, edge_time_s=e.wall_s / n, cloud_time_s=c.wall_s / n,
            edge_energy_j=_per_item(getattr(e, "energy_j", None), n), cloud_energy_j=_per_item(c.energy_j, n),
            shard=shard, row=row,
        ))
    return np.asarray(e.features, dtype=np.float32), rows


def distill(
    items: Sequence[DistillItem],
    edge: Any,
    cloud: Any,
    out: Path,
    *,
    dataset: str,
    split: str,
    batch_size: int = 8,
    num_frames: int = 8,
    paper_json: bool = False,
    on_batch: Callable[[BatchDone], None] | None = None,
    progress: bool = False,
) -> DmdMeta:
    """Distil ``items`` into ``out`` (resuming it if it holds an earlier run of the same models)."""
    from tqdm import tqdm

    if not items:
        raise DmdError(f"{dataset} ({split}): no items to distil")
    _check_ids(items)
    out = Path(out)
    meta = _open(out, _model_meta(edge, cloud, items, dataset, split))
    done = {i.id: i for i in records.read_items(out, repair=True)}
    _check_known(out, done, items)
    todo = [(n, i) for n, i in enumerate(items) if i.id not in done]
    used_shards = {i.shard for i in done.values()}
    if done:
        log.info("distill_resume", out=str(out), done=len(done), remaining=len(todo))
    with tqdm(total=len(items), initial=len(done), desc="distill", unit="item", disable=not progress) as bar:
        for b, start in enumerate(range(0, len(todo), batch_size)):
            chunk = todo[start:start + batch_size]
            shard = _shard_name(chunk[0][0], used_shards)
            features, rows = score_batch([i for _, i in chunk], edge, cloud, num_frames, shard)
            _check_features(features, meta, len(chunk))
            records.append_batch(out, shard, features, rows)
            used_shards.add(shard)
            done.update((r.id, r) for r in rows)
            bar.update(len(chunk))
            if on_batch is not None:
                on_batch(BatchDone(b, len(done), len(items)))
    return _finish(out, meta, [done[i.id] for i in items], paper_json)


def _check_known(out: Path, done: dict[str, DmdItem], items: Sequence[DistillItem]) -> None:
    unknown = sorted(set(done) - {i.id for i in items})
    if unknown:
        raise DmdError(f"{out}: holds items that are not in the dataset, e.g. {unknown[:3]}; use a new --out")


def _shard_name(first_index: int, used: set[str]) -> str:
    name, n = f"{first_index:08d}.npy", 1
    while name in used:
        name, n = f"{first_index:08d}-{n}.npy", n + 1
    return name


def _check_features(features: np.ndarray, meta: DmdMeta, n: int) -> None:
    if features.shape != (n, meta.feature_dim):
        raise DmdError(f"edge model {meta.edge_model_id!r} gave features {features.shape}, expected ({n}, {meta.feature_dim})")


def _finish(out: Path, meta: DmdMeta, ordered: list[DmdItem], paper_json: bool) -> DmdMeta:
    records.rewrite_items(out, ordered)  # dataset order, whatever order earlier runs recorded them in
    meta = records.finish(out, meta, ordered)
    if paper_json:
        records.write_paper_json(out, records.load_dmd(out))
    agree = sum(i.agree for i in ordered)
    log.info("distill_done", out=str(out), items=len(ordered), agree=agree, disagree=len(ordered) - agree)
    return meta

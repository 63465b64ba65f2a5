"""Outcomes as ground truth: precision of alerts per camera over time, and labels for training.

Every resolved fall event is one OutcomeRecord on ``keys.outcomes_stream()`` holding the event's
frame ids. A confirmed fall labels those frames ``true``, a false alarm ``false``; "not sure" gives
``null`` (unlabelled), the same meaning as the ``label`` field of a distillation directory's
items (``switcher.records.DmdItem``), so :func:`apply_to_dmd` can write them there.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from fallwatch.keys import Keys
from fallwatch.schemas import EventOutcome, OutcomeRecord, SchemaError, decode

DAY_S = 86400


def read_outcomes(client: Any, keys: Keys) -> list[OutcomeRecord]:
    out = []
    for _, fields in client.xrange(keys.outcomes_stream()):
        try:
            out.append(decode(fields, expect=OutcomeRecord)[0])
        except SchemaError:
            continue
    return out


def label_of(outcome: EventOutcome) -> bool | None:
    return {EventOutcome.CONFIRMED_FALL: True, EventOutcome.FALSE_ALARM: False}.get(outcome)


def precision(confirmed: int, false_alarm: int) -> float | None:
    return confirmed / (confirmed + false_alarm) if confirmed + false_alarm else None


def _bucket_row(start: float, counts: dict[str, int]) -> dict[str, Any]:
    c, f = counts.get(EventOutcome.CONFIRMED_FALL, 0), counts.get(EventOutcome.FALSE_ALARM, 0)
    return {"period_start": start, "confirmed": c, "false_alarm": f, "not_sure": counts.get(EventOutcome.NOT_SURE, 0),
            "precision": precision(c, f)}


def precision_by_camera(records: list[OutcomeRecord], bucket_s: int = DAY_S) -> dict[str, list[dict[str, Any]]]:
    """camera -> rows per period (by event start; oldest first): counts and precision of its alerts."""
    counts: dict[str, dict[float, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    for rec in records:
        start = rec.started_at - rec.started_at % bucket_s
        counts[rec.camera_id][start][rec.outcome] += 1
    return {cam: [_bucket_row(t, c) for t, c in sorted(periods.items())] for cam, periods in sorted(counts.items())}


def frame_labels(records: list[OutcomeRecord]) -> list[dict[str, Any]]:
    """One row per frame id (the latest outcome of a frame wins), in the DMD ``label`` convention."""
    rows: dict[str, dict[str, Any]] = {}
    for rec in sorted(records, key=lambda r: r.at):
        for frame_id in rec.frame_ids:
            rows[frame_id] = {"id": frame_id, "label": label_of(rec.outcome), "outcome": rec.outcome.value,
                              "event_id": rec.event_id, "camera_id": rec.camera_id, "resolved_by": rec.by,
                              "resolved_at": rec.at}
    return list(rows.values())


def write_labels(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def apply_to_dmd(dmd_dir: Path, rows: list[dict[str, Any]]) -> int:
    """Set the ``label`` of the distillation items whose id is a labelled frame id; returns how many."""
    from dataclasses import replace  # noqa: PLC0415

    from switcher import records  # noqa: PLC0415 - only this export needs the switcher package

    items = records.read_items(Path(dmd_dir))
    if not items:
        raise records.DmdError(f"{dmd_dir}: no distillation items (items.jsonl) to label")
    labels = {r["id"]: r["label"] for r in rows if r["label"] is not None}
    updated = [replace(i, label=labels[i.id]) if i.id in labels else i for i in items]
    records.rewrite_items(Path(dmd_dir), updated)
    return sum(i.id in labels for i in items)

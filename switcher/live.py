"""Live DMD for the switcher: the store as distillation data, and its export.

``fallwatch dmd export --out DIR`` writes the store in exactly the ``fallwatch distill``
directory format (:mod:`switcher.records`), so ``switcher train``, ``calibrate`` and
``evaluate`` work on it unchanged. Beside the standard files it writes ``live.jsonl``: per
item, in the same order, the camera, capture time, route, inclusion probability and switcher
version, which the distill format has no place for (refresh weights items by 1 / inclusion).

Only records of one edge model and question set go into one directory: those of the newest
record (after an edge upgrade the older records describe other features).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fallwatch.dmd_store import StoredRecord, load_records
from fallwatch.keys import Keys
from fallwatch.settings import Settings
from switcher import records
from switcher.records import DmdData, DmdError, DmdItem, DmdMeta

LIVE = "live.jsonl"
SHARD = "00000000.npy"


@dataclass(frozen=True)
class LiveData:
    """Store records as distillation data, with what only the live store knows."""

    data: DmdData
    records: tuple[StoredRecord, ...]

    @property
    def weights(self) -> np.ndarray:
        """Inverse-propensity weights: an audit at 2% stands for 50 items of the traffic."""
        return np.array([1.0 / r.record.inclusion for r in self.records], dtype=np.float64)

    def subset(self, mask: np.ndarray) -> "LiveData":
        items = tuple(i for i, k in zip(self.data.items, mask) if k)
        return LiveData(DmdData(self.data.meta, items, self.data.features[mask]),
                        tuple(r for r, k in zip(self.records, mask) if k))


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def item_of(k: int, r: StoredRecord) -> DmdItem:
    rec = r.record
    edge, cloud = rec.edge_p_fall >= 0.5, rec.cloud_p_fall >= 0.5
    return DmdItem(id=rec.frame_id, path=f"live/{rec.camera_id}/{rec.frame_id}", label=rec.gt_fall,
                   edge_p_fall=rec.edge_p_fall, edge_pred=edge, cloud_p_fall=rec.cloud_p_fall, cloud_pred=cloud,
                   agree=edge == cloud, edge_time_s=0.0, cloud_time_s=0.0, edge_energy_j=None, cloud_energy_j=None,
                   shard=SHARD, row=k)


def meta_of(recs: Sequence[StoredRecord], settings: Settings, keys: Keys) -> DmdMeta:
    last = recs[-1].record
    return DmdMeta(edge_model_id=last.edge_model_id, questions=tuple(last.questions), feature_dim=last.feature_dim,
                   cloud_model_id=last.cloud_model_id or settings.cloud.model, cloud_question=settings.cloud.question,
                   dataset=f"live:{keys.prefix}", split="live", kind=last.kind.value, complete=True, items=len(recs),
                   extra={"source": "live", "first_entry": recs[0].entry_id, "last_entry": recs[-1].entry_id})


def live_data(recs: Sequence[StoredRecord], settings: Settings, keys: Keys) -> LiveData:
    """Records (already one identity) as in-memory distillation data."""
    if not recs:
        raise DmdError("the live DMD store holds no records (yet): offloads and audits write them")
    items = tuple(item_of(k, r) for k, r in enumerate(recs))
    features = np.stack([r.features for r in recs]).astype(np.float32)
    return LiveData(DmdData(meta_of(recs, settings, keys), items, features), tuple(recs))


def read_store(client, keys: Keys, settings: Settings, since: float | None = None) -> LiveData:
    recs = load_records(client, keys, since)
    if recs:
        ident = recs[-1].record
        want = (ident.edge_model_id, tuple(ident.questions), ident.feature_dim)
        latest = {r.record.frame_id: r for r in recs
                  if (r.record.edge_model_id, tuple(r.record.questions), r.record.feature_dim) == want}
        recs = sorted(latest.values(), key=lambda r: _order(r.entry_id))
    return live_data(recs, settings, keys)


def _live_line(r: StoredRecord) -> str:
    rec = r.record
    return json.dumps({"id": rec.frame_id, "camera_id": rec.camera_id, "captured_at": rec.captured_at,
                       "route": rec.route, "inclusion": rec.inclusion, "switcher_version": rec.switcher_version,
                       "entry_id": r.entry_id}) + "\n"


def write_dir(out: Path, live: LiveData) -> DmdMeta:
    """A complete distillation directory of ``live`` plus ``live.jsonl``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DmdError(f"{out}: exists and is not empty; export into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    meta = DmdMeta(**{**live.data.meta.__dict__, "complete": False, "items": 0})
    records.write_meta(out, meta)
    records.append_batch(out, SHARD, live.data.features, live.data.items)
    done = records.finish(out, meta, live.data.items)
    records.atomic_write_bytes(out / LIVE, "".join(_live_line(r) for r in live.records).encode())
    return done


def read_live_lines(path: Path) -> list[dict]:
    """The ``live.jsonl`` of an exported directory, in items order."""
    return [json.loads(line) for line in (Path(path) / LIVE).read_text().splitlines() if line.strip()]


def export(client, keys: Keys, settings: Settings, out: Path, since: float | None = None) -> DmdMeta:
    return write_dir(out, read_store(client, keys, settings, since))

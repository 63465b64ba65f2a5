"""The live DMD store: one record per item both models judged (offloads and audits), in Redis.

A record is a :class:`~fallwatch.schemas.DmdRecord` on the stream ``keys.dmd_store()``, with the
edge features beside it in field ``f`` as little-endian float32 bytes (1536 floats = 6 KB for
ViLT), exactly as the edge computed them. No pixels are stored, so the store can be kept for
weeks. It is bounded by count (``dmd.store_maxlen``, XADD MAXLEN ~) and by age
(``dmd.store_max_age_s``, XTRIM MINID ~ on every write).

The edge keeps an item's features under ``keys.edge_features(frame_id)`` with a TTL (field ``f``
plus ``meta``: edge model id, questions, switcher version); the cloud side reads them when it
has scored the item, writes the record and deletes the key.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fallwatch.keys import Keys
from fallwatch.schemas import DmdRecord, SchemaError, decode, encode
from fallwatch.settings import DmdSettings

FEATURES_FIELD = b"f"
META_FIELD = b"meta"
FEATURE_DTYPE = np.dtype("<f4")


def features_to_bytes(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype=FEATURE_DTYPE).tobytes()


def features_from_bytes(raw: bytes, dim: int | None = None) -> np.ndarray:
    x = np.frombuffer(raw, dtype=FEATURE_DTYPE)
    if dim is not None and x.size != dim:
        raise SchemaError(f"features hold {x.size} floats, expected {dim}")
    return x.astype(np.float32)


@dataclass(frozen=True)
class EdgeContext:
    """What the edge knows about its features: the model, its questions, the switcher version."""

    edge_model_id: str
    questions: tuple[str, ...]
    switcher_version: str | None = None

    def to_json(self) -> bytes:
        return json.dumps({"edge_model_id": self.edge_model_id, "questions": list(self.questions),
                           "switcher_version": self.switcher_version}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "EdgeContext":
        data = json.loads(raw)
        return cls(str(data["edge_model_id"]), tuple(data["questions"]), data.get("switcher_version"))


def stash_features(pipe: Any, keys: Keys, frame_id: str, features: np.ndarray, ctx: EdgeContext, ttl_s: int) -> str:
    """Queue the edge features of one frame under their TTL key on ``pipe``; returns the key."""
    key = keys.edge_features(frame_id)
    pipe.hset(key, mapping={FEATURES_FIELD: features_to_bytes(features), META_FIELD: ctx.to_json()})
    pipe.expire(key, ttl_s)
    return key


def store_fields(record: DmdRecord, features: bytes) -> dict[bytes, bytes]:
    return {**encode(record), FEATURES_FIELD: features}


def append(pipe: Any, keys: Keys, cfg: DmdSettings, record: DmdRecord, features: bytes, now: float | None = None) -> None:
    """Queue one record on ``pipe``, trimming the store by count and age."""
    stream = keys.dmd_store()
    pipe.xadd(stream, store_fields(record, features), maxlen=cfg.store_maxlen, approximate=True)
    oldest_ms = int(((now or time.time()) - cfg.store_max_age_s) * 1000)
    pipe.xtrim(stream, minid=f"{max(oldest_ms, 0)}-0", approximate=False)


@dataclass(frozen=True)
class StoredRecord:
    entry_id: str
    record: DmdRecord
    features: np.ndarray


def parse_entry(entry_id: Any, fields: dict[Any, Any]) -> StoredRecord:
    msg, _ = decode(fields, expect=DmdRecord)
    assert isinstance(msg, DmdRecord)
    raw = fields.get(FEATURES_FIELD)
    if raw is None:
        raise SchemaError(f"DMD record {msg.frame_id} has no features")
    eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return StoredRecord(eid, msg, features_from_bytes(raw, msg.feature_dim))


def iter_records(client: Any, keys: Keys, since: float | None = None, batch: int = 1000) -> Iterator[StoredRecord]:
    """Records oldest first, optionally only those recorded at or after ``since`` (epoch seconds)."""
    start = "-" if since is None else f"{int(since * 1000)}-0"
    while True:
        entries = client.xrange(keys.dmd_store(), start, "+", count=batch)
        for eid, fields in entries:
            yield parse_entry(eid, fields)
        if len(entries) < batch:
            return
        last = entries[-1][0].decode() if isinstance(entries[-1][0], bytes) else entries[-1][0]
        start = "(" + last


def load_records(client: Any, keys: Keys, since: float | None = None) -> list[StoredRecord]:
    return list(iter_records(client, keys, since))


def size(client: Any, keys: Keys) -> int:
    return int(client.xlen(keys.dmd_store()))

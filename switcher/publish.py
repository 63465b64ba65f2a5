"""Switcher versions in Redis, and the edge's hot reload.

A published checkpoint lives in Redis (``keys.switcher_checkpoint(version)``: the card JSON and
the safetensors weights, about 3.4 MB for 1536 -> 512 -> 128 -> 1), so edge workers on other
machines need no shared disk. ``keys.switcher_current()`` names the version the edge must run;
``keys.switcher_history()`` lists promoted versions, newest first. Promotion pushes, rollback
pops; both change the current version in one transaction.

Edge workers look at the current version between batches (at most every
``dmd.reload_check_s``) and swap the switcher object there, so no frame is lost or scored twice:
a batch is scored wholly by one version, and every EdgeVerdict names it. A checkpoint for
another edge model or question set is refused, as at load time, and the worker keeps its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
import structlog

from fallwatch.keys import Keys
from switcher.model import WEIGHTS, Switcher, SwitcherError, check_identity, read_card

log = structlog.get_logger(__name__)


class NothingToRollBack(SwitcherError):
    """The history holds no earlier version."""


def _weights_from_bytes(raw: bytes, label: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return load(raw)
    except (SafetensorError, ValueError) as exc:
        raise SwitcherError(f"{label}: cannot read switcher weights ({exc})") from None


def publish(client: redis.Redis, keys: Keys, path: Path, promote: bool = True, source: str = "cli") -> str:
    """Store a checkpoint in Redis; with ``promote`` make it current and push it on the history."""
    sw = Switcher.load(path)
    card = read_card(path)
    client.hset(keys.switcher_checkpoint(sw.version), mapping={
        "card": json.dumps(card), "weights": (Path(path) / WEIGHTS).read_bytes(), "path": str(Path(path).resolve()),
    })
    if promote:
        with client.pipeline(transaction=True) as pipe:
            pipe.lrem(keys.switcher_history(), 0, sw.version)
            pipe.lpush(keys.switcher_history(), sw.version)
            _set_current(pipe, keys, sw.version, source)
            pipe.execute()
        log.info("switcher_published", version=sw.version, path=str(path), source=source)
    return sw.version


def _set_current(pipe: Any, keys: Keys, version: str, source: str) -> None:
    pipe.hset(keys.switcher_current(), mapping={"version": version, "at": repr(time.time()), "source": source})


def current_version(client: redis.Redis, keys: Keys) -> str | None:
    raw = client.hget(keys.switcher_current(), "version")
    return raw.decode() if raw is not None else None


def history(client: redis.Redis, keys: Keys) -> list[str]:
    return [v.decode() for v in client.lrange(keys.switcher_history(), 0, -1)]


def rollback(client: redis.Redis, keys: Keys) -> str:
    """Drop the current version from the history and make the one before it current."""
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(keys.switcher_history())
                versions = [v.decode() for v in pipe.lrange(keys.switcher_history(), 0, 1)]
                if len(versions) < 2:
                    raise NothingToRollBack("no earlier switcher version to roll back to (history: "
                                            f"{versions or 'empty'}); publish or promote one first")
                pipe.multi()
                pipe.lpop(keys.switcher_history())
                _set_current(pipe, keys, versions[1], "rollback")
                pipe.execute()
                break
            except redis.WatchError:
                continue
    log.info("switcher_rolled_back", from_version=versions[0], to_version=versions[1])
    return versions[1]


def load_published(client: redis.Redis, keys: Keys, version: str, edge_model_id: str | None = None,
                   questions: Sequence[str] | None = None) -> Switcher:
    """A published version as a ready Switcher; SwitcherMismatch for another edge model or questions."""
    stored = client.hgetall(keys.switcher_checkpoint(version))
    label = f"switcher {version} (redis)"
    if not stored:
        raise SwitcherError(f"{label}: not published")
    card = json.loads(stored[b"card"])
    check_identity(label, card, edge_model_id, questions)
    path = Path(stored.get(b"path", b"").decode() or f"redis:{version}")
    sw = Switcher(path, card, _weights_from_bytes(stored[b"weights"], label))
    if sw.version != version:
        raise SwitcherError(f"{label}: weights hash to {sw.version}")
    return sw


class SwitcherWatcher:
    """The edge worker's view of the published version: a new Switcher when it changes."""

    def __init__(self, client: redis.Redis, keys: Keys, edge_model_id: str, questions: Sequence[str],
                 every_s: float = 2.0, clock=time.monotonic):
        self.client, self.keys, self.every_s, self.clock = client, keys, every_s, clock
        self.edge_model_id, self.questions = edge_model_id, tuple(questions)
        self._last: float | None = None
        self.refused: set[str] = set()

    def poll(self, running: str | None) -> Switcher | None:
        """The switcher to swap in, or None (not due, unchanged, refused)."""
        now = self.clock()
        if self._last is not None and now - self._last < self.every_s:
            return None
        self._last = now
        wanted = current_version(self.client, self.keys)
        if wanted is None or wanted == running or wanted in self.refused:
            return None
        try:
            sw = load_published(self.client, self.keys, wanted, self.edge_model_id, self.questions)
        except SwitcherError as exc:
            self.refused.add(wanted)
            log.error("switcher_refused", version=wanted, running=running, error=str(exc))
            return None
        log.info("switcher_reloaded", from_version=running, to_version=wanted, threshold=sw.threshold)
        return sw


"""Switcher versions in Redis: edge workers hot-reload a promoted checkpoint between batches
under load (nothing lost or scored twice), refuse one for another edge model, and roll back."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

import numpy as np
import pytest

from edge_worker.model import EdgeModel
from edge_worker.worker import EdgeWorker
from fallwatch.schemas import EdgeVerdict, decode
from fallwatch.settings import EdgeSettings, Settings
from switcher.publish import NothingToRollBack, current_version, history, publish, rollback
from tests.faults import fallwatch
from tests.frames import push_frames
from tests.helpers import wait_for
from tests.live_helpers import make_checkpoint


@pytest.fixture(scope="module")
def tiny_edge() -> EdgeModel:
    return EdgeModel.load(EdgeSettings(model="tiny"))


@pytest.fixture(scope="module")
def dim(tiny_edge) -> int:
    return int(tiny_edge.score([np.zeros((32, 32, 3), dtype=np.uint8)]).features.shape[1])


def _fast(settings: Settings) -> Settings:
    return settings.model_copy(update={"dmd": settings.dmd.model_copy(update={"reload_check_s": 0.05}),
                                       "edge": settings.edge.model_copy(update={"batch_size": 4, "block_ms": 20})})


def edge_verdicts(r, keys) -> list[EdgeVerdict]:
    return [m for m in (decode(f)[0] for _, f in r.xrange(keys.verdicts_stream())) if isinstance(m, EdgeVerdict)]


def test_hot_reload_under_load_loses_nothing_and_scores_nothing_twice(settings, r, keys, tiny_edge, dim,
                                                                     tmp_path) -> None:
    settings = _fast(settings)
    v1 = publish(r, keys, make_checkpoint(tmp_path / "v1", tiny_edge.model_id, tiny_edge.questions, dim, 1))
    worker = EdgeWorker(settings, r, keys, tiny_edge, name="hot")
    stop, total = threading.Event(), 240
    pushed: list[str] = []

    def produce() -> None:
        for start in range(0, total, 8):
            pushed.extend(push_frames(r, keys, 8, start=start))
            time.sleep(0.02)

    threads = [threading.Thread(target=worker.run, args=(stop,)), threading.Thread(target=produce)]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: len(edge_verdicts(r, keys)) >= total // 3, 60)
        v2 = publish(r, keys, make_checkpoint(tmp_path / "v2", tiny_edge.model_id, tiny_edge.questions, dim, 2))
        assert wait_for(lambda: len(edge_verdicts(r, keys)) >= total, 90)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    got = edge_verdicts(r, keys)
    counts = Counter(v.frame_id for v in got)
    assert sorted(counts) == sorted(pushed) and set(counts.values()) == {1}  # none lost, none twice
    versions = [v.switcher_version for v in got]
    assert v1 != v2 and versions[0] == v1 and versions[-1] == v2
    switch = versions.index(v2)
    assert set(versions[:switch]) == {v1} and set(versions[switch:]) == {v2}  # one swap, between batches
    assert r.xpending(keys.frames_stream(), keys.edge_group())["pending"] == 0


def test_a_switcher_for_another_edge_model_is_refused(settings, r, keys, tiny_edge, dim, tmp_path) -> None:
    settings = _fast(settings)
    v1 = publish(r, keys, make_checkpoint(tmp_path / "v1", tiny_edge.model_id, tiny_edge.questions, dim, 1))
    worker = EdgeWorker(settings, r, keys, tiny_edge, name="w")
    worker.ensure_group()
    push_frames(r, keys, 4)
    worker.step(block_ms=0)
    publish(r, keys, make_checkpoint(tmp_path / "other", "another/edge-model", tiny_edge.questions, dim, 3))
    publish(r, keys, make_checkpoint(tmp_path / "q", tiny_edge.model_id, ["Is anyone here?"], dim, 4))
    time.sleep(0.06)  # let the worker's reload check come due
    push_frames(r, keys, 4, start=4)
    worker.step(block_ms=0)
    assert {v.switcher_version for v in edge_verdicts(r, keys)} == {v1}
    assert worker.switcher_version == v1 and len(worker.watcher.refused) == 1


def test_rollback_returns_the_edge_to_the_previous_version(settings, r, keys, tiny_edge, dim, tmp_path,
                                                          redis_url) -> None:
    settings = _fast(settings)
    v1 = publish(r, keys, make_checkpoint(tmp_path / "v1", tiny_edge.model_id, tiny_edge.questions, dim, 1))
    v2 = publish(r, keys, make_checkpoint(tmp_path / "v2", tiny_edge.model_id, tiny_edge.questions, dim, 2))
    assert history(r, keys) == [v2, v1] and current_version(r, keys) == v2
    worker = EdgeWorker(settings, r, keys, tiny_edge, name="w")
    worker.ensure_group()
    worker.step(block_ms=0)
    assert worker.switcher_version == v2
    env = {**os.environ, "FALLWATCH_REDIS__URL": redis_url, "PYTHONPATH": os.getcwd()}
    done = fallwatch("switcher", "rollback", env=env)
    assert done.returncode == 0, done.stderr
    assert current_version(r, keys) == v1 and history(r, keys) == [v1]
    time.sleep(0.06)
    push_frames(r, keys, 3)
    worker.step(block_ms=0)
    assert worker.switcher_version == v1
    assert {v.switcher_version for v in edge_verdicts(r, keys)} == {v1}
    with pytest.raises(NothingToRollBack):
        rollback(r, keys)
    again = fallwatch("switcher", "rollback", env=env)
    assert again.returncode == 2 and "roll back" in again.stderr and "Traceback" not in again.stderr

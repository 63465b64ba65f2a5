"""The live DMD store: records written by the cloud side for offloads and audits (edge features
exactly as computed, the right propensities, no pixels), bounded, and exported in the
`fallwatch distill` format that `switcher train` reads unchanged."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

from cloud_worker.worker import build_worker, run
from edge_worker.decode import decode_entry
from edge_worker.worker import EdgeWorker
from fallwatch import dmd_store
from fallwatch.schemas import DmdRecord
from fallwatch.settings import Settings
from switcher.live import read_live_lines
from switcher.live_cli import parse_since
from switcher.records import load_dmd
from tests.faults import fallwatch
from tests.frames import frame_entry, push_frames


def _switcher(settings: Settings, **update) -> Settings:
    return settings.model_copy(update={"switcher": settings.switcher.model_copy(update=update)})


def _drain(worker: EdgeWorker) -> None:
    while worker.step(block_ms=0).read:
        pass


def _fill_store(settings, r, keys, edge, cloud) -> tuple[list[str], list[str]]:
    """cam1 frames through an auditing edge, cam2 frames through an offload-everything edge, then the cloud."""
    audited = _switcher(settings, audit_fraction=0.5)
    push_frames(r, keys, 24, camera="cam1", gt_fall=True)
    a = EdgeWorker(audited, r, keys, edge, name="audit-edge")
    a.ensure_group()
    _drain(a)
    offloads = push_frames(r, keys, 6, camera="cam2", gt_fall=False)
    _drain(EdgeWorker(_switcher(settings, offload_all=True, audit_fraction=0.5), r, keys, edge, name="all-edge"))
    audits = [q["frame_id"] for j in a.live.queue.jobs for q in j.args[0]]
    assert 0 < len(audits) < 24
    assert run(build_worker(settings, r, keys, cloud, name="c1"), threading.Event(), burst=True) >= 2
    return audits, offloads


def test_offloads_and_audits_become_records_with_features_and_propensities(settings, r, keys, tiny_edge,
                                                                             tiny_cloud) -> None:
    audits, offloads = _fill_store(settings, r, keys, tiny_edge, tiny_cloud)
    stored = dmd_store.load_records(r, keys)
    by_id = {s.record.frame_id: s for s in stored}
    assert sorted(by_id) == sorted(audits + offloads) and len(stored) == len(by_id)
    for fid in audits:
        assert (by_id[fid].record.route, by_id[fid].record.inclusion) == ("audit", 0.5)
    for fid in offloads:
        assert (by_id[fid].record.route, by_id[fid].record.inclusion) == ("offload", 1.0)
    rec = by_id[offloads[0]].record
    assert rec.edge_model_id == tiny_edge.model_id and rec.questions == list(tiny_edge.questions)
    assert rec.feature_dim == tiny_edge.score([decode_entry("0-0", frame_entry("cam2", 0), 10**7, 10**8).image]).features.shape[1]
    # the features are the edge's own: score the same frame again and compare
    frame = decode_entry("0-0", frame_entry("cam2", 0), 10**7, 10**8)
    again = tiny_edge.score([frame.image])
    np.testing.assert_allclose(by_id["cam2:0"].features, again.features[0], rtol=1e-5, atol=1e-6)
    assert by_id["cam2:0"].record.edge_p_fall == pytest.approx(float(again.p_fall[0]), abs=1e-6)
    for s in stored:  # agreement is the edge and cloud answers compared
        assert s.record.agree == ((s.record.edge_p_fall >= 0.5) == (s.record.cloud_p_fall >= 0.5))
    # no pixels: every entry is the JSON record and the float32 features, nothing else
    for _, fields in r.xrange(keys.dmd_store()):
        assert set(fields) == {b"t", b"v", b"m", b"f"}
        assert len(fields[b"f"]) == 4 * rec.feature_dim
        assert set(json.loads(fields[b"m"])) == set(DmdRecord.model_fields)
    # the TTL keys are gone once the cloud has judged the items
    assert not r.keys(keys.edge_features("*")) and not r.keys(keys.pixels("*"))


def test_store_is_bounded_by_count_and_age(settings, r, keys) -> None:
    cfg = settings.dmd.model_copy(update={"store_maxlen": 100, "store_max_age_s": 3600})
    rec = DmdRecord(frame_id="c:1", camera_id="c", captured_at=time.time(), edge_p_fall=0.2, cloud_p_fall=0.9,
                    agree=False, route="audit", inclusion=0.02, edge_model_id="m", questions=["q"], feature_dim=4)
    raw = dmd_store.features_to_bytes(np.ones(4))
    for _ in range(5):
        pipe = r.pipeline(transaction=False)
        for _ in range(100):
            dmd_store.append(pipe, keys, cfg, rec, raw)
        pipe.execute()
    assert 100 <= dmd_store.size(r, keys) <= 200  # MAXLEN ~: trimmed in whole nodes
    pipe = r.pipeline(transaction=False)
    dmd_store.append(pipe, keys, cfg, rec, raw, now=time.time() + 3600 + 5)  # everything is now too old ...
    pipe.execute()
    assert dmd_store.size(r, keys) <= 1  # ... but the newest record


def test_export_round_trips_into_switcher_train(settings, r, keys, tiny_edge, tiny_cloud, redis_url, tmp_path) -> None:
    _fill_store(settings, r, keys, tiny_edge, tiny_cloud)
    stored = dmd_store.load_records(r, keys)
    env = {**os.environ, "FALLWATCH_REDIS__URL": redis_url, "PYTHONPATH": os.getcwd()}
    out = tmp_path / "live"
    done = fallwatch("dmd", "export", "--out", str(out), env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["items"] == len(stored)
    data = load_dmd(out)  # the reader of `fallwatch distill` directories
    assert [i.id for i in data.items] == [s.record.frame_id for s in stored]
    np.testing.assert_array_equal(data.features, np.stack([s.features for s in stored]))
    assert list(data.agree) == [s.record.agree for s in stored]
    assert [line["inclusion"] for line in read_live_lines(out)] == [s.record.inclusion for s in stored]
    trained = fallwatch("switcher", "train", "--train", str(out), "--val", str(out), "--out", str(tmp_path / "ckpt"),
                        "--epochs", "3", env=env)
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout.strip().splitlines()[-1])["train_items"] == len(stored)
    again = fallwatch("dmd", "export", "--out", str(out), env=env)
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr
    later = fallwatch("dmd", "export", "--out", str(tmp_path / "none"), "--since", "2999-01-01", env=env)
    assert later.returncode == 2 and "no records" in later.stderr
    bad = fallwatch("dmd", "export", "--out", str(tmp_path / "x"), "--since", "yesterday", env=env)
    assert bad.returncode == 2 and "--since" in bad.stderr and "Traceback" not in bad.stderr


def test_since_accepts_epoch_iso_and_ages() -> None:
    assert parse_since("36h", now=100_000.0) == 100_000.0 - 36 * 3600
    assert parse_since("1700000000") == 1_700_000_000.0
    assert parse_since("2026-01-01T00:00:00+00:00") == 1767225600.0
    with pytest.raises(ValueError):
        parse_since("soon")

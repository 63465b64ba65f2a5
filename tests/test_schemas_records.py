"""The outbox envelope, the Redis hashes and the stored alert state as versioned models."""

from __future__ import annotations

import pytest

from fallwatch.schemas import (
    AlertEvent, CameraAlertState, CameraInfo, CameraState, Delivery, EventKind, EventRecord, EventType, Observation,
    SchemaError, StatsCounts, Decider, decode, encode,
)

T = 1_700_000_000.0


def test_a_delivery_travels_as_a_versioned_message() -> None:
    note = Delivery(event_id="e1", channel="ch", camera_id="cam1", kind=EventKind.FALL, title="t", body="b")
    fields = encode(note)
    assert fields[b"t"] == b"delivery" and fields[b"v"] == b"1"
    assert decode(fields, expect=Delivery)[0] == note
    with pytest.raises(SchemaError, match="unsupported schema version 2"):
        decode({**fields, b"v": b"2"}, expect=Delivery)


def test_camera_info_round_trips_through_a_redis_hash(r, keys) -> None:
    key = keys.camera_info("cam1")
    r.hset(key, mapping=CameraInfo(state=CameraState.OFFLINE, reason="timeout", changed_at=T, name="Hall",
                                   sample_fps=None, fps=12.5).to_hash())
    r.hset(key, mapping=CameraInfo(last_frame_at=T + 1, last_frame_id="cam1:9").to_hash())  # the publisher's part
    info = CameraInfo.from_hash(r.hgetall(key))
    assert (info.state, info.reason, info.name, info.fps, info.sample_fps) == (CameraState.OFFLINE, "timeout", "Hall",
                                                                               12.5, None)
    assert (info.changed_at, info.last_frame_at, info.last_frame_id) == (T, T + 1, "cam1:9")
    assert r.hget(key, "v") == b"1"


def test_a_hash_record_only_writes_the_fields_it_was_given() -> None:
    assert CameraInfo(last_frame_at=T, last_frame_id="c:1").to_hash() == {
        "v": "1", "last_frame_at": repr(T), "last_frame_id": "c:1"}


def test_hash_records_check_the_version_and_values() -> None:
    assert CameraInfo.from_hash({b"state": b"online"}).state is CameraState.ONLINE  # written before versioning
    with pytest.raises(SchemaError, match="unsupported schema version '2' of CameraInfo"):
        CameraInfo.from_hash({b"v": b"2", b"state": b"online"})
    with pytest.raises(SchemaError, match="invalid CameraInfo: fps"):
        CameraInfo.from_hash({b"fps": b"fast"})


def test_event_record_keeps_the_event_and_its_lookup_fields() -> None:
    event = AlertEvent(type=EventType.UPDATE, kind=EventKind.FALL, camera_id="cam1", started_at=T, at=T + 2,
                       acknowledged=True, acknowledged_by="nurse")
    raw = {k.encode(): v.encode() for k, v in EventRecord.of(event, active=True).to_hash().items()}
    assert raw[b"active"] == b"1" and raw[b"acknowledged"] == b"1" and raw[b"type"] == b"update"
    record = EventRecord.from_hash(raw)
    assert record.event() == event and record.active and record.started_at == T


def test_stats_counts_read_counters_by_decider_and_latency_bucket() -> None:
    raw = {b"finals": b"5", b"offloaded": b"2", b"tp": b"1", b"by:edge": b"3", b"by:cloud": b"2",
           b"lat:40": b"4", b"lat:41": b"1", b"junk": b"x", b"scored": b"oops"}
    counts = StatsCounts.from_hash(raw)
    assert (counts.finals, counts.offloaded, counts.tp, counts.scored) == (5, 2, 1, 0)
    assert counts.by_decider == {"edge": 3, "cloud": 2} and counts.latency == {40: 4, 41: 1}


def test_camera_alert_state_is_versioned_and_reads_state_stored_before() -> None:
    obs = Observation(frame_id="c:1", at=T, fall=True, p=0.9, by=Decider.EDGE)
    state = CameraAlertState(history=(obs,), fall_event="e1", last_fall_at=T)
    assert CameraAlertState.model_validate_json(state.model_dump_json()) == state
    old = '{"history": [], "fall_event": null, "last_fall_at": 0.0, "cooldown_until": 0.0, "offline_event": null}'
    assert CameraAlertState.model_validate_json(old).v == 1
    with pytest.raises(ValueError):
        CameraAlertState.model_validate_json(old.replace("{", '{"v": 2, ', 1))

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from fallwatch.schemas import (
    AlertEvent, CameraState, CameraStatus, CloudVerdict, DeadLetter, Decider, EdgeVerdict, EventKind, EventType,
    FinalVerdict, FrameMessage, ItemKind, OffloadRequest, SchemaError, decode, encode,
)

T = 1_700_000_000.0


def samples():
    return [
        FrameMessage.make("cam1", 7, captured_at=T, width=640, height=480, gt_fall=True),
        EdgeVerdict(frame_id="cam1:7", camera_id="cam1", captured_at=T, p_fall=0.8, is_fall=True, agreement=0.9,
                    threshold=0.5, confident=True, edge_ms=40.0),
        OffloadRequest(frame_id="cam1:7", camera_id="cam1", captured_at=T, pixels_key="fw:pixels:cam1:7",
                       edge_p_fall=0.4, agreement=0.2, deadline=T + 30),
        CloudVerdict(frame_id="cam1:7", camera_id="cam1", captured_at=T, p_fall=0.9, is_fall=True, cloud_ms=900.0),
        FinalVerdict(frame_id="cam1:7", camera_id="cam1", captured_at=T, is_fall=True, p_fall=0.9,
                     decided_by=Decider.CLOUD, offloaded=True, latency_ms=1200.0),
        AlertEvent(type=EventType.START, kind=EventKind.FALL, camera_id="cam1", started_at=T, confidence=0.9),
        CameraStatus(camera_id="cam1", state=CameraState.OFFLINE, reason="read timeout"),
        DeadLetter(source="fw:stream:frames", entry_id="1-0", reason="bad_jpeg", error="cannot decode"),
    ]


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_round_trip(msg) -> None:
    images = [b"\xff\xd8jpeg"] if isinstance(msg, FrameMessage) else []
    fields = encode(msg, images)
    back, imgs = decode(fields)
    assert back == msg
    assert imgs == images
    # redis returns bytes keys; str keys decode the same way
    back2, _ = decode({k.decode(): v for k, v in fields.items()})
    assert back2 == msg


def test_clip_carries_binary_images_not_base64() -> None:
    msg = FrameMessage.make("c", 1, captured_at=T, width=8, height=8, kind=ItemKind.CLIP, n_images=3)
    images = [bytes([i]) * 100 for i in range(3)]
    fields = encode(msg, images)
    assert fields[b"p2"] == images[2]
    assert len(fields[b"m"]) < 300  # the JSON body holds no pixels
    assert decode(fields)[1] == images
    with pytest.raises(SchemaError, match="declares 3 images"):
        encode(msg, images[:2])
    del fields[b"p1"]
    with pytest.raises(SchemaError, match="missing image field"):
        decode(fields)


def test_messages_are_frozen_and_forbid_extras() -> None:
    msg = samples()[0]
    with pytest.raises(ValidationError):
        msg.camera_id = "other"
    with pytest.raises(ValidationError):
        FrameMessage.make("c", 1, captured_at=T, width=1, height=1, colour="red")


def test_wrong_version_type_and_shape_are_rejected() -> None:
    fields = encode(samples()[1])
    with pytest.raises(SchemaError, match="unsupported schema version 2"):
        decode({**fields, b"v": b"2"})
    with pytest.raises(SchemaError, match="unknown message type 'nope'"):
        decode({**fields, b"t": b"nope"})
    with pytest.raises(SchemaError, match="not a fallwatch message"):
        decode({b"garbage": b"x"})
    body = json.loads(fields[b"m"])
    body["p_fall"] = 1.5
    with pytest.raises(SchemaError, match="p_fall"):
        decode({**fields, b"m": json.dumps(body).encode()})
    with pytest.raises(SchemaError, match="invalid edge"):
        decode({**fields, b"m": b"{not json"})
    with pytest.raises(SchemaError, match="expected 'frame'"):
        decode(fields, expect=FrameMessage)
    body = json.loads(fields[b"m"])
    body["v"] = 2
    with pytest.raises(SchemaError):
        decode({**fields, b"m": json.dumps(body).encode()})


def test_event_lifecycle_is_a_string_enum() -> None:
    ev = samples()[5]
    assert json.loads(ev.to_json())["type"] == "start"
    assert EventType("end") is EventType.END

"""Versioned wire messages. Every message is a frozen pydantic model with ``extra="forbid"``.

On a stream, a message is one entry: field ``t`` (type), ``v`` (schema version), ``m`` (the
JSON body) and, for frames, binary fields ``p0``, ``p1``, ... with the encoded images. Pixels
never travel as base64 inside JSON. :func:`encode` and :func:`decode` are the only way in and
out; a wrong type, version or shape raises :class:`SchemaError` with the reason.
"""

from __future__ import annotations

import json
import time
import uuid
from enum import StrEnum
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fallwatch.keys import text

SCHEMA_VERSION = 1


class SchemaError(ValueError):
    """A message could not be decoded or validated."""


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    type_name: ClassVar[str] = ""
    v: Literal[1] = Field(SCHEMA_VERSION, description="Schema version.")

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "Message":
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise SchemaError(f"invalid {cls.type_name or cls.__name__}: {_summary(exc)}") from None


def _summary(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())


def now() -> float:
    return time.time()


def new_id() -> str:
    return uuid.uuid4().hex


class ItemKind(StrEnum):
    IMAGE = "image"
    CLIP = "clip"


class Decider(StrEnum):
    EDGE = "edge"
    CLOUD = "cloud"
    EDGE_TIMEOUT = "edge_timeout"
    EDGE_CLOUD_FAILED = "edge_cloud_failed"
    EDGE_BUDGET = "edge_budget"
    EDGE_SHED = "edge_shed"
    CLOUD_AUDIT = "cloud_audit"


class EventType(StrEnum):
    START = "start"
    UPDATE = "update"
    END = "end"


class EventKind(StrEnum):
    FALL = "fall"
    CAMERA_OFFLINE = "camera_offline"
    SWITCHER_DRIFT = "switcher_drift"


class EventOutcome(StrEnum):
    """What a person found when they resolved a fall event: the ground truth of an alert."""

    CONFIRMED_FALL = "confirmed_fall"
    FALSE_ALARM = "false_alarm"
    NOT_SURE = "not_sure"


class CameraState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class FrameMessage(Message):
    type_name: ClassVar[str] = "frame"
    frame_id: str = Field(..., min_length=1, max_length=200, description="Unique id: camera:seq.")
    camera_id: str = Field(..., min_length=1, max_length=64)
    seq: int = Field(..., ge=0)
    captured_at: float = Field(..., gt=0, description="Capture time, epoch seconds.")
    kind: ItemKind = ItemKind.IMAGE
    n_images: int = Field(1, ge=1, le=64, description="Binary image fields p0..p(n-1).")
    encoding: Literal["jpeg"] = "jpeg"
    width: int = Field(..., ge=1, le=16384)
    height: int = Field(..., ge=1, le=16384)
    gt_fall: bool | None = Field(None, description="Ground truth, for replays.")
    source: str = Field("", max_length=500, description="Where it came from (file name, no credentials).")

    @classmethod
    def make(cls, camera_id: str, seq: int, **kw: Any) -> "FrameMessage":
        return cls(frame_id=f"{camera_id}:{seq}", camera_id=camera_id, seq=seq, **kw)


class EdgeVerdict(Message):
    type_name: ClassVar[str] = "edge"
    frame_id: str = Field(..., min_length=1, max_length=200)
    camera_id: str = Field(..., min_length=1, max_length=64)
    captured_at: float = Field(..., gt=0)
    p_fall: float = Field(..., ge=0, le=1)
    is_fall: bool
    agreement: float | None = Field(None, ge=0, le=1, description="Switcher probability; None without switcher.")
    threshold: float | None = Field(None, ge=0, le=1)
    confident: bool = Field(..., description="True: final. False: offloaded to the cloud.")
    edge_ms: float = Field(..., ge=0)
    decided_at: float = Field(default_factory=now)
    gt_fall: bool | None = None
    worker: str = ""
    switcher_version: str | None = Field(None, max_length=64, description="Switcher checkpoint that decided.")
    decided_by: Decider | None = Field(None, description="Set on a confident verdict the switcher wanted to offload "
                                       "but the budget (edge_budget) or backpressure (edge_shed) kept on the edge.")


class OffloadRequest(Message):
    type_name: ClassVar[str] = "offload"
    frame_id: str = Field(..., min_length=1, max_length=200)
    camera_id: str = Field(..., min_length=1, max_length=64)
    captured_at: float = Field(..., gt=0)
    kind: ItemKind = ItemKind.IMAGE
    n_images: int = Field(1, ge=1, le=64)
    pixels_key: str = Field(..., min_length=1)
    edge_p_fall: float = Field(..., ge=0, le=1)
    agreement: float | None = Field(None, ge=0, le=1)
    deadline: float = Field(..., gt=0, description="After this the alerts service uses the edge verdict.")
    gt_fall: bool | None = None
    route: Literal["offload", "audit"] = Field("offload", description="audit: the edge verdict is final, "
                                               "the cloud only checks it (live DMD).")
    features_key: str | None = Field(None, description="TTL key with the edge features (live DMD store).")
    inclusion: float = Field(1.0, gt=0, le=1, description="Probability that this route sent the item to the cloud.")
    switcher_version: str | None = Field(None, max_length=64, description="Switcher version that routed the item.")
    rank: int = Field(0, ge=0, le=15, description="Offload priority (0 first): the queue it was sent to.")
    budget_cost_s: float = Field(0.0, ge=0, description="GPU seconds the edge debited from a hard budget for it; "
                                 "the cloud worker settles the difference with the measured time.")


class CloudVerdict(Message):
    type_name: ClassVar[str] = "cloud"
    frame_id: str = Field(..., min_length=1, max_length=200)
    camera_id: str = Field(..., min_length=1, max_length=64)
    captured_at: float = Field(..., gt=0)
    ok: bool = Field(True, description="False: the job failed; alerts fall back to the edge verdict.")
    p_fall: float | None = Field(None, ge=0, le=1)
    is_fall: bool | None = None
    cloud_ms: float = Field(0.0, ge=0)
    energy_j: float | None = Field(None, ge=0, description="NVML energy; None where not measured.")
    error: str | None = Field(None, max_length=2000)
    description: str | None = Field(None, max_length=2000)
    decided_at: float = Field(default_factory=now)
    worker: str = ""
    route: Literal["offload", "audit"] = Field("offload", description="audit: a check of a final edge verdict.")
    edge_p_fall: float | None = Field(None, ge=0, le=1, description="The edge's fall probability (audits).")
    switcher_version: str | None = Field(None, max_length=64, description="Switcher version that routed the item.")


class FinalVerdict(Message):
    type_name: ClassVar[str] = "final"
    frame_id: str = Field(..., min_length=1, max_length=200)
    camera_id: str = Field(..., min_length=1, max_length=64)
    captured_at: float = Field(..., gt=0)
    is_fall: bool
    p_fall: float = Field(..., ge=0, le=1)
    decided_by: Decider
    offloaded: bool = False
    latency_ms: float = Field(..., ge=0, description="Capture to final verdict.")
    decided_at: float = Field(default_factory=now)
    gt_fall: bool | None = None
    description: str | None = Field(None, max_length=2000, description="The cloud model's words (cloud.describe).")


class AlertEvent(Message):
    type_name: ClassVar[str] = "alert"
    event_id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    type: EventType
    kind: EventKind
    camera_id: str = Field(..., min_length=1, max_length=64)
    camera_name: str = ""
    started_at: float = Field(..., gt=0)
    at: float = Field(default_factory=now, description="Time of this lifecycle step.")
    confidence: float | None = Field(None, ge=0, le=1)
    decided_by: Decider | None = None
    frame_ids: list[str] = Field(default_factory=list, max_length=1000)
    acknowledged: bool = False
    acknowledged_by: str | None = None
    description: str | None = None
    ack_source: str | None = Field(None, max_length=16, description="Where the ack came from: cli, web, mqtt.")
    acknowledged_at: float | None = None
    outcome: EventOutcome | None = Field(None, description="Set when a person resolved the event.")
    outcome_note: str | None = Field(None, max_length=2000)
    resolved_by: str | None = None
    resolved_at: float | None = None
    still_seen: bool | None = Field(None, description="Fall events: do the models still see the fall?")
    seen_until: float | None = Field(None, description="Capture time of the last fall seen, once no longer seen.")
    escalation_tier: int = Field(0, ge=0, description="Fall events: the last tier notified (1 = at once).")
    escalation_tiers: int = Field(0, ge=0, description="How many tiers the camera has.")
    escalation_name: str | None = Field(None, description="Name of the last tier notified.")
    next_escalation_at: float | None = Field(None, description="When the next tier is due unless acknowledged.")


class CameraStatus(Message):
    type_name: ClassVar[str] = "camera_status"
    camera_id: str = Field(..., min_length=1, max_length=64)
    state: CameraState
    reason: str = Field("", max_length=1000)
    expected: bool = Field(False, description="A planned stop (finished replay, shutdown): no alert.")
    at: float = Field(default_factory=now)
    fps: float | None = Field(None, ge=0)


class DeadLetter(Message):
    type_name: ClassVar[str] = "dead_letter"
    source: str = Field(..., description="Stream or queue the input came from.")
    entry_id: str = Field("", description="Stream entry id or job id.")
    reason: str = Field(..., min_length=1, max_length=200, description="Short machine-readable reason.")
    error: str = Field("", max_length=4000)
    at: float = Field(default_factory=now)
    worker: str = ""


MESSAGE_TYPES: dict[str, type[Message]] = {
    m.type_name: m
    for m in (FrameMessage, EdgeVerdict, OffloadRequest, CloudVerdict, FinalVerdict, AlertEvent, CameraStatus, DeadLetter)
}


class OutcomeRecord(Message):
    """A resolved fall event as ground truth: its outcome stored against the event's frame ids."""

    type_name: ClassVar[str] = "outcome"
    event_id: str = Field(..., min_length=1, max_length=64)
    camera_id: str = Field(..., min_length=1, max_length=64)
    started_at: float = Field(..., gt=0)
    frame_ids: list[str] = Field(default_factory=list, max_length=1000)
    outcome: EventOutcome
    note: str = Field("", max_length=2000)
    by: str = Field(..., min_length=1, max_length=64)
    source: str = Field("cli", max_length=16)
    at: float = Field(default_factory=now)
    confidence: float | None = Field(None, ge=0, le=1)
    decided_by: Decider | None = None


MESSAGE_TYPES[OutcomeRecord.type_name] = OutcomeRecord
class DmdRecord(Message):
    """One live DMD label: an item both models judged. Its features travel beside it (field ``f``,
    float32 bytes); there are no pixels, ever."""

    type_name: ClassVar[str] = "dmd"
    frame_id: str = Field(..., min_length=1, max_length=200)
    camera_id: str = Field(..., min_length=1, max_length=64)
    captured_at: float = Field(..., gt=0)
    edge_p_fall: float = Field(..., ge=0, le=1)
    cloud_p_fall: float = Field(..., ge=0, le=1)
    agree: bool = Field(..., description="Edge and cloud give the same fall / no-fall answer.")
    route: Literal["offload", "audit"]
    inclusion: float = Field(..., gt=0, le=1, description="Probability that the route sent the item to the cloud.")
    edge_model_id: str = Field(..., min_length=1, max_length=500)
    questions: list[str] = Field(..., min_length=1, max_length=8)
    feature_dim: int = Field(..., ge=1, le=65536)
    switcher_version: str | None = Field(None, max_length=64)
    gt_fall: bool | None = None
    recorded_at: float = Field(default_factory=now)
    kind: ItemKind = ItemKind.IMAGE
    cloud_model_id: str = Field("", max_length=500)


MESSAGE_TYPES[DmdRecord.type_name] = DmdRecord


def _pixel_field(i: int) -> bytes:
    return b"p%d" % i


def encode(msg: Message, images: list[bytes] | tuple[bytes, ...] = ()) -> dict[bytes, bytes]:
    """Stream-entry fields of a message plus its encoded images."""
    if isinstance(msg, FrameMessage) and len(images) != msg.n_images:
        raise SchemaError(f"frame {msg.frame_id} declares {msg.n_images} images, got {len(images)}")
    fields = {b"t": msg.type_name.encode(), b"v": str(msg.v).encode(), b"m": msg.to_json()}
    for i, img in enumerate(images):
        fields[_pixel_field(i)] = bytes(img)
    return fields


def decode(fields: dict[Any, Any], expect: type[Message] | None = None) -> tuple[Message, list[bytes]]:
    """Parse stream-entry fields back into (message, images). Raises SchemaError."""
    f = {(k.encode() if isinstance(k, str) else k): v for k, v in fields.items()}
    try:
        type_name = f[b"t"].decode() if isinstance(f[b"t"], bytes) else str(f[b"t"])
        version = int(f[b"v"])
        body = f[b"m"]
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise SchemaError(f"not a fallwatch message: missing or bad field {exc}") from None
    cls = MESSAGE_TYPES.get(type_name)
    if cls is None:
        raise SchemaError(f"unknown message type {type_name!r}")
    if expect is not None and cls is not expect:
        raise SchemaError(f"expected {expect.type_name!r}, got {type_name!r}")
    if version != SCHEMA_VERSION:
        raise SchemaError(f"unsupported schema version {version} of {type_name!r} (this build speaks {SCHEMA_VERSION})")
    msg = cls.from_json(body)
    images: list[bytes] = []
    if isinstance(msg, FrameMessage):
        try:
            images = [f[_pixel_field(i)] for i in range(msg.n_images)]
        except KeyError as exc:
            raise SchemaError(f"frame {msg.frame_id} is missing image field {exc}") from None
    return msg, images


def to_dict(msg: Message) -> dict[str, Any]:
    """JSON-safe dict (for RQ job arguments and pub/sub)."""
    return json.loads(msg.to_json())


# --- the outbox, Redis hashes and stored state, versioned like the messages ---------------------
# The alerts channel's pub/sub payload is an AlertEvent's JSON (``to_json``): its ``v`` is the version.


class Delivery(Message):
    """One notification owed on one channel (an entry of the notify outbox stream)."""

    type_name: ClassVar[str] = "delivery"
    event_id: str = Field(..., min_length=1)
    channel: str = Field(..., min_length=1)
    camera_id: str = Field(..., min_length=1)
    kind: EventKind
    title: str
    body: str
    frame_id: str | None = None
    created_at: float = Field(default_factory=now)
    tier: int = Field(0, ge=0, description="Escalation tier of a fall notification (0: not a fall).")
    step: str = Field("start", pattern=r"^(start|end)$", description="end: a camera back online")

    @property
    def marker_id(self) -> str:
        """What the ``delivered`` marker is named after: each tier of an event, and a camera's return
        online, is delivered once."""
        if self.step != "start":
            return f"{self.event_id}:{self.step}"
        return self.event_id if self.tier <= 1 else f"{self.event_id}:tier{self.tier}"

    @property
    def idempotency_key(self) -> str:
        """The same for every attempt of this notification on this channel (event id, tier or step,
        channel): webhook receivers drop a repeat by it."""
        return f"{self.marker_id}:{self.channel}"


MESSAGE_TYPES[Delivery.type_name] = Delivery


class HashRecord(BaseModel):
    """A Redis hash as a versioned model: one hash field per model field, values as text, ``v`` the
    schema version. A writer may write some fields only (HSET merges them), so a field this model
    does not name is left alone when read. A hash written before versioning (no ``v``) reads as
    version 1; an empty value reads as unset."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    v: Literal[1] = Field(SCHEMA_VERSION, description="Schema version.")

    def to_hash(self) -> dict[str, str]:
        """``v`` and the fields given to this record, as hash values."""
        data = self.model_dump(mode="json", include={"v", *self.model_fields_set})
        return {k: _hash_value(v) for k, v in data.items()}

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> Self:
        """Parse HGETALL's reply. Raises SchemaError for another version or a bad value."""
        fields = {text(k): text(v) for k, v in raw.items()}
        version = fields.pop("v", str(SCHEMA_VERSION))
        if version != str(SCHEMA_VERSION):
            raise SchemaError(f"unsupported schema version {version!r} of {cls.__name__} (this build speaks {SCHEMA_VERSION})")
        try:
            return cls.model_validate({k: v for k, v in fields.items() if v != ""})
        except ValidationError as exc:
            raise SchemaError(f"invalid {cls.__name__}: {_summary(exc)}") from None


def _hash_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return repr(value) if isinstance(value, float) else str(value)


class CameraInfo(HashRecord):
    """``keys.camera_info``: a camera's last status (written by ingest's status reporter) and its
    last frame (written by its publisher)."""

    state: CameraState | None = None
    reason: str = Field("", max_length=1000)
    changed_at: float | None = None
    name: str = ""
    source: str = ""
    sample_fps: float | None = Field(None, ge=0)
    fps: float | None = Field(None, ge=0, description="Input fps; an offline camera keeps its last one.")
    last_frame_at: float | None = None
    last_frame_id: str | None = None


class EventRecord(HashRecord):
    """``keys.event``: an alert event's latest AlertEvent (``m``, JSON) and the fields it is found by."""

    m: str = Field(..., min_length=2, description="The latest AlertEvent of the event, as JSON.")
    type: EventType
    kind: EventKind
    camera_id: str
    started_at: float
    at: float
    acknowledged: bool = False
    acknowledged_by: str = ""
    active: bool = Field(..., description="False once the event has ended.")
    outcome: str = Field("", description="What a person found when they resolved it; empty until then.")

    @classmethod
    def of(cls, event: AlertEvent, active: bool) -> "EventRecord":
        return cls(m=event.to_json().decode(), type=event.type, kind=event.kind, camera_id=event.camera_id,
                   started_at=event.started_at, at=event.at, acknowledged=event.acknowledged,
                   acknowledged_by=event.acknowledged_by or "", active=active,
                   outcome=event.outcome.value if event.outcome else "")

    def event(self) -> AlertEvent:
        return AlertEvent.from_json(self.m)


class StatsCounts(BaseModel):
    """``keys.stats``: counters HINCRBY'd once per final verdict: ``finals``, ``scored`` (with ground
    truth), the confusion counts, ``offloaded``, ``by:<decider>`` and ``lat:<bucket>`` (latency
    histogram). The hash holds counters only, so a ``v`` field is written by nobody and read as 1."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    BY_PREFIX: ClassVar[str] = "by:"
    LAT_PREFIX: ClassVar[str] = "lat:"
    v: Literal[1] = Field(SCHEMA_VERSION, description="Schema version.")
    finals: int = 0
    scored: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    offloaded: int = 0
    by_decider: dict[str, int] = Field(default_factory=dict)
    latency: dict[int, int] = Field(default_factory=dict, description="Histogram bucket -> frames.")

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> "StatsCounts":
        """Parse HGETALL's reply; an unreadable counter counts 0, an unknown name is left out."""
        counts = {text(k): _count(v) for k, v in raw.items()}
        plain = {k: n for k, n in counts.items() if k in cls.model_fields and k not in ("v", "by_decider", "latency")}
        by = {k[len(cls.BY_PREFIX):]: n for k, n in counts.items() if k.startswith(cls.BY_PREFIX)}
        lat = {int(k[len(cls.LAT_PREFIX):]): n for k, n in counts.items()
               if k.startswith(cls.LAT_PREFIX) and k[len(cls.LAT_PREFIX):].isdigit()}
        return cls(**plain, by_decider=by, latency=lat)


def _count(value: Any) -> int:
    try:
        return int(float(text(value)))
    except ValueError:
        return 0


class Observation(BaseModel):
    """One final verdict as the alert state machine remembers it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    frame_id: str
    at: float
    fall: bool
    p: float
    by: Decider

    @classmethod
    def of(cls, v: FinalVerdict) -> "Observation":
        return cls(frame_id=v.frame_id, at=v.captured_at, fall=v.is_fall, p=v.p_fall, by=v.decided_by)

    @property
    def order(self) -> tuple[float, str]:
        return (self.at, self.frame_id)


class CameraAlertState(BaseModel):
    """Everything the alert state machine keeps for one camera (JSON in ``keys.camera_state``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    v: Literal[1] = Field(SCHEMA_VERSION, description="Schema version (state stored before it reads as 1).")
    history: tuple[Observation, ...] = ()
    fall_event: str | None = None
    last_fall_at: float = 0.0
    cooldown_until: float = 0.0
    offline_event: str | None = None
    fall_unseen: bool = False
    offline_since: float | None = None  # offline, within the grace period: no event yet
    offline_reason: str = ""

    @property
    def active(self) -> bool:
        return self.fall_event is not None or self.offline_event is not None or self.offline_since is not None

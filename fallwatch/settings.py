"""All fallwatch configuration: one pydantic-settings root with nested sections.

Precedence, highest first: environment (``FALLWATCH_``, ``__`` between nested names),
secret files (``FALLWATCH_SECRETS_DIR``), one optional YAML file, then the defaults here.
Nothing here reads the environment at import time: the CLI calls :func:`load_settings`
once and passes the result down.

Secrets are ``SecretStr`` fields. A YAML file may not hold them literally: it names an
environment variable instead (``password: ${REDIS_PASSWORD}``), so a config file can be
committed or shared without leaking credentials.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "FALLWATCH_"
CONFIG_ENV = "FALLWATCH_CONFIG"
SECRETS_DIR_ENV = "FALLWATCH_SECRETS_DIR"


class ConfigError(ValueError):
    """A configuration file or value is wrong. ``errors`` holds (field path, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]], source: str = "settings"):
        self.errors = errors
        self.source = source
        lines = "\n".join(f"  {path}: {msg}" for path, msg in errors)
        super().__init__(f"invalid configuration ({source}):\n{lines}")


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, defaults are validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class SentinelSettings(Section):
    """Redis Sentinel: the roles ask the sentinels where the primary is and follow it on failover."""

    addresses: list[str] = Field(
        ..., min_length=1, max_length=16,
        description="Sentinels as host:port (three or more on separate machines for a real quorum).")
    master_name: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$",
                             description="The monitored primary's name (sentinel.conf `sentinel monitor NAME`).")
    db: int = Field(0, ge=0, le=15, description="Database number on the primary.")
    tls: bool = Field(False, description="TLS to the sentinels and the primary (redis.ssl_* files apply to both).")
    username: str | None = Field(None, description="ACL user of the sentinels themselves (redis.username is "
                                                   "the primary's).")
    password: SecretStr | None = Field(None, description="Password of the sentinels themselves. Secret.")

    @field_validator("addresses")
    @classmethod
    def _host_ports(cls, value: list[str]) -> list[str]:
        for address in value:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{address!r} is not host:port (port 1-65535)")
        return value

    def pairs(self) -> list[tuple[str, int]]:
        return [(a.rpartition(":")[0], int(a.rpartition(":")[2])) for a in self.addresses]


class RedisSettings(Section):
    url: SecretStr | None = Field(
        None,
        description="redis://, rediss:// (TLS) or unix:// URL. Empty: start an embedded redis-server.",
    )
    username: str | None = Field(None, description="ACL user name (overrides the URL's).")
    password: SecretStr | None = Field(None, description="Password (overrides the URL's). Secret.")
    ssl_ca_certs: Path | None = Field(None, description="CA bundle for rediss:// servers.")
    ssl_certfile: Path | None = Field(None, description="Client certificate for mutual TLS.")
    ssl_keyfile: Path | None = Field(None, description="Client key for mutual TLS.")
    key_prefix: str = Field(
        "fallwatch", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
        description="Prefix of every stream, key and channel name.",
    )
    data_dir: Path = Field(
        Path(".fallwatch/redis"), description="Embedded Redis: directory for the socket and AOF files."
    )
    embedded_appendonly: bool = Field(True, description="Embedded Redis: AOF persistence (fsync everysec).")
    socket_timeout_s: float = Field(5.0, gt=0, le=120, description="Socket read/write timeout.")
    connect_timeout_s: float = Field(5.0, gt=0, le=120, description="Connection timeout.")
    retry_base_s: float = Field(0.05, gt=0, le=10, description="First reconnect backoff.")
    retry_cap_s: float = Field(5.0, gt=0, le=300, description="Largest reconnect backoff.")
    retry_attempts: int = Field(8, ge=0, le=1000, description="Reconnect attempts per command.")
    min_server_version: str = Field("6.2.0", pattern=r"^\d+\.\d+(\.\d+)?$",
                                    description="Oldest Redis server accepted (XAUTOCLAIM needs 6.2).")
    sentinel: SentinelSettings | None = Field(
        None, description="Connect through Redis Sentinel instead of redis.url (every role and the RQ queue).")
    wait_replicas: int = Field(
        -1, ge=-1, le=5,
        description="Writes that must survive a failover (alert events, the notification outbox, "
                    "acknowledgements) WAIT for this many replicas: -1 = 1 when the primary has a replica "
                    "(INFO replication, checked every 10 s), 0 = never.")
    wait_timeout_ms: int = Field(1000, ge=1, le=60_000,
                                 description="Longest WAIT for a replica; past it the write's caller fails once "
                                             "and retries (the write itself stands on the primary).")

    @model_validator(mode="after")
    def _one_server(self) -> "RedisSettings":
        if self.url is not None and self.sentinel is not None:
            raise ValueError("set redis.url or redis.sentinel, not both")
        return self


class ClipSettings(Section):
    enabled: bool = Field(False, description="Send clips of frames instead of single frames.")
    frames: int = Field(8, ge=2, le=64, description="Frames per clip.")
    stride: int = Field(1, ge=1, le=30, description="Take every s-th sampled frame into the clip.")


class IngestSettings(Section):
    fps: float = Field(2.0, gt=0, le=60, description="Target sampled frames per second per camera.")
    jpeg_quality: int = Field(85, ge=10, le=100, description="JPEG quality of frames put on the stream.")
    max_width: int = Field(1280, ge=64, le=8192, description="Frames wider than this are downscaled.")
    stream_maxlen: int = Field(
        2000, ge=10, le=10_000_000,
        description="Approximate MAXLEN of the frames stream; oldest frames are dropped beyond it.",
    )
    write_batch: int = Field(
        16, ge=1, le=256,
        description="Most frames one pipelined round trip writes when a camera's publisher is behind "
                    "(a frame with nothing queued behind it is written at once).",
    )
    motion_gating: bool = Field(False, description="Skip frames without motion.")
    motion_threshold: float = Field(0.01, ge=0, le=1, description="Fraction of changed pixels that is motion.")
    keepalive_s: float = Field(10.0, gt=0, le=3600, description="With gating: send a frame at least this often.")
    open_timeout_s: float = Field(10.0, gt=0, le=300, description="Timeout to open a stream.")
    read_timeout_s: float = Field(5.0, gt=0, le=300, description="No frame for this long: camera offline.")
    reconnect_base_s: float = Field(0.5, gt=0, le=60, description="First reconnect backoff.")
    reconnect_cap_s: float = Field(30.0, gt=0, le=3600, description="Largest reconnect backoff.")
    pixels_ttl_s: int = Field(600, ge=10, le=86400, description="TTL of pixels kept for offload.")
    clip: ClipSettings = Field(default_factory=ClipSettings, description="Clip mode defaults.")


class MaskSettings(Section):
    """A polygon of one camera's picture, in normalised coordinates (0..1 of width and height)."""

    kind: Literal["ignore", "privacy"] = Field(
        ..., description="ignore: filled before any model sees the frame (a bed, a sofa); "
        "privacy: filled before the frame is encoded, so its pixels never leave the camera process.")
    points: list[tuple[float, float]] = Field(..., min_length=3, max_length=64,
                                               description="Polygon corners [x, y], each within [0, 1].")
    name: str = Field("", max_length=100, description="What the region is, e.g. 'bed'.")

    @field_validator("points")
    @classmethod
    def _inside_and_not_degenerate(cls, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        bad = [p for p in points if not (0.0 <= p[0] <= 1.0 and 0.0 <= p[1] <= 1.0)]
        if bad:
            raise ValueError(f"points must lie within the frame, [0, 1] x [0, 1]; outside: {bad[:3]}")
        if polygon_area(points) <= 1e-9:
            raise ValueError("polygon has no area (points repeated or on one line)")
        return points


def polygon_area(points: list[tuple[float, float]]) -> float:
    """Area of a simple polygon (shoelace formula), in units of the frame's area."""
    n = len(points)
    twice = sum(points[i][0] * points[(i + 1) % n][1] - points[(i + 1) % n][0] * points[i][1] for i in range(n))
    return abs(twice) / 2


class EscalationTier(Section):
    """Who is notified of a fall nobody has acknowledged, and when."""

    name: str = Field(..., min_length=1, max_length=100, description="Who this tier is, e.g. 'shift lead'.")
    after_s: float = Field(..., ge=0, le=86400, description="Seconds after the fall began; the first tier must be 0.")
    urls: list[SecretStr] = Field(default_factory=list, description="apprise URLs of this tier. Secret.")


def check_tiers(tiers: list[EscalationTier] | None) -> list[EscalationTier] | None:
    """Tiers in strictly increasing ``after_s``, the first notified at once."""
    if not tiers:
        return tiers
    if tiers[0].after_s != 0:
        raise ValueError("the first escalation tier is notified at once: give it after_s: 0")
    times = [t.after_s for t in tiers]
    if any(b <= a for a, b in zip(times, times[1:])):
        raise ValueError(f"escalation tiers need strictly increasing after_s, got {times}")
    return tiers


class CameraSettings(Section):
    id: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="Camera id.")
    name: str = Field("", max_length=200, description="Human name, e.g. 'Room 12'. Defaults to the id.")
    url: SecretStr = Field(..., description="rtsp://, rtmp://, http(s)://, file path, or webcam:N. Secret.")
    enabled: bool = Field(True, description="Ingest this camera.")
    fps: float | None = Field(None, gt=0, le=60, description="Override of ingest.fps.")
    jpeg_quality: int | None = Field(None, ge=10, le=100, description="Override of ingest.jpeg_quality.")
    motion_gating: bool | None = Field(None, description="Override of ingest.motion_gating.")
    clip: ClipSettings | None = Field(None, description="Override of ingest.clip.")
    agreement_threshold: float | None = Field(None, ge=0, le=1, description="Override of switcher threshold.")
    notify: list[SecretStr] = Field(default_factory=list, description="Extra apprise URLs for this camera.")
    masks: list[MaskSettings] = Field(default_factory=list, max_length=32,
                                      description="Ignore and privacy polygons, applied in ingest before encoding.")
    escalation: list[EscalationTier] | None = Field(None, max_length=10,
                                                    description="Override of alerts.escalation for this camera.")

    @field_validator("escalation")
    @classmethod
    def _tiers(cls, tiers: list[EscalationTier] | None) -> list[EscalationTier] | None:
        return check_tiers(tiers)

    @property
    def display_name(self) -> str:
        return self.name or self.id


class EdgeSettings(Section):
    model: str = Field("dandelin/vilt-b32-finetuned-vqa", min_length=1,
                       description="ViLT VQA model id, local path, or 'tiny'.")
    questions: list[str] = Field(["Is the person falling?"], min_length=1, max_length=8,
                                 description="VQA questions; p_fall is averaged over them.")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?|mps)$", description="Torch device.")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="Weights dtype.")
    int8: bool = Field(False, description="CPU int8 dynamic quantisation of Linear layers.")
    threads: int = Field(0, ge=0, le=256, description="torch threads; 0 = torch default.")
    batch_size: int = Field(8, ge=1, le=256, description="Frames per XREADGROUP / model batch.")
    block_ms: int = Field(200, ge=1, le=60_000, description="XREADGROUP BLOCK in ms.")
    claim_idle_ms: int = Field(30_000, ge=100, le=3_600_000, description="Claim pending entries idle this long.")
    max_image_bytes: int = Field(8_000_000, ge=1000, le=200_000_000, description="Largest JPEG accepted.")
    max_image_pixels: int = Field(40_000_000, ge=10_000, le=500_000_000, description="Largest decoded image.")


class SwitcherSettings(Section):
    checkpoint: Path | None = Field(None, description="Trained switcher checkpoint. None: never offload.")
    threshold: float | None = Field(None, ge=0, le=1,
                                    description="Agreement threshold; None: the checkpoint's calibrated one.")
    offload_all: bool = Field(False, description="Offload every item (large-model-only mode).")
    audit_fraction: float = Field(0.02, ge=0, le=1, description="Share of edge-decided items also sent to the "
                                  "cloud as audits (live DMD labels, drift); 0 turns audits off.")
    audit_seed: str = Field("site", min_length=1, max_length=200, description="Site seed of the audit choice: "
                            "a hash of frame id and seed, so a replay audits the same frames.")


class BudgetSettings(Section):
    """The site's cloud budget at run time (``cloud.budget``), shared by every edge worker of the site."""

    mode: Literal["fixed", "target_rate", "hard"] = Field(
        "fixed", description="fixed: the configured or calibrated threshold. target_rate: the threshold follows a "
        "running quantile of recent agreement scores to hold target_rate. hard: at most hard_per_hour offloads "
        "or GPU-seconds per hour, shared through Redis.")
    target_rate: float | None = Field(
        None, gt=0, lt=1, description="target_rate mode: offload fraction; None: the checkpoint's calibrated one.")
    window_items: int = Field(300, ge=10, le=1_000_000,
                              description="target_rate: agreement scores kept for the quantile.")
    window_s: float = Field(600.0, gt=0, le=86400, description="target_rate: scores older than this leave the window.")
    min_items: int = Field(50, ge=1, le=1_000_000,
                           description="target_rate: below this many scores, the fixed threshold.")
    threshold_min: float = Field(0.0, ge=0, le=1, description="target_rate: lowest threshold it may choose.")
    threshold_max: float = Field(1.0, ge=0, le=1, description="target_rate: highest threshold it may choose.")
    hard_unit: Literal["offloads", "gpu_s"] = Field(
        "gpu_s", description="hard: what hard_per_hour counts: offloaded items, or GPU seconds measured by the cloud.")
    hard_per_hour: float = Field(3600.0, gt=0, le=1e9,
                                 description="hard: offloads or GPU-seconds per hour for the site.")
    burst_s: float = Field(30.0, gt=0, le=86400,
                           description="hard: bucket size, in seconds of refill (the most spent at once after a lull).")
    reserve: float = Field(0.25, ge=0, lt=1, description="hard: share of the bucket only rank-0 items (edge says no "
                           "fall) may spend, so a missed fall outranks a false alarm within a window.")
    fallback_share: float | None = Field(None, gt=0, le=1, description="hard: share of the budget a worker that cannot "
                                         "reach Redis may spend on its own; None: 1 / live edge workers.")
    default_service_s: float = Field(1.0, gt=0, le=600,
                                     description="GPU seconds per item assumed before any cloud worker has reported.")
    backpressure: bool = Field(True, description="Keep on the edge (edge_shed) an item the cloud would answer only "
                               "after alerts.cloud_timeout_s, from the cloud's measured service time and queue depth.")
    service_ttl_s: float = Field(300.0, gt=0, le=86400,
                                 description="A cloud worker's service-time report older than this is ignored.")

    @model_validator(mode="after")
    def _bounds(self) -> "BudgetSettings":
        if self.threshold_min > self.threshold_max:
            raise ValueError("threshold_min must not exceed threshold_max")
        return self


class CloudSettings(Section):
    model: str = Field("llava-hf/LLaVA-NeXT-Video-7B-hf", min_length=1,
                       description="LLaVA-NeXT-Video model id, local path, or 'tiny'.")
    question: str = Field("Is the person falling? Answer yes or no.", min_length=1,
                          description="Prompt asked of the cloud model.")
    device: str = Field("cuda", pattern=r"^(cpu|cuda(:\d+)?|mps|auto)$", description="Torch device.")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="Weights dtype.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="Attention kernel.")
    quantization: Literal["none", "4bit", "8bit"] = Field("none", description="bitsandbytes load, if installed.")
    num_frames: int = Field(8, ge=1, le=64, description="Frames sampled uniformly from a clip.")
    batch_size: int = Field(8, ge=1, le=64, description="Offloads scored in one forward pass.")
    batch_wait_ms: int = Field(50, ge=0, le=10_000, description="Wait this long to fill a batch.")
    group_by_shape: bool = Field(True, description="Score images of one size and clips in separate forward passes, "
                                 "so no prompt is padded to a longer one of the other kind.")
    queue: str = Field("cloud", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="RQ queue name.")
    job_timeout_s: int = Field(120, ge=1, le=3600, description="RQ job timeout.")
    retries: int = Field(2, ge=0, le=20, description="RQ retries of a failed job.")
    describe: bool = Field(False, description="On a fall the cloud decides, also generate a short text description "
                           "of the scene (greedy, up to describe_tokens tokens); it goes on the alert event and its "
                           "notification. Costs one generation per fall verdict.")
    describe_tokens: int = Field(40, ge=4, le=200, description="Longest description, in tokens.")
    forward_batch: int | None = Field(
        None, ge=1, le=64, description="Most items in one forward pass of the cloud model (a job's batch is split "
        "into passes of this size); unset: as many as fit in the GPU memory left after loading (docs/dmd.md), "
        "no limit on the CPU.")
    budget: BudgetSettings = Field(default_factory=BudgetSettings, description="Cloud budget at run time.")


class AlertsSettings(Section):
    cloud_timeout_s: float = Field(30.0, gt=0, le=3600,
                                   description="Use the edge verdict if the cloud has not answered by then.")
    debounce_k: int = Field(2, ge=1, le=100, description="k fall verdicts ...")
    debounce_n: int = Field(3, ge=1, le=1000, description="... within n frames start an event.")
    cooldown_s: float = Field(60.0, ge=0, le=86400, description="No new event on a camera for this long after one.")
    quiet_s: float = Field(30.0, gt=0, le=86400,
                           description="After this long without falls a fall event is marked no longer seen (it stays open).")
    stream_maxlen: int = Field(100_000, ge=100, le=100_000_000, description="Approximate MAXLEN of the alerts stream.")
    escalation: list[EscalationTier] = Field(
        default_factory=list, max_length=10,
        description="Fall notification tiers until someone acknowledges; empty: one tier, notifications.urls at once.")

    @field_validator("escalation")
    @classmethod
    def _tiers(cls, tiers: list[EscalationTier] | None) -> list[EscalationTier] | None:
        return check_tiers(tiers)
    offline_grace_s: float = Field(10.0, ge=0, le=3600,
                                   description="A camera offline this long starts a camera_offline event (and its "
                                               "notification); a shorter drop raises none. Status shows it at once.")

    @model_validator(mode="after")
    def _k_within_n(self) -> "AlertsSettings":
        if self.debounce_k > self.debounce_n:
            raise ValueError("debounce_k must not exceed debounce_n")
        return self


class NotificationSettings(Section):
    urls: list[SecretStr] = Field(default_factory=list, description="apprise URLs notified of every event. Secret.")
    snapshot: bool = Field(False, description="Attach the frame to notifications (off for privacy).")
    retry_base_s: float = Field(1.0, gt=0, le=600, description="First retry backoff of a failed notification.")
    retry_cap_s: float = Field(300.0, gt=0, le=86400, description="Largest retry backoff.")
    timeout_s: float = Field(10.0, gt=0, le=300, description="Timeout of one delivery attempt.")
    cooldown_s: float = Field(0.0, ge=0, le=86400,
                              description="Per channel and camera: skip a notification this soon after the last one.")


class MetricsSettings(Section):
    enabled: bool = Field(True, description="Serve Prometheus metrics.")
    host: str = Field("127.0.0.1", min_length=1, description="Bind address of the metrics endpoint.")
    port: int = Field(9108, ge=0, le=65535, description="Port of the metrics endpoint; 0 = any free port.")
    heartbeat_s: float = Field(5.0, gt=0, le=600, description="Worker heartbeat period.")


class DmdSettings(Section):
    store_maxlen: int = Field(50_000, ge=100, le=10_000_000, description="Most records in the live DMD store "
                              "(about 6.9 KB each with 1536 features: 50 000 = 345 MB).")
    store_max_age_s: float = Field(28 * 86400, gt=0, le=366 * 86400, description="Records older than this are trimmed.")
    features_ttl_s: int = Field(600, ge=10, le=86400, description="TTL of the edge features kept for the cloud side.")
    reload_check_s: float = Field(2.0, gt=0, le=3600, description="How often edge workers look for a new switcher.")
    drift_window: int = Field(200, ge=10, le=100_000, description="Latest audits per camera / site behind the drift figures.")
    drift_min_audits: int = Field(50, ge=5, le=100_000, description="Audits needed before a drift event can start.")
    drift_z: float = Field(1.96, gt=0, le=5, description="z of the Wilson interval (1.96: 95%).")
    offload_window: int = Field(1000, ge=10, le=1_000_000, description="Latest edge decisions per camera / site "
                                "behind the live offload rate.")
    drift_notify: list[SecretStr] = Field(default_factory=list, description="apprise URLs for switcher_drift events "
                                          "(whoever runs the site; caregivers are not told). Secret.")
    refresh_margin: float = Field(0.02, ge=0, le=1, description="A challenger must catch this much larger a share of "
                                  "the disagreements (at equal offload) to be promoted.")
    refresh_holdout: float = Field(0.2, gt=0, lt=1, description="Newest share of the store held out for the comparison.")
    checkpoints_dir: Path = Field(Path("switchers"), description="Where refresh writes challenger checkpoints.")


class LoggingSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    format: Literal["auto", "json", "console"] = Field("auto", description="auto: pretty on a TTY, JSON otherwise.")


class MqttSettings(Section):
    """MQTT bridge of the alerts service (Home Assistant and other MQTT consumers)."""

    host: str | None = Field(None, min_length=1, max_length=253,
                             description="Broker host name or address. Empty: no MQTT bridge.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (usually 1883, or 8883 with TLS).")
    username: str | None = Field(None, min_length=1, max_length=200, description="Broker user name.")
    password: SecretStr | None = Field(None, description="Broker password. Secret.")
    client_id: str = Field("", max_length=100, description="MQTT client id; empty: the prefix, host name and pid.")
    tls: bool = Field(False, description="Connect with TLS (implied by ca_certs).")
    ca_certs: Path | None = Field(None, description="CA bundle that signed the broker's certificate.")
    certfile: Path | None = Field(None, description="Client certificate for mutual TLS.")
    keyfile: Path | None = Field(None, description="Client key for mutual TLS.")
    protocol: Literal["3.1.1", "5"] = Field("3.1.1", description="MQTT protocol version.")
    topic_prefix: str = Field("fallwatch", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_./-]+$",
                              description="First level of every topic fallwatch publishes and subscribes to.")
    discovery: bool = Field(True, description="Publish Home Assistant MQTT discovery configs.")
    discovery_prefix: str = Field("homeassistant", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_./-]+$",
                                  description="Home Assistant's discovery prefix.")
    site_id: str = Field("fallwatch", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                         description="Id of this site's Home Assistant device (part of every unique id).")
    site_name: str = Field("fallwatch", min_length=1, max_length=200, description="Name of the site's device.")
    stats_period_s: float = Field(60.0, ge=0.2, le=86400, description="Period of fallwatch/stats.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive; the broker sends the will after 1.5x.")
    publish_timeout_s: float = Field(10.0, gt=0, le=300, description="Wait this long for a broker's PUBACK.")
    reconnect_min_s: float = Field(1.0, gt=0, le=60, description="First reconnect delay.")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="Largest reconnect delay.")

    @property
    def enabled(self) -> bool:
        return self.host is not None
ARGON2_PREFIXES = ("$argon2id$", "$argon2i$", "$argon2d$")


class WebUser(Section):
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$", description="Login name.")
    role: Literal["caregiver", "admin"] = Field("caregiver", description="caregiver: alerts and cameras; admin: also the admin page.")
    password_hash: SecretStr = Field(..., description="argon2 hash written by `fallwatch web user add`; never a password.")

    @model_validator(mode="before")
    @classmethod
    def _no_plain_password(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            raise ValueError("a plain password is refused; store an argon2 hash with `fallwatch web user add NAME`")
        return data

    @field_validator("password_hash")
    @classmethod
    def _is_argon2(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(ARGON2_PREFIXES):
            raise ValueError("not an argon2 hash (a plain password is refused); use `fallwatch web user add NAME`")
        return value


class WebSettings(Section):
    enabled: bool = Field(True, description="`fallwatch up` runs the web station when users exist.")
    host: str = Field("127.0.0.1", min_length=1, description="Bind address (put a TLS reverse proxy in front).")
    port: int = Field(8080, ge=0, le=65535, description="Port; 0 = any free port.")
    users: list[WebUser] = Field(default_factory=list, description="Users and roles (argon2 hashes).")
    users_file: Path = Field(Path(".fallwatch/web-users.yaml"),
                             description="More users, written by `fallwatch web user add`.")
    secret_key: SecretStr | None = Field(None, description="Cookie-signing key. Empty: one random key kept in Redis.")
    session_ttl_s: int = Field(12 * 3600, ge=60, le=30 * 86400, description="A session expires this long after login.")
    idle_timeout_s: int = Field(3600, ge=60, le=30 * 86400, description="... or after this long without a request.")
    login_max_failures: int = Field(5, ge=1, le=1000, description="Failed logins per user or address ...")
    login_window_s: int = Field(300, ge=1, le=86400, description="... within this window before logins are refused.")
    secure_cookies: Literal["auto", "always", "never"] = Field(
        "auto", description="Secure cookie flag. auto: when the request came over https (directly or via the proxy).")
    forwarded_allow_ips: str = Field("127.0.0.1", description="Proxies trusted for X-Forwarded-Proto/For.")
    tls_certfile: Path | None = Field(None, description="Serve https directly with this certificate.")
    tls_keyfile: Path | None = Field(None, description="Key of tls_certfile.")
    snapshots: bool = Field(False, description="Let signed-in users see an event's frame while its pixels are kept.")
    note_max_chars: int = Field(1000, ge=0, le=2000, description="Longest outcome note accepted.")
    page_size: int = Field(20, ge=1, le=500, description="History rows per page.")
    camera_refresh_s: float = Field(1.0, gt=0, le=60, description="How often camera tiles are re-checked for staleness.")

    @field_validator("users")
    @classmethod
    def _unique_names(cls, users: list[WebUser]) -> list[WebUser]:
        names = [u.name for u in users]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate web user names: {sorted({n for n in names if names.count(n) > 1})}")
        return users


class Settings(BaseSettings):
    """The root of fallwatch's configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
    )

    redis: RedisSettings = Field(default_factory=RedisSettings, description="Redis connection.")
    cameras: list[CameraSettings] = Field(default_factory=list, description="Cameras to ingest.")
    ingest: IngestSettings = Field(default_factory=IngestSettings, description="Ingest defaults.")
    edge: EdgeSettings = Field(default_factory=EdgeSettings, description="Edge model and worker.")
    switcher: SwitcherSettings = Field(default_factory=SwitcherSettings, description="DMD switcher.")
    cloud: CloudSettings = Field(default_factory=CloudSettings, description="Cloud model and worker.")
    alerts: AlertsSettings = Field(default_factory=AlertsSettings, description="Verdict merging and events.")
    notifications: NotificationSettings = Field(default_factory=NotificationSettings, description="Caregiver notifications.")
    metrics: MetricsSettings = Field(default_factory=MetricsSettings, description="Prometheus metrics and heartbeats.")
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="Logging.")
    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="MQTT bridge and Home Assistant discovery.")
    web: WebSettings = Field(default_factory=WebSettings, description="Caregiver web station.")
    dmd: DmdSettings = Field(default_factory=DmdSettings, description="Live DMD: store, drift monitor, refresh.")

    @field_validator("cameras")
    @classmethod
    def _unique_camera_ids(cls, cams: list[CameraSettings]) -> list[CameraSettings]:
        seen: set[str] = set()
        for cam in cams:
            if cam.id in seen:
                raise ValueError(f"duplicate camera id {cam.id!r}")
            seen.add(cam.id)
        return cams

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init kwargs carry the YAML file; env and secret files override it.
        return env_settings, file_secret_settings, init_settings

    def camera(self, camera_id: str) -> CameraSettings:
        for cam in self.cameras:
            if cam.id == camera_id:
                return cam
        raise KeyError(f"no camera {camera_id!r} in settings (known: {[c.id for c in self.cameras]})")

    def effective_ingest(self, cam: CameraSettings) -> IngestSettings:
        """Ingest settings with the camera's overrides applied."""
        overrides = {
            k: getattr(cam, k)
            for k in ("fps", "jpeg_quality", "motion_gating", "clip")
            if getattr(cam, k) is not None
        }
        return self.ingest.model_copy(update=overrides)

    def escalation_for(self, camera_id: str) -> list[EscalationTier]:
        """The escalation tiers of a camera: its own, else ``alerts.escalation``."""
        try:
            own = self.camera(camera_id).escalation
        except KeyError:
            own = None
        return own if own is not None else self.alerts.escalation

    def escalation_urls(self) -> list[SecretStr]:
        """Every apprise URL named by an escalation tier (site-wide or a camera's)."""
        tiers = self.alerts.escalation + [t for cam in self.cameras for t in cam.escalation or []]
        return [url for tier in tiers for url in tier.urls]

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain data, every secret replaced by '**********'."""
        return self.model_dump(mode="json")


# --- loading ---------------------------------------------------------------------------

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_URL_CREDENTIALS = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@:\s]*:[^/@\s]+@", re.IGNORECASE)


def _secret_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of SecretStr fields ('*' stands for a list index)."""
    paths: set[str] = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        text = repr(ann)
        path = f"{prefix}{name}"
        if "SecretStr" in text:
            paths.add(path)
        sub = _section_of(ann)
        if sub is not None:
            star = ".*" if "list[" in text else ""
            paths |= _secret_paths(sub, f"{path}{star}.")
    return paths


def _section_of(ann: Any) -> type[BaseModel] | None:
    for cand in (ann, *getattr(ann, "__args__", ())):
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand
        for inner in getattr(cand, "__args__", ()):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _walk(data: Any, path: str = ""):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _walk(v, f"{path}{k}.")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _walk(v, f"{path}{i}.")
    else:
        yield path.rstrip("."), data


def _matches(path: str, pattern: str) -> bool:
    parts, pats = path.split("."), pattern.split(".")
    return len(parts) >= len(pats) and all(p == "*" and a.isdigit() or p == a for a, p in zip(parts, pats))


def _substitute(data: Any, env: Mapping[str, str], errors: list[tuple[str, str]], path: str = "") -> Any:
    if isinstance(data, dict):
        return {k: _substitute(v, env, errors, f"{path}{k}.") for k, v in data.items()}
    if isinstance(data, list):
        return [_substitute(v, env, errors, f"{path}{i}.") for i, v in enumerate(data)]
    if isinstance(data, str):
        def repl(m: re.Match[str]) -> str:
            if m.group(1) not in env:
                errors.append((path.rstrip("."), f"environment variable {m.group(1)} is not set"))
                return ""
            return env[m.group(1)]
        return _ENV_REF.sub(repl, data)
    return data


def _check_no_literal_secrets(raw: dict[str, Any]) -> list[tuple[str, str]]:
    secret_patterns = _secret_paths(Settings)
    errors = []
    for path, value in _walk(raw):
        if not isinstance(value, str) or _ENV_REF.search(value):
            continue
        is_secret_field = any(_matches(path, p) for p in secret_patterns)
        if is_secret_field and (path.endswith("password") or _URL_CREDENTIALS.match(value)):
            errors.append((path, "holds a literal secret; reference an environment variable as ${NAME}"))
        elif _URL_CREDENTIALS.match(value):
            errors.append((path, "holds credentials; reference an environment variable as ${NAME}"))
    return errors


def read_yaml(path: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """Read a YAML config file, reject literal secrets, substitute ${VAR} from env."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError([("<file>", f"{path} does not exist")], str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError([("<file>", f"not valid YAML: {exc}")], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError([("<file>", "top level must be a mapping")], str(path))
    errors = _check_no_literal_secrets(raw)
    data = _substitute(raw, env, errors)
    if errors:
        raise ConfigError(errors, str(path))
    return data


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def load_settings(config_file: Path | str | None = None) -> Settings:
    """Build the settings: env over secret files over ``config_file`` (or $FALLWATCH_CONFIG) over defaults."""
    env = os.environ
    if config_file is None and env.get(CONFIG_ENV):
        config_file = env[CONFIG_ENV]
    source = str(config_file) if config_file else "environment"
    file_data = read_yaml(Path(config_file), env) if config_file else {}
    secrets_dir = env.get(SECRETS_DIR_ENV)
    kwargs: dict[str, Any] = {"_secrets_dir": secrets_dir} if secrets_dir else {}
    try:
        return Settings(**file_data, **kwargs)
    except ValidationError as exc:
        raise ConfigError([(_field_path(e["loc"]), e["msg"]) for e in exc.errors()], source) from None

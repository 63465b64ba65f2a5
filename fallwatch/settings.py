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
    motion_gating: bool = Field(False, description="Skip frames without motion.")
    motion_threshold: float = Field(0.01, ge=0, le=1, description="Fraction of changed pixels that is motion.")
    keepalive_s: float = Field(10.0, gt=0, le=3600, description="With gating: send a frame at least this often.")
    open_timeout_s: float = Field(10.0, gt=0, le=300, description="Timeout to open a stream.")
    read_timeout_s: float = Field(5.0, gt=0, le=300, description="No frame for this long: camera offline.")
    reconnect_base_s: float = Field(0.5, gt=0, le=60, description="First reconnect backoff.")
    reconnect_cap_s: float = Field(30.0, gt=0, le=3600, description="Largest reconnect backoff.")
    pixels_ttl_s: int = Field(600, ge=10, le=86400, description="TTL of pixels kept for offload.")
    clip: ClipSettings = Field(default_factory=ClipSettings, description="Clip mode defaults.")


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
    describe: bool = Field(False, description="Generate a text description for notifications.")


class AlertsSettings(Section):
    cloud_timeout_s: float = Field(30.0, gt=0, le=3600,
                                   description="Use the edge verdict if the cloud has not answered by then.")
    debounce_k: int = Field(2, ge=1, le=100, description="k fall verdicts ...")
    debounce_n: int = Field(3, ge=1, le=1000, description="... within n frames start an event.")
    cooldown_s: float = Field(60.0, ge=0, le=86400, description="No new event on a camera for this long after one.")
    quiet_s: float = Field(30.0, gt=0, le=86400, description="An event ends after this long without falls.")
    stream_maxlen: int = Field(100_000, ge=100, le=100_000_000, description="Approximate MAXLEN of the alerts stream.")
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


class LoggingSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    format: Literal["auto", "json", "console"] = Field("auto", description="auto: pretty on a TTY, JSON otherwise.")


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

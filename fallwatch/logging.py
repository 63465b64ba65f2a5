"""structlog set-up: JSON lines in services, pretty output on a terminal, secrets redacted.

Call :func:`configure` once, first, from the CLI. Log events are fixed names with key-value
data: ``log.info("frame_scored", camera=cam, p_fall=0.91)``.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_SECRET_KEYS = re.compile(r"(pass(word)?|secret|token|api[_-]?key|auth)", re.IGNORECASE)
# scheme://user:password@host  ->  scheme://user:***@host
_URL_PASSWORD = re.compile(r"([a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@", re.IGNORECASE)
# apprise-style tokens in the path of a notification URL: tgram://TOKEN/chat, ntfy://host/topic
_SECRET_SCHEMES = re.compile(
    r"\b(tgram|ntfy|ntfys|pover|slack|discord|msteams|gotify|gotifys|twilio|pbul|join|matrix|matrixs|"
    r"mqtt|mqtts|json|jsons|xml|xmls|form|forms|mailto|mailtos)://[^\s'\"]+",
    re.IGNORECASE,
)
REDACTED = "***"


def redact_text(text: str) -> str:
    """Remove passwords from URLs and tokens from notification URLs in free text."""
    text = _SECRET_SCHEMES.sub(lambda m: f"{m.group(1)}://{REDACTED}", text)
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)


def _redact_value(key: str, value: Any) -> Any:
    if _SECRET_KEYS.search(key) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value(key, v) for v in value]
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    return value


def redact_processor(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if k == "event" and not isinstance(v, str) else _redact_value(k, v)) for k, v in event.items()}


def _redact_rendered(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    # exception text is rendered into 'exception' by format_exc_info; redact after that.
    if "exception" in event and isinstance(event["exception"], str):
        event["exception"] = redact_text(event["exception"])
    return event


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of writing (it may be swapped later)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog and stdlib logging once. ``fmt``: auto | json | console."""
    stream = stream or _CurrentStderr()
    use_json = fmt == "json" or (fmt == "auto" and not getattr(stream, "isatty", lambda: False)())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_processor,
    ]
    if use_json:
        renderer: list[Any] = [
            structlog.processors.format_exc_info,
            _redact_rendered,
            structlog.processors.JSONRenderer(),
        ]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=getattr(stream, "isatty", lambda: False)())]
    structlog.configure(
        processors=shared + renderer,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(_LEVELS[level], logging.WARNING), stream=stream, force=True)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

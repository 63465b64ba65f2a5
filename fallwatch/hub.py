"""Where a model comes from: a local directory, the Hugging Face cache/hub, or a tiny preset.

Shared by the edge (ViLT) and cloud (LLaVA-NeXT-Video) models. Only the standard library and
``huggingface_hub`` are imported here, so this module is cheap to import.

Loading order for a hub id: the local Hugging Face cache first (no network); if the model is not
cached, the hub is tried only when it can be reached, otherwise :class:`ModelNotAvailable` says
how to fetch the model. This avoids transformers' ~30 s of retries against an unreachable hub.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import structlog

log = structlog.get_logger(__name__)

TINY = "tiny"
DEFAULT_CACHE_DIR = Path("~/.cache/fallwatch/models")
MARKER = "fallwatch_tiny.json"


class ModelNotAvailable(RuntimeError):
    """A model cannot be loaded from where it was asked for. The message says what to do.

    Every load failure (missing file, wrong layout, missing optional package, no GPU) is this
    exception with a one-line message; the commands print it as one line, without a traceback.
    """


class ModelSetupError(ModelNotAvailable, ValueError):
    """A model setting this machine cannot satisfy (no GPU, an optional package not installed)."""


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` should read a model from."""

    name: str  # what the settings said: a hub id, a path, or "tiny"
    location: str  # a directory path or a hub id
    local_only: bool  # True: never touch the network
    hf_cache_dir: Path | None  # cache_dir for hub downloads (None: the Hugging Face default)


def cache_root(cache_dir: Path | None) -> Path:
    """The directory holding fallwatch's tiny models (default ``~/.cache/fallwatch/models``)."""
    return Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else is meant as a directory."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def resolve(name: str, kind: str, tiny_builder: Callable[[Path], Path], cache_dir: Path | None) -> ModelSource:
    """Turn a model setting into a :class:`ModelSource`.

    ``tiny`` builds (once) the tiny preset under ``cache_dir`` with ``tiny_builder(cache_root)``.
    An existing directory is used as is. Anything else is a hub id. ``kind`` ("edge" or "cloud")
    only appears in error messages.
    """
    if name == TINY:
        return ModelSource(name, str(tiny_builder(cache_root(cache_dir))), True, None)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailable(f"{kind} model directory {path} has no config.json (not a saved model)")
        return ModelSource(name, str(path), True, None)
    if _looks_like_path(name):
        raise ModelNotAvailable(f"{kind} model directory {name!r} does not exist")
    return ModelSource(name, name, False, cache_dir)


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """True if the Hugging Face endpoint resolves and accepts a TCP connection (and offline mode is off)."""
    from huggingface_hub import constants  # noqa: PLC0415 - huggingface_hub is imported only where a hub id is resolved

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def not_available(kind: str, source: ModelSource, reason: str) -> ModelNotAvailable:
    """The error for a hub model that is neither cached nor downloadable."""
    return ModelNotAvailable(
        f"{kind} model {source.name!r} is not in the local Hugging Face cache and {reason}; "
        f"fetch it on a connected machine with `hf download {source.name}` "
        f"(or set the model to a local directory, or to 'tiny' for an offline test model)"
    )


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (the message alone for our own errors)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, ModelNotAvailable) else f"{type(exc).__name__}: {text}".rstrip(": ")


def cannot_load(kind: str, source: ModelSource, exc: BaseException) -> ModelNotAvailable:
    """The one-line error for a model whose files are there but do not load."""
    if isinstance(exc, ModelNotAvailable):
        return exc
    return ModelNotAvailable(
        f"{kind} model at {source.location} cannot be loaded ({first_line(exc)}); point the setting at a "
        f"directory saved by save_pretrained or laid out like the model's hub repository"
    )


def load_pretrained(kind: str, source: ModelSource, loader: Callable[..., object], **kwargs: object) -> object:
    """Call ``loader(location, **kwargs)`` (a ``from_pretrained``): cache first, hub only if reachable.

    Any failure becomes a one-line :class:`ModelNotAvailable` (transformers raises OSError for a
    missing file, and ValueError, KeyError, RecursionError... for a layout it does not read)."""
    cache_kwargs = {"cache_dir": str(source.hf_cache_dir)} if source.hf_cache_dir else {}
    try:
        return loader(source.location, local_files_only=True, **cache_kwargs, **kwargs)
    except OSError as exc:
        if source.local_only:
            raise cannot_load(kind, source, exc) from None
    except Exception as exc:  # noqa: BLE001 - a layout transformers cannot read: one line, no traceback
        raise cannot_load(kind, source, exc) from None
    if not hub_reachable():
        raise not_available(kind, source, "the Hugging Face hub cannot be reached")
    log.info("model_download", kind=kind, model=source.name)
    try:
        return loader(source.location, **cache_kwargs, **kwargs)
    except OSError as exc:
        raise not_available(kind, source, f"downloading it failed ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # noqa: BLE001
        raise cannot_load(kind, source, exc) from None


def check_model_type(kind: str, source: ModelSource, config: object, expected: str, example: str) -> None:
    """A clear error when a directory holds another kind of model than the role needs."""
    found = getattr(config, "model_type", None)
    if found != expected:
        raise ModelNotAvailable(
            f"{kind} model at {source.location} is a {found!r} model, not {expected!r}; use e.g. {example}"
        )


def check_weights(kind: str, source: ModelSource, info: dict[str, object]) -> None:
    """Fail when ``from_pretrained`` filled weights with random values (names it could not map) or
    reshaped them; transformers itself only warns, and the model would then score noise."""
    missing = sorted(info.get("missing_keys") or ()) + sorted(str(k) for k in info.get("mismatched_keys") or ())
    if missing:
        raise ModelNotAvailable(
            f"{kind} model at {source.location}: {len(missing)} weights are missing or mis-shaped in its checkpoint "
            f"(e.g. {missing[0]!r}), so its weight names or sizes are not a layout this transformers version reads"
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        log.warning("model_unused_weights", kind=kind, model=source.name, count=len(unexpected), first=unexpected[0])


def build_atomically(target: Path, recipe: dict[str, object], build: Callable[[Path], None]) -> Path:
    """Make ``target`` by ``build(tmp_dir)`` then one rename, so no process ever sees half a model.

    ``recipe`` is written as the marker file; an existing ``target`` with the same marker is reused,
    one with another marker (an older recipe) is replaced.
    """
    if _marker(target) == recipe:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(recipe, sort_keys=True))
        _swap_in(tmp, target, recipe)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _swap_in(tmp: Path, target: Path, recipe: dict[str, object]) -> None:
    if target.exists() and _marker(target) != recipe:
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}-stale-", dir=target.parent))
        try:
            os.rename(target, stale / "old")
        except OSError:
            pass  # another process moved it first
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, target)
        log.info("tiny_model_built", path=str(target))
    except OSError:
        if _marker(target) != recipe:  # lost a race against a different recipe: fail loudly
            raise


def _marker(target: Path) -> dict[str, object] | None:
    try:
        return json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return None

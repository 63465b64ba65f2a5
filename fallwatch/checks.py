"""What ``fallwatch config validate`` checks beyond the schema: the paths that must exist and the
notification URLs (through apprise, naming a missing package). Each problem is (field, message);
messages never contain a URL, which may hold credentials."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from fallwatch.settings import Settings

Problem = tuple[str, str]


def _packages(plugin: type) -> str:
    need = (getattr(plugin, "requirements", None) or {}).get("packages_required") or []
    return ", ".join([need] if isinstance(need, str) else need) or "a package apprise could not import"


def url_problem(url: str) -> str | None:
    """Why apprise cannot send to ``url`` (unknown scheme, missing package, malformed URL); None if it can."""
    try:
        import apprise  # noqa: PLC0415 - loads ~200 plugins
        from apprise.manager_plugins import NotificationManager  # noqa: PLC0415
    except ImportError:
        return "apprise is not installed (pip install 'fallwatch[alerts]')"
    scheme = urlsplit(url).scheme.lower()
    try:
        plugin = NotificationManager()[scheme]
    except KeyError:
        return f"unknown notification scheme {scheme + '://'!r}"
    if not plugin.enabled:
        return f"{scheme}:// needs the Python package {_packages(plugin)} (pip install 'fallwatch[alerts]')"
    if apprise.Apprise.instantiate(url) is None:
        return f"apprise does not accept this {scheme}:// URL (check its host, path and tokens)"
    return None


def notification_problems(settings: Settings) -> list[Problem]:
    urls = [(f"notifications.urls.{i}", u) for i, u in enumerate(settings.notifications.urls)]
    urls += [(f"cameras.{c}.notify.{i}", u) for c, cam in enumerate(settings.cameras) for i, u in enumerate(cam.notify)]
    found = [(field, url_problem(url.get_secret_value())) for field, url in urls]
    return [(field, problem) for field, problem in found if problem is not None]


def _local(value: str) -> bool:
    """A model given as a local path (not a hub id such as org/name, nor 'tiny')."""
    return value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists()


def path_problems(settings: Settings) -> list[Problem]:
    r, ckpt = settings.redis, settings.switcher.checkpoint
    files = {"redis.ssl_ca_certs": r.ssl_ca_certs, "redis.ssl_certfile": r.ssl_certfile,
             "redis.ssl_keyfile": r.ssl_keyfile, "switcher.checkpoint": ckpt}
    files |= {f"{m}.model": Path(v).expanduser() for m, v in (("edge", settings.edge.model),
                                                               ("cloud", settings.cloud.model)) if _local(v)}
    out = [(field, f"{path} does not exist") for field, path in files.items() if path and not Path(path).exists()]
    if ckpt is not None and Path(ckpt).is_file():
        out.append(("switcher.checkpoint", f"{ckpt} is a file; give the checkpoint directory "
                                           "(from `fallwatch switcher train`)"))
    return out + camera_file_problems(settings)


def camera_file_problems(settings: Settings) -> list[Problem]:
    out = []
    for i, cam in enumerate(settings.cameras):
        url = cam.url.get_secret_value()
        if "://" not in url and not url.startswith("webcam:") and not Path(url).expanduser().exists():
            out.append((f"cameras.{i}.url", f"camera {cam.id}: the file {url} does not exist"))
    return out

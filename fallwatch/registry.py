"""Extension points: classes (or factories) chosen by the scheme of a URL.

A component keeps one :class:`SchemeRegistry` per kind of thing (notification channels, camera
sources) and registers its classes on it; a plugin registers more the same way, with no edit to
the code that builds them. A URL whose scheme nobody registered goes to the fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


def url_scheme(url: str) -> str:
    """The scheme of ``url`` in lower case ("" for a plain path)."""
    try:
        return urlsplit(url).scheme.lower()
    except ValueError:
        return ""


class SchemeRegistry(Generic[T]):
    """URL scheme -> T (a class or a factory), with a fallback for every other scheme."""

    def __init__(self, kind: str, fallback: T | None = None):
        self.kind = kind
        self.fallback = fallback
        self._by_scheme: dict[str, T] = {}

    def register(self, *schemes: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("webcam")`` on the class that handles ``webcam:`` URLs."""
        def add(target: T) -> T:
            for scheme in schemes:
                self._by_scheme[scheme.lower()] = target
            return target

        return add

    def unregister(self, *schemes: str) -> None:
        for scheme in schemes:
            self._by_scheme.pop(scheme.lower(), None)

    def schemes(self) -> list[str]:
        return sorted(self._by_scheme)

    def lookup(self, url: str) -> T:
        """What handles ``url``; ValueError when no scheme matches and there is no fallback."""
        found = self._by_scheme.get(url_scheme(url), self.fallback)
        if found is None:
            raise ValueError(f"no {self.kind} for scheme {url_scheme(url)!r} (known: {', '.join(self.schemes())})")
        return found

"""A small local JSON webhook receiver: the demo's stand-in for a caregiver's phone.

apprise's ``json://127.0.0.1:PORT/path`` posts here. Received bodies are kept in memory and
printed as they arrive (optionally), with the ``Idempotency-Key`` header of each (fallwatch's
webhook deliveries carry one: the same for a repeat, see :meth:`WebhookReceiver.unique`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class WebhookReceiver:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, on_message: Callable[[dict], None] | None = None):
        self.received: list[dict[str, Any]] = []
        self.idempotency_keys: list[str | None] = []
        self._lock = threading.Lock()
        self._on_message = on_message
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, scheme: str = "json", path: str = "notify") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/{path}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                try:
                    message = json.loads(body or b"{}")
                except json.JSONDecodeError:
                    message = {"raw": body.decode(errors="replace")}
                receiver._record(message, self.headers.get("Idempotency-Key"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                return None

        return Handler

    def _record(self, message: dict[str, Any], key: str | None = None) -> None:
        with self._lock:
            self.received.append(message)
            self.idempotency_keys.append(key)
        if self._on_message is not None:
            self._on_message(message)

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def unique(self) -> int:
        """Deliveries counted once per idempotency key (what a receiver that drops repeats keeps)."""
        with self._lock:
            keyed = {k for k in self.idempotency_keys if k is not None}
            return len(keyed) + self.idempotency_keys.count(None)

    def start(self) -> "WebhookReceiver":
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "WebhookReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

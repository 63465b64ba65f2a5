"""Helpers shared by the tests: a free port, polling for a condition, a settable clock, and
builders that plant verdicts on the streams."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from fallwatch.runtime import free_port  # noqa: F401 - the tests' free port is the core's
from fallwatch.schemas import CloudVerdict, EdgeVerdict, Message, decode, encode


def wait_for(cond: Callable[[], object], timeout: float = 60.0, interval: float = 0.05) -> bool:
    """Poll ``cond`` until it is truthy or ``timeout`` seconds pass; the last check decides."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


@dataclass
class FakeClock:
    """A clock the test moves by hand."""

    t: float = 1_700_000_000.0
    calls: int = field(default=0, repr=False)

    def __call__(self) -> float:
        self.calls += 1
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


def edge_verdict(frame_id: str, captured_at: float, p_fall: float, confident: bool = True,
                 gt_fall: bool | None = None, camera_id: str | None = None) -> EdgeVerdict:
    return EdgeVerdict(frame_id=frame_id, camera_id=camera_id or frame_id.split(":")[0], captured_at=captured_at,
                       p_fall=p_fall, is_fall=p_fall >= 0.5, confident=confident, edge_ms=40.0, gt_fall=gt_fall)


def cloud_verdict(frame_id: str, captured_at: float, p_fall: float | None = None, ok: bool = True,
                  camera_id: str | None = None) -> CloudVerdict:
    return CloudVerdict(frame_id=frame_id, camera_id=camera_id or frame_id.split(":")[0], captured_at=captured_at,
                        ok=ok, p_fall=p_fall, is_fall=None if p_fall is None else p_fall >= 0.5,
                        error=None if ok else "CUDA out of memory")


def plant(client: redis.Redis, stream: str, *msgs: Message) -> None:
    for msg in msgs:
        client.xadd(stream, encode(msg))


def read_all(client: redis.Redis, stream: str) -> list[Message]:
    return [decode(fields)[0] for _, fields in client.xrange(stream)]

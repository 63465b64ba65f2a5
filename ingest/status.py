"""Camera online/offline state: a CameraStatus on the status stream at every change, plus the info hash."""

from __future__ import annotations

import redis
import structlog

from fallwatch.defaults import STATUS_STREAM_MAXLEN
from fallwatch.keys import Keys, text
from fallwatch.metrics import IngestMetrics
from fallwatch.schemas import CameraInfo, CameraState, CameraStatus, encode


log = structlog.get_logger(__name__)


class StatusReporter:
    """Tracks one camera's state; writes only on a change (a failed write is retried on the next call)."""

    def __init__(self, client: redis.Redis, keys: Keys, camera_id: str, *, name: str = "",
                 source: str = "", sample_fps: float | None = None):
        self.client = client
        self.keys = keys
        self.camera_id = camera_id
        self.name = name or camera_id
        self.source = source
        self.sample_fps = sample_fps
        self.state: CameraState | None = None
        self.reason = ""

    def online(self, fps: float | None = None) -> None:
        if self.state is not CameraState.ONLINE:
            self._emit(CameraState.ONLINE, "", fps)

    def offline(self, reason: str, expected: bool = False) -> None:
        """Go offline; ``expected`` (a clean stop, a finished replay) logs at info, not warning."""
        if self.state is not CameraState.OFFLINE:
            self._emit(CameraState.OFFLINE, reason, None, expected)

    def _emit(self, state: CameraState, reason: str, fps: float | None, expected: bool = False) -> None:
        msg = CameraStatus(camera_id=self.camera_id, state=state, reason=reason[:1000], fps=fps, expected=expected)
        info = CameraInfo(state=state, reason=msg.reason, changed_at=msg.at, name=self.name, source=self.source,
                          sample_fps=self.sample_fps, **({} if fps is None else {"fps": fps}))  # offline keeps the fps
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.xadd(self.keys.camera_status_stream(), encode(msg), maxlen=STATUS_STREAM_MAXLEN, approximate=True)
            pipe.hset(self.keys.camera_info(self.camera_id), mapping=info.to_hash())
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("camera_status_unsaved", camera=self.camera_id, state=state.value, error=str(exc))
            return
        self.state, self.reason = state, msg.reason
        IngestMetrics.create().online(self.camera_id, state is CameraState.ONLINE, fps)
        if state is CameraState.ONLINE:
            log.info("camera_online", camera=self.camera_id, source=self.source, fps=fps)
        elif expected:
            log.info("camera_offline", camera=self.camera_id, source=self.source, reason=msg.reason)
        else:
            log.warning("camera_offline", camera=self.camera_id, source=self.source, reason=msg.reason)


def read_info(client: redis.Redis, keys: Keys, camera_id: str) -> dict[str, str]:
    """The camera's info hash as text (empty when the camera was never seen)."""
    raw = client.hgetall(keys.camera_info(camera_id))
    return {text(k): text(v) for k, v in raw.items()}


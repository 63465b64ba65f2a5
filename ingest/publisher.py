"""From sampled frames to stream entries: motion gating, clip assembly, JPEG, XADD, counters.

One pipelined round trip per item: XADD (``MAXLEN ~``), the camera's counters and its
``last_frame_at``. A Redis outage is waited out with capped backoff (the same item is retried);
meanwhile the live buffer in front drops its oldest frames. A Redis that refuses writes (out of
memory: ``maxmemory`` under ``noeviction``) is not waited for: the item is dropped and counted
here, and the count reaches ``ingest:<id>:oom`` with the first write Redis takes again.

The stream is kept near ``stream_maxlen``: the pipeline's plain XADD is followed by XLEN, and once
the stream is a chunk over, :data:`TRIM` (one Lua call, by its SHA) trims the oldest entries
exactly, counting those the edge group had not read yet (overload): ``frames_trimmed_unread`` in
total, ``ingest:<id>:trimmed`` per camera. So every frame that enters the stream is either read by
an edge worker or counted. The 60 KB entry itself never goes through Lua (that halved the write rate).
"""

from __future__ import annotations

import re
import threading
from collections import Counter, deque
from dataclasses import dataclass

import redis
import structlog

from fallwatch.keys import Keys, text
from fallwatch.metrics import IngestMetrics
from fallwatch.schemas import CameraInfo, FrameMessage, ItemKind, encode
from fallwatch.settings import IngestSettings, RedisSettings
from fallwatch.streams import Backoff, id_tuple
from ingest.jpeg import encode_jpeg
from ingest.records import FrameRecord, SeqAllocator
from ingest.sampling import ClipAssembler, MotionGate

log = structlog.get_logger(__name__)


@dataclass
class PublishStats:
    items: int = 0  # stream entries (a clip is one)
    frames: int = 0  # images inside them
    gated: int = 0  # sampled frames/clips skipped as still (motion gating)
    dropped: int = 0  # frames dropped by a full live buffer
    oom: int = 0  # frames dropped because Redis refused writes (out of memory)
    trimmed: int = 0  # items trimmed from the stream by MAXLEN before the edge group read them


def clip_label(parts: list[FrameRecord]) -> bool | None:
    """Ground truth of an item: fall if any frame is, unknown if no frame is labelled."""
    labels = [p.gt_fall for p in parts if p.gt_fall is not None]
    return any(labels) if labels else None


# KEYS: frames stream, total trimmed-unread counter. ARGV: maxlen, chunk, most entries trimmed per
# call, edge group. Returns {camera id of every entry trimmed before the group read it}. Trimming is
# exact (XTRIM MINID) so the count is too.
TRIM = """
local stream = KEYS[1]
local maxlen, chunk, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local excess = redis.call('XLEN', stream) - maxlen
if excess < chunk then return {} end
local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', math.min(excess, limit))
local function split(s)
  local ms, seq = string.match(s, '^(%d+)-(%d+)$')
  return ms, tonumber(seq)
end
local function later(a, b)
  local am, as = split(a)
  local bm, bs = split(b)
  am, bm = tonumber(am), tonumber(bm)
  return am > bm or (am == bm and as > bs)
end
local delivered = '0-0'
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  if info['name'] == ARGV[4] then delivered = info['last-delivered-id'] end
end
local out = {}
for _, entry in ipairs(oldest) do
  if later(entry[1], delivered) then
    local camera, f = '', entry[2]
    for i = 1, #f, 2 do
      if f[i] == 'm' then
        local ok, m = pcall(cjson.decode, f[i + 1])
        if ok and type(m) == 'table' and type(m['camera_id']) == 'string' then camera = m['camera_id'] end
      end
    end
    out[#out + 1] = camera
  end
end
local ms, seq = split(oldest[#oldest][1])
redis.call('XTRIM', stream, 'MINID', ms .. '-' .. (seq + 1))
if #out > 0 then redis.call('INCRBY', KEYS[2], #out) end
return out
"""
TRIM_LIMIT = 1000  # entries trimmed per call at most (a lowered maxlen is reached over several calls)
CAMERA_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Publisher:
    """Publishes one camera's frames. ``max_pending`` (replays): wait while the edge group has
    more than that many of our entries undelivered, so ``MAXLEN`` never trims unread frames."""

    def __init__(self, client: redis.Redis, keys: Keys, camera_id: str, ing: IngestSettings,
                 stop: threading.Event, *, clips: bool | None = None, gating: bool | None = None,
                 max_pending: int | None = None, metrics: IngestMetrics | None = None,
                 retry: RedisSettings | None = None):
        self.client = client
        self.metrics = metrics or IngestMetrics.create()
        self.keys = keys
        self.camera_id = camera_id
        self.ing = ing
        self.stop = stop
        self.stats = PublishStats()
        self.seq = SeqAllocator(client, keys.camera_counter(camera_id, "seq"))
        use_clips = ing.clip.enabled if clips is None else clips
        use_gate = ing.motion_gating if gating is None else gating
        self.clips = ClipAssembler(ing.clip.frames, ing.clip.stride) if use_clips else None
        self.gate = MotionGate(ing.motion_threshold, ing.keepalive_s) if use_gate else None
        self.max_pending = max_pending
        self._recent: deque[tuple[int, int]] = deque(maxlen=(max_pending or 0) + 1)
        self._unsaved = PublishStats()  # counter deltas not yet written
        self._moved = False
        self.retry = retry or RedisSettings()  # backoff through Redis outages
        self._trimmer = client.register_script(TRIM)  # EVALSHA, loaded on first use
        self._chunk = max(1, ing.stream_maxlen // 20)  # entries over maxlen before a trim

    def handle(self, rec: FrameRecord, dropped: int = 0) -> bool:
        """Feed one sampled frame; True when it completed an item that was published."""
        self._unsaved.dropped += dropped
        self.stats.dropped += dropped
        moved = self.gate.moved(rec.rgb) if self.gate else True
        parts: list[FrameRecord] | None = [rec]
        if self.clips is not None:
            self._moved = self._moved or moved
            parts = self.clips.push(rec)
            if parts is None:
                return False
            moved, self._moved = self._moved, False
        if self.gate is not None and not self.gate.admit(moved, rec.captured_at):
            self.stats.gated += 1
            self._unsaved.gated += 1
            return False
        return self.publish(parts)

    def build(self, parts: list[FrameRecord]) -> tuple[FrameMessage, list[bytes]]:
        images = [encode_jpeg(p.rgb, self.ing.jpeg_quality, self.ing.max_width) for p in parts]
        last = parts[-1]
        msg = FrameMessage.make(
            self.camera_id, self.seq.next(), captured_at=last.captured_at,
            kind=ItemKind.CLIP if self.clips is not None else ItemKind.IMAGE, n_images=len(images),
            width=images[0].width, height=images[0].height, gt_fall=clip_label(parts), source=last.source[:500],
        )
        return msg, [img.data for img in images]

    def publish(self, parts: list[FrameRecord]) -> bool:
        """Encode and XADD one item, retrying through Redis outages until done or stopped."""
        try:
            msg, images = self.build(parts)  # frame numbers come from Redis (a block at a time)
        except redis.exceptions.OutOfMemoryError as exc:
            return self._refused(len(parts), exc)
        fields = encode(msg, images)
        backoff = Backoff.redis(self.retry)
        while not self.stop.is_set():
            try:
                if self.max_pending is not None:
                    self._wait_for_consumers()
                self._write(msg, fields)
                return True
            except redis.exceptions.OutOfMemoryError as exc:
                return self._refused(msg.n_images, exc)
            except redis.RedisError as exc:
                delay = backoff.next()
                log.warning("ingest_redis_error", camera=self.camera_id, error=str(exc), retry_s=delay)
                self.stop.wait(delay)
        return False

    def _write(self, msg: FrameMessage, fields: dict[bytes, bytes]) -> None:
        cam = self.camera_id
        pipe = self.client.pipeline(transaction=False)
        pipe.execute_command("XADD", self.keys.frames_stream(), "*", *(x for pair in fields.items() for x in pair))
        pipe.xlen(self.keys.frames_stream())
        pipe.incrby(self.keys.camera_counter(cam, "items"), 1)
        pipe.incrby(self.keys.camera_counter(cam, "frames"), msg.n_images)
        for field in ("gated", "dropped", "oom"):
            if getattr(self._unsaved, field):
                pipe.incrby(self.keys.camera_counter(cam, field), getattr(self._unsaved, field))
        pipe.hset(self.keys.camera_info(self.camera_id),
                  mapping=CameraInfo(last_frame_at=msg.captured_at, last_frame_id=msg.frame_id).to_hash())
        entry_id, length = self._added(pipe.execute(raise_on_error=False))
        if self._unsaved.oom:
            log.info("redis_memory_available", camera=cam, dropped_oom=self._unsaved.oom)
            self.metrics.memory_ok()
        self.metrics.ingested(self.camera_id, msg.n_images)
        self.metrics.dropped(self.camera_id, self._unsaved.dropped)
        self.metrics.motion_skipped(self.camera_id, self._unsaved.gated)
        self._unsaved = PublishStats()
        self.stats.items += 1
        self.stats.frames += msg.n_images
        if self.max_pending is not None:
            self._recent.append(id_tuple(entry_id))
        if length - self.ing.stream_maxlen >= self._chunk:
            self._trim()

    def _trim(self) -> None:
        """Trim the stream back to ``stream_maxlen`` (TRIM), counting the entries nobody had read."""
        maxlen = self.ing.stream_maxlen
        try:
            trimmed = self._trimmer(keys=[self.keys.frames_stream(), self.keys.frames_trimmed_unread()],
                                    args=[maxlen, self._chunk, TRIM_LIMIT, self.keys.edge_group()])
        except redis.RedisError as exc:  # the frame is added; the next write trims
            log.warning("ingest_redis_error", camera=self.camera_id, error=str(exc))
            return
        if trimmed:
            self._count_trimmed([c if CAMERA_ID.fullmatch(c) else "unknown" for c in map(text, trimmed)])

    def _added(self, replies: list) -> tuple[bytes, int]:
        """The new entry's id and the stream's length; raises the XADD's error. A counter a nearly full
        Redis refused after the entry went in is only logged: raising would count (or add) the frame twice."""
        if isinstance(replies[0], Exception):
            raise replies[0]
        failed = [r for r in replies[1:] if isinstance(r, Exception)]
        if failed:
            log.warning("ingest_counters_not_saved", camera=self.camera_id, error=str(failed[0]))
        return replies[0], replies[1] if isinstance(replies[1], int) else 0

    def _refused(self, frames: int, exc: redis.RedisError) -> bool:
        """Redis is out of memory: drop the item (live data), count its frames, say so once."""
        if not self._unsaved.oom:
            log.warning("redis_out_of_memory", camera=self.camera_id, error=str(exc),
                        hint="frames are dropped and counted until Redis has memory again")
        self._unsaved.oom += frames
        self.stats.oom += frames
        self.metrics.dropped_oom(self.camera_id, frames)
        return False

    def _count_trimmed(self, cameras: list[str]) -> None:
        """Per-camera counters of entries trimmed unread (the total is already counted, atomically)."""
        counts = Counter(cameras)
        self.stats.trimmed += counts[self.camera_id]
        log.warning("frames_trimmed_unread", camera=self.camera_id, count=len(cameras), cameras=dict(counts),
                    maxlen=self.ing.stream_maxlen)
        try:
            pipe = self.client.pipeline(transaction=False)
            for camera, n in counts.items():
                pipe.incrby(self.keys.camera_counter(camera, "trimmed"), n)
            pipe.execute()
        except redis.RedisError as exc:  # never retry the write for this: the frame is already added
            log.warning("ingest_redis_error", camera=self.camera_id, error=str(exc))

    def _wait_for_consumers(self) -> None:
        """Block while more than ``max_pending`` of our entries are not yet delivered to the edge group."""
        while not self.stop.is_set():
            pending = self._undelivered()
            if pending is None or pending < self.max_pending:
                return
            self.stop.wait(0.05)

    def _undelivered(self) -> int | None:
        try:
            groups = self.client.xinfo_groups(self.keys.frames_stream())
        except redis.ResponseError:  # no stream yet
            return None
        group = next((g for g in groups if text(g.get("name")) == self.keys.edge_group()), None)
        if group is None:  # nobody consumes yet: nothing to wait for
            return None
        last = id_tuple(group["last-delivered-id"])
        return sum(1 for entry in self._recent if entry > last)

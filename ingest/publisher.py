"""From sampled frames to stream entries: motion gating, clip assembly, JPEG, XADD, counters.

One pipelined round trip (a MULTI/EXEC transaction, all or nothing) per item: XADD, the camera's
counters and its ``last_frame_at``. A publisher that is behind (more sampled frames already waiting
in its buffer) queues up to ``ingest.write_batch`` items and writes them in one round trip; a frame
with nothing behind it is written at once, so batching never adds latency. A Redis outage is
waited out with capped backoff (the same items are retried); meanwhile the live buffer in front
drops its oldest frames. A Redis that refuses writes (out of
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
        self._queue: list[tuple[FrameMessage, dict[bytes, bytes]]] = []  # encoded, not yet written
        self._moved = False
        self.retry = retry or RedisSettings()  # backoff through Redis outages
        self._trimmer = client.register_script(TRIM)  # EVALSHA, loaded on first use
        self._chunk = max(1, ing.stream_maxlen // 20)  # entries over maxlen before a trim

    def handle(self, rec: FrameRecord, dropped: int = 0, flush: bool = True) -> bool:
        """Feed one sampled frame; True when it completed an item that was published (or queued,
        without ``flush``: the caller has more frames waiting and flushes with the last of them)."""
        self._unsaved.dropped += dropped
        self.stats.dropped += dropped
        parts = self._admitted(rec)
        if parts is None:
            if flush:
                self.flush()  # what earlier frames queued
            return False
        return self.publish(parts, flush)

    def _admitted(self, rec: FrameRecord) -> list[FrameRecord] | None:
        """The item ``rec`` completes and the motion gate lets through, else None (counted as gated)."""
        moved = self.gate.moved(rec.rgb) if self.gate else True
        parts: list[FrameRecord] | None = [rec]
        if self.clips is not None:
            self._moved = self._moved or moved
            parts = self.clips.push(rec)
            if parts is None:
                return None
            moved, self._moved = self._moved, False
        if self.gate is not None and not self.gate.admit(moved, rec.captured_at):
            self.stats.gated += 1
            self._unsaved.gated += 1
            return None
        return parts

    def build(self, parts: list[FrameRecord]) -> tuple[FrameMessage, list[bytes]]:
        images = [encode_jpeg(p.rgb, self.ing.jpeg_quality, self.ing.max_width) for p in parts]
        last = parts[-1]
        msg = FrameMessage.make(
            self.camera_id, self.seq.next(), captured_at=last.captured_at,
            kind=ItemKind.CLIP if self.clips is not None else ItemKind.IMAGE, n_images=len(images),
            width=images[0].width, height=images[0].height, gt_fall=clip_label(parts), source=last.source[:500],
        )
        return msg, [img.data for img in images]

    def publish(self, parts: list[FrameRecord], flush: bool = True) -> bool:
        """Encode one item and queue it; write the queue now if ``flush`` or it holds ``write_batch``
        items. False when Redis refused it (out of memory) or the queue could not be written."""
        try:
            msg, images = self.build(parts)  # frame numbers come from Redis (a block at a time)
        except redis.exceptions.OutOfMemoryError as exc:
            return self._refused(len(parts), exc)
        self._queue.append((msg, encode(msg, images)))
        if flush or len(self._queue) >= self.ing.write_batch:
            return self.flush()
        return True

    @property
    def accepted(self) -> int:
        """Items written plus those queued for the next round trip."""
        return self.stats.items + len(self._queue)

    def flush(self) -> bool:
        """Write the queued items in one pipelined round trip, retrying through Redis outages until
        done or stopped (a stopped publisher still tries once)."""
        backoff = Backoff.redis(self.retry)
        while self._queue:
            try:
                self._write(self._queue[:self._room()])
            except redis.exceptions.OutOfMemoryError as exc:
                frames, self._queue = sum(m.n_images for m, _f in self._queue), []
                return self._refused(frames, exc)
            except redis.RedisError as exc:
                if self.stop.is_set():
                    return False
                delay = backoff.next()
                log.warning("ingest_redis_error", camera=self.camera_id, error=str(exc), retry_s=delay)
                self.stop.wait(delay)
        return True

    def _write(self, items: list[tuple[FrameMessage, dict[bytes, bytes]]]) -> None:
        """XADD ``items`` (the queue's first), XLEN, the camera's counters and ``last_frame_at``: one round trip."""
        cam = self.camera_id
        pipe = self.client.pipeline(transaction=True)  # all or nothing: a refused command refuses the queue
        for _msg, fields in items:
            pipe.execute_command("XADD", self.keys.frames_stream(), "*", *(x for pair in fields.items() for x in pair))
        pipe.xlen(self.keys.frames_stream())
        frames = sum(msg.n_images for msg, _f in items)
        self._unsaved.items, self._unsaved.frames = len(items), frames
        for field in ("items", "frames", "gated", "dropped", "oom"):
            if getattr(self._unsaved, field):
                pipe.incrby(self.keys.camera_counter(cam, field), getattr(self._unsaved, field))
        last = items[-1][0]
        pipe.hset(self.keys.camera_info(cam),
                  mapping=CameraInfo(last_frame_at=last.captured_at, last_frame_id=last.frame_id).to_hash())
        entry_ids, length = self._added(pipe.execute(raise_on_error=False), len(items))
        del self._queue[:len(items)]
        self._saved(frames)
        self.stats.items += len(items)
        self.stats.frames += frames
        if self.max_pending is not None:
            self._recent.extend(id_tuple(e) for e in entry_ids)
        if length - self.ing.stream_maxlen >= self._chunk:
            self._trim()

    def _saved(self, frames: int) -> None:
        """The unsaved counters reached Redis: tell the metrics and start counting again."""
        if self._unsaved.oom:
            log.info("redis_memory_available", camera=self.camera_id, dropped_oom=self._unsaved.oom)
            self.metrics.memory_ok()
        self.metrics.ingested(self.camera_id, frames)
        self.metrics.dropped(self.camera_id, self._unsaved.dropped)
        self.metrics.motion_skipped(self.camera_id, self._unsaved.gated)
        self._unsaved = PublishStats()

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

    def _added(self, replies: list, n: int) -> tuple[list[bytes], int]:
        """The new entries' ids and the stream's length. A command Redis refuses (out of memory) aborts
        the whole transaction, raised by ``execute``: nothing was written, the queue is dropped and
        counted. An error while executing it is raised for an XADD (the queue is written again) and
        only logged for a counter: raising would add the frames twice."""
        failed = [r for r in replies[:n] if isinstance(r, Exception)]
        if failed:
            raise failed[0]
        counters = [r for r in replies[n + 1:] if isinstance(r, Exception)]
        if counters:
            log.warning("ingest_counters_not_saved", camera=self.camera_id, error=str(counters[0]))
        return replies[:n], replies[n] if isinstance(replies[n], int) else 0

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

    def _room(self) -> int:
        """How many queued items to write now: all of them, or with ``max_pending`` as many as fit
        (blocking while ``max_pending`` of our entries are not yet delivered to the edge group)."""
        if self.max_pending is None:
            return len(self._queue)
        while not self.stop.is_set():
            pending = self._undelivered()
            if pending is None or pending < self.max_pending:
                return min(len(self._queue), self.max_pending - (pending or 0))
            self.stop.wait(0.05)
        return len(self._queue)

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

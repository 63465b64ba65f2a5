"""Online scoring of final verdicts, kept in the ``keys.stats()`` hash.

Counters are incremented in the same Lua call that writes a frame's final verdict, so every
frame is counted exactly once however often its inputs are redelivered. Frames that carry
ground truth (replays) feed the confusion counts ``tp/fp/fn/tn``; every frame feeds the counts
by decider, the offload count and a latency histogram (capture to final verdict) with
geometric buckets 5 % wide, from which p50/p99 are read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import redis

from fallwatch.keys import Keys
from fallwatch.schemas import Decider, FinalVerdict, StatsCounts


BUCKET_GROWTH = 1.05
_LOG_GROWTH = math.log(BUCKET_GROWTH)
LAT_PREFIX = StatsCounts.LAT_PREFIX


def latency_bucket(ms: float) -> int:
    """Index b of the bucket (1.05^(b-1), 1.05^b] holding ``ms``; everything up to 1 ms is bucket 0."""
    if ms <= 1.0:
        return 0
    return math.ceil(math.log(ms) / _LOG_GROWTH - 1e-9)


def bucket_upper_ms(bucket: int) -> float:
    return BUCKET_GROWTH ** bucket


def confusion_field(is_fall: bool, gt_fall: bool) -> str:
    if gt_fall:
        return "tp" if is_fall else "fn"
    return "fp" if is_fall else "tn"


def final_increments(final: FinalVerdict) -> dict[str, int]:
    """Integer HINCRBY increments for one final verdict."""
    inc = {"finals": 1, f"{StatsCounts.BY_PREFIX}{final.decided_by.value}": 1, f"{LAT_PREFIX}{latency_bucket(final.latency_ms)}": 1}
    if final.offloaded:
        inc["offloaded"] = 1
    if final.gt_fall is not None:
        inc[confusion_field(final.is_fall, final.gt_fall)] = 1
        inc["scored"] = 1
    return inc


def quantile_ms(histogram: dict[int, int], q: float) -> float | None:
    """The upper edge of the bucket where the cumulative count reaches q of the total."""
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return bucket_upper_ms(bucket)
    return bucket_upper_ms(max(histogram))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass(frozen=True)
class StatsReport:
    finals: int
    scored: int
    tp: int
    fp: int
    fn: int
    tn: int
    precision: float | None
    recall: float | None
    f1: float | None
    accuracy: float | None
    offloaded: int
    offload_rate: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    by_decider: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def report_from_hash(raw: dict[bytes | str, bytes | str]) -> StatsReport:
    """Turn the raw stats hash into rates and percentiles."""
    s = StatsCounts.from_hash(raw)
    tp, fp, fn, tn = s.tp, s.fp, s.fn, s.tn
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return StatsReport(
        finals=s.finals, scored=s.scored, tp=tp, fp=fp, fn=fn, tn=tn,
        precision=precision, recall=recall, f1=f1, accuracy=_ratio(tp + tn, tp + fp + fn + tn),
        offloaded=s.offloaded, offload_rate=_ratio(s.offloaded, s.finals),
        latency_p50_ms=quantile_ms(s.latency, 0.5), latency_p99_ms=quantile_ms(s.latency, 0.99),
        by_decider={d.value: s.by_decider.get(d.value, 0) for d in Decider},
    )


def read_stats(client: redis.Redis, keys: Keys, camera_id: str | None = None) -> StatsReport:
    """All cameras, or one camera (a replay's --camera-id) only."""
    return report_from_hash(client.hgetall(keys.stats() if camera_id is None else keys.camera_stats(camera_id)))


def reset_stats(client: redis.Redis, keys: Keys) -> int:
    """Start counting afresh: delete the total and every camera's hash; how many hashes went."""
    names = [keys.stats(), *client.scan_iter(match=keys.camera_stats("*"), count=1000)]
    return int(client.delete(*names))


def format_stats(rep: StatsReport) -> str:
    """A short human-readable summary."""
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.0f} ms"

    lines = [
        f"final verdicts   {rep.finals}   (with ground truth: {rep.scored})",
        f"precision {pct(rep.precision)}   recall {pct(rep.recall)}   F1 {pct(rep.f1)}   accuracy {pct(rep.accuracy)}",
        f"confusion        tp={rep.tp} fp={rep.fp} fn={rep.fn} tn={rep.tn}",
        f"offload rate     {pct(rep.offload_rate)}   ({rep.offloaded} offloaded)",
        f"latency          p50 {ms(rep.latency_p50_ms)}   p99 {ms(rep.latency_p99_ms)}   (capture to final verdict)",
        "decided by       " + "  ".join(f"{k}={v}" for k, v in rep.by_decider.items()),
    ]
    return "\n".join(lines)

"""Cloud budget at run time: real edge, cloud and alerts workers on a real Redis, planted scores.

Every run feeds planted frames (``bench/planted.py``: the agreement score and the edge verdict
are written into the frame, everything else is the production path) to real ``EdgeWorker``s,
real RQ cloud workers (a model stand-in that sleeps a chosen time per item) and the real alerts
service, each in its own thread, on a private redis-server.

* ``shift``: the share of low-agreement items doubles mid-run. ``fixed`` keeps the threshold
  calibrated on the first half; ``target_rate`` follows the running quantile. Offload share per
  window of items, against the target.
* ``hard``: two edge workers share a hard budget of offloads per hour while demand exceeds it.
  Every spend is logged with the Redis server time the Lua script decided it at. Overruns: any
  stretch of time in which more was granted than the bucket allows (its size plus the refill
  over that stretch). Use: granted over what the budget allowed from the first spend to the last.
* ``priority``: demand above the budget, the "no fall" (rank 0) share below it: per spend and per
  one-second window, any rank-0 item refused while a rank-1 item was sent.
* ``slow``: the cloud is 5x slower than the offload rate needs; with and without backpressure:
  cloud timeouts (final verdicts by ``edge_timeout``) and the final-verdict latency of shed items.

    .venv/bin/python bench/bench_budget.py --out bench/results/budget [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import redis

from common import Machine, figure
from planted import PlantedScorer, PlantedSwitcher, SleepyCloud, planted_entry, push_planted

FIXED_T = 0.3 + 0.7 * 0.05 / 0.85  # the 20% quantile of the first half's scores (15% below 0.3)
TARGET = 0.2


def scores(rng: np.random.Generator, n: int, low_share: float) -> np.ndarray:
    """Agreement: low_share of items in [0, 0.3) (hard for the edge), the rest in [0.3, 1)."""
    return np.where(rng.random(n) < low_share, rng.uniform(0, 0.3, n), rng.uniform(0.3, 1.0, n))


# --- a site: Redis and workers in threads ---------------------------------------------------------


class Site:
    def __init__(self, url: str, overrides: dict[str, Any]):
        from fallwatch.keys import Keys
        from fallwatch.settings import Settings

        base = {"redis": {"url": url}, "metrics": {"heartbeat_s": 1.0}, "edge": {"block_ms": 50}}
        for section, values in overrides.items():
            base[section] = {**base.get(section, {}), **values}
        self.url, self.settings, self.keys = url, Settings(**base), Keys()
        self.client = redis.Redis.from_url(url)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.grants: list[tuple[float, int]] = []  # (server time, items granted) of every spend
        self._lock = threading.Lock()

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def edge(self, name: str, threshold: float = 0.5, target: float | None = None) -> None:
        from edge_worker.worker import EdgeWorker
        from fallwatch.metrics import EdgeMetrics, build_metrics

        worker = EdgeWorker(self.settings, redis.Redis.from_url(self.url), self.keys, PlantedScorer(),
                            PlantedSwitcher(threshold, target), name=name,
                            metrics=EdgeMetrics.create(build_metrics()))
        self._record_grants(worker.router.bucket)
        self._spawn(worker.run, self.stop)

    def _record_grants(self, bucket) -> None:
        """Log every spend of the shared bucket with the server time the script decided it at."""
        take = bucket.take

        def recorded(items):
            grant = take(items)
            with self._lock:
                self.grants.append((grant.at, grant.granted))
            return grant

        bucket.take = recorded

    def cloud(self, item_s: float) -> None:
        from cloud_worker.worker import build_worker, run

        worker = build_worker(self.settings, redis.Redis.from_url(self.url), self.keys, SleepyCloud(item_s), "cloud-1")
        self._spawn(run, worker, self.stop)

    def alerts(self) -> None:
        from alerts.service import AlertsService
        from fallwatch.metrics import AlertsMetrics, build_metrics

        service = AlertsService(self.settings, redis.Redis.from_url(self.url), self.keys, name="alerts-1",
                                block_ms=50, metrics=AlertsMetrics.create(build_metrics()))
        self._spawn(service.run, self.stop)

    def feed(self, items: list[tuple[float, bool]], rate_per_s: float | None) -> None:
        """XADD planted frames, captured now; at ``rate_per_s`` (None: all at once)."""
        started, sent, chunk = time.monotonic(), 0, 1 if rate_per_s is None else max(1, int(rate_per_s / 20))
        while sent < len(items):
            if rate_per_s is not None:
                time.sleep(max(0.0, started + sent / rate_per_s - time.monotonic()))
            pipe = self.client.pipeline(transaction=False)
            for i in range(sent, min(len(items), sent + (chunk if rate_per_s else 500))):
                pipe.xadd(self.keys.frames_stream(), planted_entry("cam1", i, *items[i]))
            sent += len(pipe.execute())

    def warm_up_cloud(self, items: int = 4) -> None:
        """Frames of camera ``warm`` through edge and cloud until the cloud has reported its speed, as
        a cloud that has served before has: the edge's backpressure then knows what a job costs."""
        push_planted(self.client, self.keys, "warm", [(0.1, False)] * items)
        assert self.wait(lambda: self.client.hlen(self.keys.cloud_service()) > 0, 60), "the cloud answered nothing"

    def edge_verdicts(self) -> list:
        from fallwatch.schemas import EdgeVerdict, decode

        got = [decode(f)[0] for _, f in self.client.xrange(self.keys.verdicts_stream())]
        return [v for v in got if isinstance(v, EdgeVerdict)]

    def finals(self, camera: str = "cam1") -> list:
        """The final verdicts of ``camera``'s frames (those ``feed`` sent)."""
        from fallwatch.schemas import decode

        got = [decode(f)[0] for _, f in self.client.xrange(self.keys.final_stream())]
        return [f for f in got if f.camera_id == camera]

    def wait(self, cond, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.1)
        return bool(cond())

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


@contextmanager
def site(work: Path, name: str, **overrides: Any) -> Iterator[Site]:
    from fallwatch.redis import EmbeddedRedis

    with EmbeddedRedis(work / name, appendonly=False) as server:
        s = Site(server.url, overrides)
        try:
            yield s
        finally:
            s.close()


# --- shift: target_rate vs fixed --------------------------------------------------------------------


def run_shift(work: Path, quick: bool) -> dict[str, Any]:
    window = 1000  # items: the share is held per window, so a window must hold many quantile windows
    half = 3 * window // 2 if quick else 4 * window
    rng = np.random.default_rng(7)
    a = np.concatenate([scores(rng, half, 0.15), scores(rng, half, 0.30)])
    items = [(float(x), bool(rng.random() < 0.3)) for x in a]
    out: dict[str, Any] = {"window_items": window, "target_share": TARGET, "fixed_threshold": round(FIXED_T, 4),
                           "low_share": [0.15, 0.30]}
    for mode in ("fixed", "target_rate"):
        budget = {"mode": mode, "target_rate": TARGET, "window_items": 200, "min_items": 50}
        with site(work, f"shift-{mode}", cloud={"budget": budget}) as s:
            s.edge("edge-1", threshold=FIXED_T)
            s.feed(items, None)
            assert s.wait(lambda: s.client.xlen(s.keys.verdicts_stream()) >= len(items), 120), "edge stalled"
            vs = sorted(s.edge_verdicts(), key=lambda v: int(v.frame_id.split(":")[1]))
        shares = [float(np.mean([not v.confident for v in vs[i:i + window]])) for i in range(0, len(vs), window)]
        out[mode] = {"shares": [round(x, 4) for x in shares],
                     "max_dev": round(max(abs(x - TARGET) / TARGET for x in shares), 4)}
    return out


# --- hard: two edge workers, one bucket ---------------------------------------------------------------


def sliding_excess(times: list[float], capacity: float, rate: float) -> float:
    """max over t1 <= t2 of sent in [t1, t2] - (capacity + rate * (t2 - t1)), in items."""
    worst, low = -capacity, float("inf")
    for n, t in enumerate(sorted(times)):
        low = min(low, n - rate * t)  # items before t1 (exclusive), minus its refill
        worst = max(worst, (n + 1 - rate * t) - low - capacity)
    return worst


def hard_budget(rate: float, burst_s: float, reserve: float) -> dict[str, Any]:
    return {"mode": "hard", "hard_unit": "offloads", "hard_per_hour": rate * 3600, "burst_s": burst_s,
            "reserve": reserve, "backpressure": False}


def run_hard_case(work: Path, name: str, duration_s: float, demand_per_s: float, low_share: float,
                  fall_share: float, rate: float, burst_s: float, reserve: float) -> dict[str, Any]:
    rng = np.random.default_rng(11)
    n = int(duration_s * demand_per_s)
    agreement = np.where(rng.random(n) < low_share, rng.uniform(0, 0.3, n), rng.uniform(0.7, 1.0, n))
    items = [(float(x), bool(f)) for x, f in zip(agreement, rng.random(n) < fall_share)]
    with site(work, name, cloud={"budget": hard_budget(rate, burst_s, reserve)}) as s:
        s.edge("edge-1")
        s.edge("edge-2")
        s.feed(items, demand_per_s)
        assert s.wait(lambda: s.client.xlen(s.keys.verdicts_stream()) >= n, 60), "edge stalled"
        vs = s.edge_verdicts()
        grants = sorted(s.grants)
    wanted = [v for v in vs if v.agreement is not None and v.agreement < 0.5]
    sent = [v for v in wanted if not v.confident]
    capacity = rate * burst_s
    t0, span = grants[0][0], grants[-1][0] - grants[0][0]
    excess = sliding_excess([at - t0 for at, n in grants for _ in range(n)], capacity, rate)
    return {"items": n, "wanted": len(wanted), "sent": len(sent), "kept_edge_budget": len(wanted) - len(sent),
            "workers": sorted({v.worker for v in vs}), "sent_by_worker": {w: sum(v.worker == w for v in sent)
                                                                          for w in sorted({v.worker for v in vs})},
            "budget_per_s": rate, "bucket": capacity, "span_s": round(span, 2),
            "allowed": round(capacity + rate * span, 1), "used": round(len(sent) / (capacity + rate * span), 4),
            "granted": sum(n for _, n in grants), "spends": len(grants),
            "max_excess_items": round(excess, 4), "overruns": int(excess > 1e-6),
            "priority": priority_violations(wanted)}


def priority_violations(wanted: list) -> dict[str, int]:
    """Rank-0 items refused while a rank-1 item was sent: in the same spend, and in the same second."""
    def count(key) -> int:
        groups: dict[Any, list] = {}
        for v in wanted:
            groups.setdefault(key(v), []).append(v)
        return sum(any(not v.is_fall and v.confident for v in g) and any(v.is_fall and not v.confident for v in g)
                   for g in groups.values())
    rank0 = [v for v in wanted if not v.is_fall]
    return {"per_spend": count(lambda v: (v.worker, v.edge_ms)), "per_second": count(lambda v: int(v.decided_at)),
            "rank0_refused": sum(v.confident for v in rank0), "rank0": len(rank0),
            "rank1_sent": sum(not v.confident for v in wanted if v.is_fall),
            "rank1": sum(v.is_fall for v in wanted)}


# --- slow cloud: backpressure -------------------------------------------------------------------------


def run_slow_case(work: Path, name: str, backpressure: bool, duration_s: float, timeout_s: float,
                  demand_per_s: float, item_s: float) -> dict[str, Any]:
    n = int(duration_s * demand_per_s)
    items = [(0.1, False)] * n
    overrides = {"cloud": {"budget": {"backpressure": backpressure}, "batch_size": 8, "retries": 0},
                 "alerts": {"cloud_timeout_s": timeout_s}}
    with site(work, name, **overrides) as s:
        s.cloud(item_s)
        s.alerts()
        s.edge("edge-1")
        s.warm_up_cloud()
        s.feed(items, demand_per_s)
        assert s.wait(lambda: len(s.finals()) >= n, timeout_s + 60), "finals missing"
        finals = s.finals()
    by: dict[str, int] = {}
    for f in finals:
        by[f.decided_by.value] = by.get(f.decided_by.value, 0) + 1
    shed = [f.latency_ms for f in finals if f.decided_by.value == "edge_shed"]
    return {"items": n, "by_decider": by, "timeouts": by.get("edge_timeout", 0),
            "shed_p99_ms": round(float(np.percentile(shed, 99)), 1) if shed else None,
            "final_p99_ms": round(float(np.percentile([f.latency_ms for f in finals], 99)), 1)}


# --- the whole benchmark ----------------------------------------------------------------------------------


@dataclass
class BudgetBench:
    shift: dict[str, Any]
    hard: dict[str, Any]
    priority: dict[str, Any]
    slow: dict[str, Any]


def run_budget(work: Path, quick: bool) -> BudgetBench:
    """Every case; with ``quick``, the two hard-budget cases run side by side (each on a redis-server
    of its own, their workers in threads: they wait on the clock and the budget). The slow-cloud cases
    run one at a time: a process holds one cloud runtime."""
    # quick: runs of 1.5 s, and a cloud timeout of 1 s so that the slow cloud's queue still outgrows it
    duration, timeout_s = (1.5, 1.0) if quick else (15.0, 2.0)
    shift = run_shift(work, quick)
    hard_cases = {
        "hard": partial(run_hard_case, work, "hard", duration, demand_per_s=120, low_share=0.5, fall_share=0.5,
                        rate=20, burst_s=2.0, reserve=0.25),
        "priority": partial(run_hard_case, work, "priority", duration, demand_per_s=120, low_share=0.2,
                            fall_share=0.5, rate=20, burst_s=1.0, reserve=0.5),
    }
    hard = side_by_side(hard_cases) if quick else {name: case() for name, case in hard_cases.items()}
    item_s = 0.05
    slow = {"cloud_timeout_s": timeout_s, "item_s": item_s, "normal_item_s": item_s / 5,
            "demand_per_s": 40, "capacity_per_s": round(1 / item_s, 1)}
    for bp in (False, True):
        slow["with" if bp else "without"] = run_slow_case(work, f"slow-{bp}", bp, duration, timeout_s, 40, item_s)
    return BudgetBench(shift, hard["hard"], hard["priority"], slow)


def side_by_side(cases: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {name: pool.submit(case) for name, case in cases.items()}
        return {name: f.result() for name, f in futures.items()}


def figures(b: BudgetBench, machine: Machine) -> list:
    s, h, p, w = b.shift, b.hard, b.priority, b.slow
    without, with_ = w["without"], w["with"]
    return [
        figure("budget.target_rate_max_window_dev", s["target_rate"]["max_dev"], "ratio", machine, "<= 0.10",
               lambda v: v <= 0.10, fixed_max_dev=s["fixed"]["max_dev"], **{k: v for k, v in s.items()}),
        figure("budget.hard_overruns", h["overruns"], "overruns", machine, "== 0", lambda v: v == 0, **h),
        figure("budget.hard_used", h["used"], "ratio", machine, ">= 0.90", lambda v: v >= 0.90),
        figure("budget.priority_violations", p["priority"]["per_spend"], "spends", machine, "== 0",
               lambda v: v == 0, **p),
        figure("budget.slow_cloud_timeouts_ratio", with_["timeouts"] / max(1, without["timeouts"]), "ratio", machine,
               "< 1", lambda v: v < 1, **w),
        figure("budget.shed_p99_ms", with_["shed_p99_ms"], "ms", machine, "< 1000", lambda v: v < 1000),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for budget.json and budget.md")
    ap.add_argument("--quick", action="store_true", help="1.5-second runs and a 3000-item shift")
    args = ap.parse_args()
    from fallwatch import logging as fw_logging

    fw_logging.configure("error", "console")
    machine = Machine.here()
    with tempfile.TemporaryDirectory(prefix="fw-bench-") as tmp:
        bench = run_budget(Path(tmp), args.quick)
    print(json.dumps(asdict(bench), default=str))
    figs = figures(bench, machine)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "budget.json").write_text(json.dumps({f.name: f.to_json() for f in figs}, indent=2, default=str))
    (args.out / "budget.md").write_text(markdown(bench, figs))
    print(markdown(bench, figs))


def markdown(b: BudgetBench, figs: list) -> str:
    lines = ["# Cloud budget", "", "| figure | value | target | holds |", "|---|---|---|---|"]
    lines += [f"| `{f.name}` | {f.value:g} {f.unit} | {f.target} | {'yes' if f.met else '**no**'} |" for f in figs]
    lines += ["", "```json", json.dumps(asdict(b), indent=2, default=str), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

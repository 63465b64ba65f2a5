"""Live DMD end to end: the loop notices a change of traffic, learns it, and swaps the switcher live.

A planted stream goes through real edge workers (2, threads), a real RQ cloud worker and the real
alerts service on a real Redis. The models are planted through the same code path (the scorer
objects the workers call): each frame's JPEG encodes its index, from which the edge "model"
returns that item's features and fall probability and the cloud "model" its fall probability.
Disagreement follows rule A (``x0 + x1 > 1``) until a known frame, then rule B (``x2 + x3 > 1``).
The champion switcher is trained offline on rule A and calibrated to a fixed offload budget; the
oracle is the same recipe trained offline on rule B.

Figures (JSON + Markdown + a PNG of the curve):

* ``live_dmd.audits_to_drift``: audited items after the change until the site's switcher_drift
  event starts (target <= 300);
* ``live_dmd.catch_ratio_after_refresh``: share of edge/cloud disagreements sent to the cloud by
  the live edge after refresh + promotion, over the oracle's on the same frames at the same
  offload fraction (target >= 0.9); before the change and after it (before refresh) as details;
* ``live_dmd.audit_share``: audits per frame, the cloud work audits add (target <= audit_fraction
  + 0.5 pp); audits over all cloud jobs as a detail;
* ``live_dmd.reload_lost`` / ``live_dmd.reload_twice``: frames without a final verdict and frames
  scored twice over the run, which includes the hot reload under load (targets 0 and 0).

    .venv/bin/python bench/bench_live_dmd.py --out bench/results/live_dmd [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from common import bench_start, Machine, figure

DIM, BUDGET, QUESTIONS = 16, 0.3, ("Is the person falling?",)
NOISE = 0.05  # random disagreements no switcher can learn: the calibration expects about 95 % agreement
BLOCK, BITS = 8, 32  # the frame index is drawn as 32 black/white 8x8 blocks (4 rows of 8)


# --- the planted models ----------------------------------------------------------------------


def index_jpeg(idx: int) -> bytes:
    bits = np.array([(idx >> b) & 1 for b in range(BITS)], dtype=np.uint8).reshape(4, 8) * 255
    img = np.kron(bits, np.ones((BLOCK, BLOCK), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(np.stack([img] * 3, axis=-1)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def read_index(image) -> int:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = np.moveaxis(a, 0, -1)
    gray = a.astype(np.float32).mean(axis=-1)
    blocks = gray.reshape(4, BLOCK, 8, BLOCK).mean(axis=(1, 3)) > 127
    return int(sum(int(v) << b for b, v in enumerate(blocks.reshape(-1))))


@dataclass
class Traffic:
    features: np.ndarray
    edge_p: np.ndarray
    cloud_p: np.ndarray
    disagree: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class EdgeScores:
    p_fall: np.ndarray
    features: np.ndarray
    wall_s: float


@dataclass(frozen=True)
class CloudScores:
    p_fall: np.ndarray
    wall_s: float
    energy_j: None = None


class PlantedEdge:
    model_id, questions = "planted/edge", QUESTIONS

    def __init__(self, traffic: Traffic):
        self.t = traffic

    def score(self, images) -> EdgeScores:
        start = time.perf_counter()
        idx = [read_index(i) for i in images]
        return EdgeScores(self.t.edge_p[idx].astype(np.float32), self.t.features[idx], time.perf_counter() - start)


class PlantedCloud:
    model_id = "planted/cloud"

    def __init__(self, traffic: Traffic):
        self.t = traffic

    def score(self, items) -> CloudScores:
        start = time.perf_counter()
        return CloudScores(self.t.cloud_p[[read_index(i) for i in items]], time.perf_counter() - start)


def make_traffic(n_a: int, n_b: int, seed: int) -> Traffic:
    from switcher.planted import Rule, planted

    rng = np.random.default_rng(seed)
    a, b = planted(rng, n_a, DIM, Rule(0, 1), NOISE), planted(rng, n_b, DIM, Rule(2, 3), NOISE)
    cat = lambda name: np.concatenate([getattr(a, name), getattr(b, name)])  # noqa: E731
    return Traffic(cat("features"), cat("edge_p"), cat("cloud_p"), cat("disagree"), cat("labels"))


# --- offline switchers -----------------------------------------------------------------------


def offline_switcher(work: Path, rule, seed: int, items: int = 3000, epochs: int = 60):
    """The offline recipe: distil ``items`` planted items (80/20 train/val), train, calibrate to the budget."""
    from switcher.calibrate import calibrate, calibration_card
    from switcher.model import Switcher, SwitcherConfig, read_card, write_card
    from switcher.planted import planted
    from switcher.records import DmdMeta, write_arrays
    from switcher.train import train_switcher

    rng = np.random.default_rng(seed)
    meta = DmdMeta(edge_model_id=PlantedEdge.model_id, questions=QUESTIONS, feature_dim=DIM,
                   cloud_model_id=PlantedCloud.model_id, cloud_question="?", dataset="planted", split="", kind="image")
    sets = {}
    for name, n in (("train", items * 4 // 5), ("val", items // 5)):
        p = planted(rng, n, DIM, rule, NOISE)
        sets[name] = write_arrays(work / name, DmdMeta(**{**asdict(meta), "split": name}), p.features, p.edge_p,
                                  p.cloud_p, p.labels)
    cfg = SwitcherConfig(in_features=DIM, seed=seed, batch_size=64, lr=1e-3, max_epochs=epochs)
    train_switcher(sets["train"], sets["val"], work / "ckpt", cfg)
    sw = Switcher.load(work / "ckpt")
    agreement = sw.agreement(sets["val"].features)
    write_card(work / "ckpt", calibration_card(read_card(work / "ckpt"), calibrate(agreement, sets["val"], BUDGET),
                                               agreement, sets["val"]))
    return Switcher.load(work / "ckpt")


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Plan:
    n_a: int
    n_b_before_refresh: int
    n_c: int
    audit_fraction: float
    rate: int  # frames per second pushed
    offline_items: int = 3000  # items of the offline recipe (champion and oracle)
    epochs: int = 60  # most training epochs, offline and in refresh
    ahead_s: float = 2.0  # the producer runs at most this many seconds of frames ahead of the final verdicts

    @classmethod
    def for_run(cls, quick: bool) -> "Plan":
        return cls(800, 1600, 800, 0.1, 300, 1500, 30) if quick else cls(6000, 14000, 6000, 0.02, 250)


@dataclass
class Timeline:
    samples: list[dict] = field(default_factory=list)  # drift figures of the site over time
    marks: dict[str, int] = field(default_factory=dict)  # frame index of change, drift start, promotion


class Producer:
    """Pushes planted frames at a fixed rate; ``upto`` is how far it may go. It never runs more than
    ``ahead`` frames ahead of the final verdicts (None: no limit), as cameras sized to what the box
    carries: on a machine slower than the rate, the pipeline then lags by at most that much instead
    of more and more, and ``held_s`` says how long the producer waited for it."""

    def __init__(self, client, keys, cameras: int, rate: int, traffic: Traffic, ahead: int | None = None):
        self.client, self.keys, self.cameras, self.rate, self.t = client, keys, cameras, rate, traffic
        self.pushed, self.upto, self.stop, self.ahead, self.held_s = 0, 0, threading.Event(), ahead, 0.0
        self.jpegs: dict[int, bytes] = {}

    def _behind(self) -> bool:
        """Whether the pipeline is ``ahead`` frames behind."""
        return self.ahead is not None and self.pushed - self.client.xlen(self.keys.final_stream()) >= self.ahead

    def run(self) -> None:
        from fallwatch.schemas import FrameMessage, encode

        chunk, due = max(1, self.rate // 20), time.monotonic()
        while not self.stop.is_set():
            end = min(self.upto, self.pushed + chunk, len(self.t.labels))
            held = end > self.pushed and self._behind()
            if end <= self.pushed or held:
                waited = time.monotonic()
                self.stop.wait(0.02)
                if held:
                    self.held_s += time.monotonic() - waited
                due = time.monotonic()  # the rate counts from when frames may go again
                continue
            pipe = self.client.pipeline(transaction=False)
            for i in range(self.pushed, end):
                msg = FrameMessage.make(f"cam{i % self.cameras}", i // self.cameras, captured_at=time.time(),
                                        width=64, height=32, gt_fall=bool(self.t.labels[i]))
                pipe.xadd(self.keys.frames_stream(), encode(msg, [index_jpeg(i)]))
            pipe.execute()
            due += (end - self.pushed) / self.rate  # a schedule, not a pause: the pushing takes time too
            self.pushed = end
            self.stop.wait(max(0.0, due - time.monotonic()))


def caught_up(client, keys, frames: int) -> bool:
    """Whether ``frames`` frames have their final verdict and no cloud job (offload, audit) waits."""
    from fallwatch.streams import job_queue

    return client.xlen(keys.final_stream()) >= frames and job_queue(client, keys.cloud_queue()).count == 0


def frame_index(frame_id: str, cameras: int) -> int:
    cam, seq = frame_id.split(":")
    return int(seq) * cameras + int(cam[3:])


def wait(cond, timeout: float, what: str, poll=None) -> float:
    start = time.monotonic()
    while not cond():
        if poll is not None:
            poll()
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"live DMD bench: {what} did not happen within {timeout:.0f} s")
        time.sleep(0.1)
    return time.monotonic() - start


def run_live(work: Path, quick: bool, seed: int = 0) -> dict:
    import redis

    from alerts.drift import SITE
    from bench_e2e import serving, start_role
    from cloud_worker.worker import build_worker, run
    from edge_worker.worker import EdgeWorker
    from fallwatch import dmd_store
    from fallwatch.keys import Keys
    from fallwatch.redis import EmbeddedRedis
    from fallwatch.settings import Settings
    from switcher.planted import Rule
    from switcher.publish import current_version, publish
    from switcher.refresh import refresh

    plan = Plan.for_run(quick)
    n_total = plan.n_a + plan.n_b_before_refresh + plan.n_c
    traffic = make_traffic(plan.n_a, n_total + 120 * plan.rate, seed)  # room for refresh time at full rate
    champion = offline_switcher(work / "champion", Rule(0, 1), seed, plan.offline_items, plan.epochs)
    oracle = offline_switcher(work / "oracle", Rule(2, 3), seed + 1, plan.offline_items, plan.epochs)
    timeline = Timeline()
    with EmbeddedRedis(work / "redis", appendonly=False) as server:
        client = redis.Redis.from_url(server.url)
        keys = Keys("live")
        config = {
            "redis": {"url": server.url, "key_prefix": "live"},
            "edge": {"batch_size": 16, "block_ms": 50},
            "switcher": {"audit_fraction": plan.audit_fraction, "audit_seed": "bench"},
            "cloud": {"batch_size": 32}, "alerts": {"cloud_timeout_s": 600},
            "ingest": {"pixels_ttl_s": 3600},
            "dmd": {"drift_window": 200, "drift_min_audits": 50, "reload_check_s": 0.5, "features_ttl_s": 3600,
                    "checkpoints_dir": str(work / "switchers")},
            "metrics": {"enabled": False, "heartbeat_s": 0.5}, "logging": {"level": "warning", "format": "json"},
        }
        settings = Settings(**config)
        v_champion = publish(client, keys, champion.path)
        # a group that never reads keeps the alerts service from trimming the verdicts the figures need
        client.xgroup_create(keys.verdicts_stream(), "bench-keep", id="0", mkstream=True)
        stop = threading.Event()
        edges = [EdgeWorker(settings, client, keys, PlantedEdge(traffic), name=f"edge{i}") for i in range(2)]
        cloud = build_worker(settings, client, keys, PlantedCloud(traffic), name="cloud0")
        (work / "live.yaml").write_text(yaml.safe_dump(config))
        alerts = start_role(work / "live.yaml", work / "alerts.log", "alerts", "--no-notify", "--name", "alerts0")
        producer = Producer(client, keys, 4, plan.rate, traffic, int(plan.ahead_s * plan.rate))
        threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in edges]
        threads += [threading.Thread(target=run, args=(cloud, stop), daemon=True),
                    threading.Thread(target=producer.run, daemon=True)]
        with serving(client, keys, {"alerts": alerts}, work):  # the alerts service: its own process, as deployed
            for t in threads:
                t.start()

            def sample() -> None:
                raw = client.hget(keys.drift_state(), SITE)
                if raw is None:
                    return
                state = json.loads(raw)
                timeline.samples.append({"frame": producer.pushed, **state})
                if "drift_start" in timeline.marks and "drift_end" not in timeline.marks and state.get("event_id") is None:
                    timeline.marks["drift_end"] = producer.pushed

            def drifting() -> bool:
                raw = client.hget(keys.drift_state(), SITE)
                return raw is not None and json.loads(raw).get("event_id") is not None

            def audits_since(idx: int) -> int:
                return sum(1 for r in dmd_store.iter_records(client, keys)
                           if r.record.route == "audit" and frame_index(r.record.frame_id, 4) >= idx)

            started = time.time()
            try:
                producer.upto = plan.n_a
                wait(lambda: producer.pushed >= plan.n_a, 600, "rule A traffic", sample)
                timeline.marks["change"] = plan.n_a
                change_at = time.time()
                producer.upto = len(traffic.labels)  # rule B from here on, also during refresh and reload
                wait(drifting, 900, "the drift event", sample)
                audits_to_drift = audits_since(plan.n_a)
                timeline.marks["drift_start"] = producer.pushed
                wait(lambda: producer.pushed >= plan.n_a + plan.n_b_before_refresh, 900, "rule B traffic", sample)
                # the refresh learns from what the pipeline has stored: let it catch up with what was pushed
                wait(lambda: caught_up(client, keys, plan.n_a + plan.n_b_before_refresh), 900, "the pipeline", sample)
                report = refresh(client, keys, settings, promote=True, out=work / "challenger", since=change_at,
                                 seed=seed, epochs=plan.epochs)
                timeline.marks["promotion"] = producer.pushed
                v_new = current_version(client, keys)
                wait(lambda: all(e.switcher_version == v_new for e in edges), 120, "the hot reload", sample)
                reloaded_at = producer.pushed
                producer.upto = reloaded_at + plan.n_c
                wait(lambda: producer.pushed >= producer.upto, 900, "post-refresh traffic", sample)
                producer.stop.set()
                pushed = producer.pushed
                wait(lambda: client.xlen(keys.final_stream()) >= pushed, 900, "every final verdict", sample)
            finally:
                producer.stop.set()
                stop.set()
                for t in threads:
                    t.join(30)
        elapsed = time.time() - started
        verdicts = read_verdicts(client, keys)
        finals = Counter(fid for fid in final_ids(client, keys))
        store_audits = sum(1 for r in dmd_store.iter_records(client, keys) if r.record.route == "audit")
        cloud_jobs = dict(zip(("offload", "audit"), cloud_counts(client, keys)))
    return summarise(plan, traffic, verdicts, finals, pushed, champion, oracle, v_champion, v_new, report,
                     audits_to_drift, reloaded_at, cloud_jobs, store_audits, timeline, elapsed, producer.held_s)


def read_verdicts(client, keys) -> list:
    from fallwatch.schemas import EdgeVerdict, decode

    out = []
    for _, fields in client.xrange(keys.verdicts_stream()):
        msg, _ = decode(fields)
        if isinstance(msg, EdgeVerdict):
            out.append(msg)
    return out


def final_ids(client, keys) -> list[str]:
    from fallwatch.schemas import FinalVerdict, decode

    return [m.frame_id for m in (decode(f, expect=FinalVerdict)[0] for _, f in client.xrange(keys.final_stream()))]


def cloud_counts(client, keys) -> tuple[int, int]:
    from fallwatch.schemas import CloudVerdict, decode

    routes = Counter()
    for _, fields in client.xrange(keys.verdicts_stream()):
        msg, _ = decode(fields)
        if isinstance(msg, CloudVerdict):
            routes[msg.route] += 1
    return routes["offload"], routes["audit"]


# --- figures ---------------------------------------------------------------------------------


def catch(idx: np.ndarray, offloaded: np.ndarray, traffic: Traffic) -> float:
    d = traffic.disagree[idx]
    return float((offloaded & d).sum() / max(d.sum(), 1))


def oracle_catch(sw, idx: np.ndarray, fraction: float, traffic: Traffic) -> float:
    from switcher.calibrate import threshold_for_fraction

    scores = sw.agreement(traffic.features[idx])
    return catch(idx, scores < threshold_for_fraction(scores, fraction), traffic)


def phase(verdicts, traffic: Traffic, cameras: int, lo: int, hi: int, version: str | None = None) -> dict:
    rows = [(frame_index(v.frame_id, cameras), not v.confident) for v in verdicts
            if (version is None or v.switcher_version == version)]
    rows = [(i, o) for i, o in rows if lo <= i < hi]
    idx = np.array([i for i, _ in rows], dtype=int)
    off = np.array([o for _, o in rows], dtype=bool)
    return {"idx": idx, "offloaded": off, "fraction": float(off.mean()) if len(off) else 0.0,
            "catch": catch(idx, off, traffic) if len(idx) else 0.0, "frames": len(idx)}


def summarise(plan, traffic, verdicts, finals, pushed, champion, oracle, v_champion, v_new, report, audits_to_drift,
              reloaded_at, cloud_jobs, store_audits, timeline, elapsed, held_s: float = 0.0) -> dict:
    scored = Counter(v.frame_id for v in verdicts)
    before = phase(verdicts, traffic, 4, 0, plan.n_a)
    after = phase(verdicts, traffic, 4, plan.n_a, timeline.marks["promotion"], v_champion)
    refreshed = phase(verdicts, traffic, 4, reloaded_at, pushed, v_new)
    ratios = {
        "before_change": before["catch"] / oracle_catch(champion, before["idx"], before["fraction"], traffic),
        "after_change": after["catch"] / oracle_catch(oracle, after["idx"], after["fraction"], traffic),
        "after_refresh": refreshed["catch"] / oracle_catch(oracle, refreshed["idx"], refreshed["fraction"], traffic),
    }
    curve = rolling(verdicts, traffic, 4)
    return {
        "plan": asdict(plan), "frames": pushed, "seconds": round(elapsed, 1), "producer_held_s": round(held_s, 1),
        "audits_to_drift": audits_to_drift, "catch_ratio": ratios,
        "catch": {k: round(p["catch"], 4) for k, p in (("before_change", before), ("after_change", after),
                                                        ("after_refresh", refreshed))},
        "offload_fraction": {k: round(p["fraction"], 4) for k, p in (("before_change", before),
                                                                      ("after_change", after),
                                                                      ("after_refresh", refreshed))},
        "audits": cloud_jobs.get("audit", 0), "offloads": cloud_jobs.get("offload", 0), "store_audits": store_audits,
        "audits_per_frame": cloud_jobs.get("audit", 0) / max(pushed, 1),
        "audits_per_cloud_job": cloud_jobs.get("audit", 0) / max(sum(cloud_jobs.values()), 1),
        "lost": sum(1 for i in range(pushed) if finals[f"cam{i % 4}:{i // 4}"] == 0),
        "scored_twice": sum(1 for n in scored.values() if n > 1),
        "finals_twice": sum(1 for n in finals.values() if n > 1),
        "versions": {"champion": v_champion, "challenger": v_new},
        "refresh": {"reason": report.reason, "promoted": report.promoted, "records": report.records,
                    "budget": report.budget},
        "timeline": {"marks": timeline.marks, "reloaded_at": reloaded_at, "curve": curve,
                     "drift": [{k: s.get(k) for k in ("frame", "agreement", "low", "high", "expected")}
                               for s in timeline.samples]},
    }


def rolling(verdicts, traffic: Traffic, cameras: int, window: int = 1000, step: int = 250) -> list[dict]:
    order = sorted((frame_index(v.frame_id, cameras), not v.confident) for v in verdicts)
    idx = np.array([i for i, _ in order], dtype=int)
    off = np.array([o for _, o in order], dtype=bool)
    points = []
    for end in range(window, len(idx) + 1, step):
        sl = slice(end - window, end)
        points.append({"frame": int(idx[end - 1]), "catch": catch(idx[sl], off[sl], traffic),
                       "offload": float(off[sl].mean())})
    return points


def plot(result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = result["timeline"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    c = tl["curve"]
    ax1.plot([p["frame"] for p in c], [p["catch"] for p in c], label="disagreements sent to the cloud (rolling 1000)")
    ax1.plot([p["frame"] for p in c], [p["offload"] for p in c], label="offload fraction", alpha=0.7)
    d = [s for s in tl["drift"] if s["agreement"] is not None]
    ax2.plot([s["frame"] for s in d], [s["agreement"] for s in d], label="live agreement of edge-decided (audits)")
    ax2.fill_between([s["frame"] for s in d], [s["low"] for s in d], [s["high"] for s in d], alpha=0.25,
                     label="Wilson 95% interval")
    ax2.plot([s["frame"] for s in d], [s["expected"] for s in d], "--", label="calibration expects")
    for ax in (ax1, ax2):
        for n, (name, x) in enumerate(sorted(tl["marks"].items(), key=lambda kv: kv[1])):
            ax.axvline(x, color="grey", linestyle=":")
            ax.text(x, 1.01 + 0.06 * (n % 2), name.replace("_", " "), fontsize=7, transform=ax.get_xaxis_transform())
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7, loc="lower right")
    ax2.set_xlabel("frame")
    fig.tight_layout()
    path = out / "live_dmd.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figures(result: dict, machine: Machine) -> list:
    fraction = result["plan"]["audit_fraction"]
    details = {k: result[k] for k in ("frames", "seconds", "producer_held_s", "catch", "catch_ratio", "offload_fraction", "audits",
                                      "offloads", "audits_per_cloud_job", "versions", "refresh", "finals_twice")}
    return [
        figure("live_dmd.audits_to_drift", result["audits_to_drift"], "audits", machine, "<= 300",
               lambda v: v <= 300, **details),
        figure("live_dmd.catch_ratio_after_refresh", round(result["catch_ratio"]["after_refresh"], 3), "x oracle",
               machine, ">= 0.9", lambda v: v >= 0.9,
               before_change=round(result["catch_ratio"]["before_change"], 3),
               after_change=round(result["catch_ratio"]["after_change"], 3)),
        figure("live_dmd.audit_share", round(100 * result["audits_per_frame"], 2), "% of frames", machine,
               f"<= {100 * fraction + 0.5:g}", lambda v: v <= 100 * fraction + 0.5, audit_fraction=fraction,
               audits_per_cloud_job=round(result["audits_per_cloud_job"], 4)),
        figure("live_dmd.reload_lost", result["lost"], "frames", machine, "0", lambda v: v == 0),
        figure("live_dmd.reload_twice", result["scored_twice"], "frames", machine, "0", lambda v: v == 0),
    ]


def markdown(result: dict, figs: list) -> str:
    lines = ["# Live DMD", "", f"{result['frames']} frames in {result['seconds']} s; audit fraction "
             f"{result['plan']['audit_fraction']}; refresh: {result['refresh']['reason']}", "",
             "| figure | value | target | holds |", "|---|---|---|---|"]
    for f in figs:
        lines.append(f"| `{f.name}` | {f.value:g} {f.unit} | {f.target} | {'yes' if f.met else '**no**'} |")
    lines += ["", "| phase | offload fraction | disagreements caught | ratio to oracle |", "|---|---|---|---|"]
    for k in ("before_change", "after_change", "after_refresh"):
        lines.append(f"| {k.replace('_', ' ')} | {100 * result['offload_fraction'][k]:.1f}% | "
                     f"{100 * result['catch'][k]:.1f}% | {result['catch_ratio'][k]:.3f} |")
    return "\n".join(lines) + "\n"


def run_bench(work: Path, quick: bool) -> dict:
    return run_live(work, quick)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for live_dmd.json, .md and .png")
    ap.add_argument("--quick", action="store_true", help="about 3500 frames at 10%% audits instead of 26000 at 2%%")
    args = ap.parse_args()
    machine = bench_start("error")
    with tempfile.TemporaryDirectory(prefix="fw-bench-") as tmp:
        result = run_bench(Path(tmp), args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    figs = figures(result, machine)
    (args.out / "live_dmd.json").write_text(json.dumps({**{f.name: f.to_json() for f in figs}, "run": result},
                                                       indent=2, default=str) + "\n")
    (args.out / "live_dmd.md").write_text(markdown(result, figs))
    plot(result, args.out)
    print(markdown(result, figs))


if __name__ == "__main__":
    main()

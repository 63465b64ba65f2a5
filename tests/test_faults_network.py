"""The deployment's real shape: a split site over a network that fails.

The care-home box and the GPU host are two network namespaces joined by a veth pair
(tests/netns.py). The site's Redis runs on the edge side with TLS and the confined ``cloud`` ACL
user of compose/docker-compose.site.yml; the edge worker and the alerts service reach it on the
box, the cloud worker over the link. Then the link is cut, rate-limited, slowed and broken, and
the frames are counted as in tests/test_faults.py (figures to $FALLWATCH_FAULT_REPORT).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fallwatch.keys import Keys
from fallwatch.schemas import Decider
from tests.faults import FaultFigures, Tally, dead_letters, finals, record, upstream_repeats, wait_up
from tests.frames import push_frames
from tests.helpers import wait_for
from tests.netns import TLS_PORT, DelayProxy, FramePump, Link, Site, ensure_tools, offload_round_trips, refusal

pytestmark = [pytest.mark.fault, pytest.mark.slow]

KEYS = Keys()
UP = (("edge", "edge-1"), ("alerts", "alerts-1"), ("cloud", "gpu-1"))


@pytest.fixture
def site() -> Iterator[Site]:
    """The two hosts and the site's Redis; the namespaces are deleted whatever the test did."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_SYS_ADMIN)")
    assert ensure_tools(), "needs iproute2 (ip, tc), Debian's redis-server and openssl (scripts/install-netns.sh)"
    reason = refusal()
    if reason:
        pytest.skip(reason)
    link, data_dir = Link(), Path(tempfile.mkdtemp(prefix="fw-n-"))
    split = None
    try:
        link.create()
        split = Site(link, data_dir)
        yield split
    finally:
        if split is not None:
            split.close()
        link.delete()
        shutil.rmtree(data_dir, ignore_errors=True)


def decided(site: Site) -> dict[str, Decider]:
    return {v.frame_id: v.decided_by for v in finals(site.client, KEYS)}


def all_decided(site: Site, sent: list[str]) -> bool:
    return set(decided(site)) >= set(sent)


def cloud_connections(site: Site) -> set[int]:
    """Ids of the server's connections logged in as the ``cloud`` user."""
    return {int(c["id"]) for c in site.client.client_list() if c.get("user") == "cloud"}


def new_cloud_verdict(site: Site, frames: list[str]) -> bool:
    """Some frame of ``frames`` got its final verdict from the cloud."""
    by = decided(site)
    return any(by.get(f) is Decider.CLOUD for f in frames)


def deciders(site: Site, frames: list[str]) -> str:
    counts = Counter(decided(site).get(f) for f in frames)
    return ", ".join(f"{d.value} {n}" for d, n in sorted(counts.items(), key=lambda kv: -kv[1]) if d)


def start_site(site: Site, log_dir: Path, cloud_port: int = TLS_PORT, **settings: object):
    """The edge worker and alerts service on the box, one cloud worker on the GPU host, all up."""
    edge, cloud = site.edge_roles(log_dir, **settings), site.cloud_roles(log_dir, port=cloud_port, **settings)
    cloud.start("cloud", "cloud", "--name", "gpu-1")
    edge.start("edge", "edge", "--name", "edge-1")
    edge.start("alerts", "alerts", "--name", "alerts-1", "--no-notify")
    try:
        wait_up(site.client, KEYS, edge, *UP[:2])
        wait_up(site.client, KEYS, cloud, *UP[2:])
    except BaseException:
        edge.__exit__()
        cloud.__exit__()
        raise
    return edge, cloud


def stop_cleanly(*sides) -> None:
    for roles in sides:
        codes = roles.stop_all()
        assert set(codes.values()) == {0}, f"roles did not stop cleanly: {codes}\n{roles.logs()}"


def record_site(site: Site, fault: str, sent: list[str], recover_s: float, started: float, notes: str) -> Tally:
    """Count frames in against final verdicts out, record the row, and check nothing was lost or repeated."""
    tally = Tally.of(sent, finals(site.client, KEYS))
    record(FaultFigures(
        fault=fault, unit="frames", items_in=tally.frames_in, delivered=tally.final_verdicts, lost=len(tally.lost),
        duplicates=tally.duplicates, deduplicated=upstream_repeats(site.client, KEYS),
        dead_lettered=len(dead_letters(site.client, KEYS)), recover_s=recover_s, test_s=time.monotonic() - started,
        notes=notes))
    assert tally.lost == () and tally.duplicates == 0 and tally.unexpected == ()
    return tally


# --- 8. the link to the GPU host is cut ----------------------------------------------------------------


def test_link_cut_for_10_s_falls_back_and_the_cloud_worker_reconnects(site, tmp_path) -> None:
    started = time.monotonic()
    timeout_s, down_s = 6.0, 10.0  # a timeout a loaded machine's cloud job meets; an outage well past it
    settings = dict(switcher__offload_all=True, cloud__batch_size=4, alerts__cloud_timeout_s=timeout_s)
    edge, cloud = start_site(site, tmp_path, **settings)
    with edge, cloud, FramePump(site.client, KEYS, "cam8", period_s=0.5) as pump:
        assert wait_for(lambda: new_cloud_verdict(site, pump.ids()), 60), cloud.logs()
        burst = push_frames(site.client, KEYS, 8, camera="cam8b", size=(320, 240))  # two cloud jobs' worth
        assert wait_for(lambda: set(burst) <= offload_round_trips(site.client, KEYS)[0], 30, 0.01), edge.logs()
        before = cloud_connections(site)
        site.link.cut()                         # as soon as the edge has offloaded them
        cut_at = time.monotonic()
        answered = offload_round_trips(site.client, KEYS)[1]  # read after the cut: nothing more can arrive
        in_flight = [f for f in pump.ids() + burst if f not in answered]
        time.sleep(down_s)                      # the outage itself, not a wait for a condition
        during = pump.ids(cut_at, time.monotonic())
        decided_in_outage = [f for f, by in decided(site).items() if by is Decider.EDGE_TIMEOUT]
        site.link.restore()
        back_at = time.monotonic()
        assert wait_for(lambda: new_cloud_verdict(site, pump.ids(back_at)), 60), cloud.logs()
        recover_s = time.monotonic() - back_at
        after, reconnected = pump.ids(back_at), cloud_connections(site) - before
        sent = pump.stop() + burst
        assert wait_for(lambda: all_decided(site, sent), 60), edge.logs() + cloud.logs()
        time.sleep(1.0)                         # room for a late duplicate to show up
        stop_cleanly(edge, cloud)
    got, by = finals(site.client, KEYS), decided(site)
    record_site(site, "8. link to the GPU host cut for 10 s (ip link set down) with offloads in flight", sent,
                recover_s, started,
                f"{len(in_flight)} offloads in flight at the cut and {len(during)} frames sent during it: "
                f"{deciders(site, in_flight + during)}, at cloud_timeout_s={timeout_s:g}; the cloud worker "
                f"(TLS, ACL user cloud) reconnected by itself (new connections: {len(reconnected)}) and scored "
                f"new frames; all {len(sent)}: {deciders(site, sent)}")
    assert in_flight and during and decided_in_outage             # edge decisions went on during the cut
    assert {by[f] for f in in_flight} <= {Decider.EDGE_TIMEOUT, Decider.EDGE_SHED}
    assert any(by[f] is Decider.CLOUD for f in after) and reconnected   # over new connections
    late = [v for v in got if v.decided_by is Decider.EDGE_TIMEOUT]
    assert all(v.decided_at - v.captured_at >= timeout_s for v in late)


# --- 9. the link is slow and lossy ---------------------------------------------------------------------


def pump_for(site: Site, camera: str, seconds: float, period_s: float = 0.5, burst: int = 1) -> list[str]:
    """``burst`` frames every ``period_s`` for ``seconds`` (the load itself); their ids."""
    with FramePump(site.client, KEYS, camera, period_s=period_s, burst=burst) as pump:
        time.sleep(seconds)
    return pump.ids()


def drop_connections(site: Site, proxy: DelayProxy, gaps: tuple[float, ...]) -> tuple[list[str], float]:
    """Frames at 2 fps while the proxy breaks every connection after each gap (resets, the last one
    silently), until a frame sent after the last drop is decided by the cloud: the frames, and that time."""
    with FramePump(site.client, KEYS, "cam9c", period_s=0.5) as pump:
        for i, gap in enumerate(gaps):
            time.sleep(gap)
            assert proxy.drop_all(silent=i == len(gaps) - 1) > 0
        last = time.monotonic()
        assert wait_for(lambda: new_cloud_verdict(site, pump.ids(last)), 60), \
            f"{deciders(site, pump.ids(last))}\n{site.client.hgetall(KEYS.cloud_service())}"
        recover_s = time.monotonic() - last
    return pump.ids(), recover_s


def phase_figures(site: Site, frames: list[str]) -> dict[str, float]:
    """Offload round trips (p50, p99, seconds) and the share of offloads that timed out, of ``frames``."""
    offloaded, trips = offload_round_trips(site.client, KEYS)
    by = decided(site)
    sent = [f for f in frames if f in offloaded]
    rtts = [trips[f] for f in sent if f in trips]
    timed_out = sum(by.get(f) is Decider.EDGE_TIMEOUT for f in sent)
    return {"offloaded": len(sent), "answered": len(rtts), "p50": float(np.percentile(rtts, 50)) if rtts else 0.0,
            "p99": float(np.percentile(rtts, 99)) if rtts else 0.0, "timeouts": timed_out / max(1, len(sent)),
            "shed": sum(by.get(f) is Decider.EDGE_SHED for f in frames)}


def describe(name: str, fig: dict[str, float]) -> str:
    return (f"{name}: offload round trip p50 {fig['p50']:.2f} s / p99 {fig['p99']:.2f} s, "
            f"{fig['timeouts']:.0%} of {fig['offloaded']} offloads timed out")


def test_slow_lossy_link_keeps_every_verdict_once(site, tmp_path) -> None:
    started = time.monotonic()
    timeout_s, delay_s = 12.0, 0.15  # room for a job of ~17 round trips of 300 ms on a loaded machine
    settings = dict(switcher__offload_all=True, cloud__batch_size=4, alerts__cloud_timeout_s=timeout_s)
    rng = random.Random(9)
    with DelayProxy(site.link.edge_ns, site.link.edge_ip, (site.link.edge_ip, TLS_PORT)) as proxy:
        edge, cloud = start_site(site, tmp_path, cloud_port=proxy.port, **settings)
        with edge, cloud:
            warm = push_frames(site.client, KEYS, 4, camera="cam9w", size=(320, 240))
            assert wait_for(lambda: all_decided(site, warm), 60), cloud.logs()
            site.link.rate_limit("2mbit")
            slow = pump_for(site, "cam9a", 3.0)
            assert wait_for(lambda: all_decided(site, slow), 60), edge.logs() + cloud.logs()
            site.link.unlimited()
            proxy.delay_s = delay_s
            delayed = pump_for(site, "cam9b", 8.5, period_s=4.0, burst=4)  # 4-frame jobs, 3 of them
            assert wait_for(lambda: all_decided(site, delayed), 60), edge.logs() + cloud.logs()
            proxy.delay_s = 0.0
            broken, recover_s = drop_connections(site, proxy, tuple(rng.uniform(0.8, 1.2) for _ in range(3)))
            sent = warm + slow + delayed + broken
            assert wait_for(lambda: all_decided(site, sent), 60), edge.logs() + cloud.logs()
            time.sleep(1.0)                     # room for a late duplicate to show up
            stop_cleanly(edge, cloud)
    figs = {name: phase_figures(site, frames) for name, frames in
            (("2 Mbit/s", slow), ("150 ms", delayed), ("drops", broken))}
    record_site(site, "9. slow link: 2 Mbit/s (tc tbf), then 150 ms each way and connection resets (TCP proxy)",
                sent, recover_s, started,
                f"{describe('2 Mbit/s', figs['2 Mbit/s'])}; {describe('150 ms each way', figs['150 ms'])}; "
                f"{describe(f'{proxy.dropped} connections broken (2 resets, then 1 silent drop)', figs['drops'])}; "
                f"cloud_timeout_s={timeout_s:g}, 2 frames/s of 320x240 (59 KB; 4 every 4 s with the delay); "
                f"{sum(f['shed'] for f in figs.values())} kept on the edge by backpressure; "
                f"one cloud worker process throughout, exit code 0 at the end")
    assert figs["2 Mbit/s"]["answered"] and figs["150 ms"]["answered"]
    assert proxy.dropped >= 3

"""Fault 10: the Redis primary is SIGKILLed mid-stream and Sentinel promotes its replica.

A primary, a replica and three sentinels on loopback ports (tests/sentinel.py); every role finds the
primary through ``redis.sentinel``. Replication is asynchronous, so frames written in the last moment
before the kill may be lost (counted); alert events, the notification outbox and acknowledgements
WAIT for the replica, so none of them may be lost.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from fallwatch.keys import Keys
from fallwatch.redis import connect
from fallwatch.schemas import CameraState, CameraStatus, EventType
from fallwatch.settings import RedisSettings
from fallwatch.webhook import WebhookReceiver
from tests.faults import (FaultFigures, Roles, Tally, beat_again, events, finals, frame_ids_in, nothing_owed,
                          record, upstream_repeats, wait_new_final, wait_up)
from tests.helpers import plant, wait_for
from tests.ingest_media import write_yolo
from tests.sentinel import MASTER, SentinelSet

pytestmark = [pytest.mark.fault, pytest.mark.slow]

KEYS = Keys()


def logged_events(output: str) -> set[tuple[str, str]]:
    """(event id, type) of every ``alert_event`` log line: events whose write (and WAIT) completed."""
    out = set()
    for line in output.splitlines():
        if '"alert_event"' in line:
            rec = json.loads(line)
            out.add((rec["event_id"], rec["type"]))
    return out


def test_primary_killed_sentinel_fails_over_and_no_event_or_notification_is_lost(tmp_path) -> None:
    started = time.monotonic()
    write_yolo(tmp_path / "ds", "valid", [0, 1, None, 1, 0, 1, 1, None])
    with SentinelSet() as redis_set, WebhookReceiver() as hook:
        client = connect(RedisSettings(sentinel={"addresses": redis_set.addresses, "master_name": MASTER},
                                       socket_timeout_s=10, retry_attempts=20, retry_cap_s=0.5))
        settings = dict(switcher__offload_all=True, cloud__batch_size=4, alerts__cloud_timeout_s=10,
                        alerts__debounce_k=1, alerts__debounce_n=1, alerts__cooldown_s=0, alerts__quiet_s=2,
                        notifications__urls=[hook.url()], notifications__retry_base_s=0.2,
                        notifications__retry_cap_s=1.0, alerts__offline_grace_s=0, **redis_set.settings())
        with Roles(None, tmp_path, **settings) as roles:
            roles.start("edge", "edge", "--name", "edge-1")
            roles.start("cloud", "cloud", "--name", "cloud-1")
            roles.start("alerts", "alerts", "--name", "alerts-1")
            roles.start("replay", "replay", "--dataset", str(tmp_path / "ds"), "--loop", "--fps", "4",
                        "--camera-id", "cam3")  # waits for the edge group by itself
            wait_up(client, KEYS, roles, ("edge", "edge-1"), ("cloud", "cloud-1"), ("alerts", "alerts-1"))
            assert wait_for(lambda: len(finals(client, KEYS)) >= 4, 60), roles.logs()
            plant(client, KEYS.camera_status_stream(), CameraStatus(camera_id="cam9", state=CameraState.OFFLINE))
            assert wait_for(lambda: hook.count() >= 1, 30), roles.logs()
            killed_at, killed_wall = redis_set.kill_primary(), time.time()
            assert redis_set.wait_failover(60), "no failover"
            failover_s = time.monotonic() - killed_at
            verdict_s = wait_new_final(client, KEYS, roles, killed_wall) - killed_at
            plant(client, KEYS.camera_status_stream(), CameraStatus(camera_id="cam8", state=CameraState.OFFLINE))
            beat_again(client, KEYS, roles, ("edge", "edge-1"), ("cloud", "cloud-1"), ("alerts", "alerts-1"))
            n_after = client.xlen(KEYS.frames_stream())
            assert wait_for(lambda: client.xlen(KEYS.frames_stream()) >= n_after + 4, 60), roles.logs()
            assert roles["replay"].stop() == 0, roles.logs()
            sent = frame_ids_in(client, KEYS)
            assert wait_for(lambda: {v.frame_id for v in finals(client, KEYS)} >= set(sent), 60), roles.logs()
            starts = lambda: [e for e in events(client, KEYS) if e.type is EventType.START]  # noqa: E731
            # the fall and the two cameras offline (at once: no grace period), each delivered
            assert wait_for(lambda: nothing_owed(client, KEYS) and hook.unique() >= len(starts()) >= 3, 30), roles.logs()
            time.sleep(0.5)  # room for a late repeat
            codes = roles.stop_all()
        logged = logged_events(roles["alerts"].output())
        kept = {(e.event_id, e.type.value) for e in events(client, KEYS)}
        notified, unique = hook.count(), hook.unique()
        n_starts = len(starts())
        got, repeats = finals(client, KEYS), upstream_repeats(client, KEYS)
        client.close()
    replayed = int(re.search(r"replayed (\d+) items", roles["replay"].output()).group(1))
    tally = Tally.of(sent, got)
    lost_frames = replayed - tally.frames_in
    record(FaultFigures(
        fault="10. Redis primary SIGKILLed, Sentinel fails over to the replica", unit="frames",
        items_in=replayed, delivered=tally.final_verdicts, lost=len(tally.lost), duplicates=tally.duplicates,
        deduplicated=repeats, dropped_by_design=lost_frames,
        recover_s=verdict_s, test_s=time.monotonic() - started,
        notes=f"failover {failover_s:.1f} s after the kill (down-after-milliseconds 1000), first new final "
              f"verdict {verdict_s:.1f} s; {lost_frames} frames lost with the old primary (asynchronous "
              f"replication); {len(logged)} alert events written, {len(logged - kept)} lost; "
              f"{n_starts} events notified {unique} times ({notified - unique} repeats, same idempotency key)"))
    assert not (logged - kept), f"alert events lost: {logged - kept}"
    assert unique == n_starts                      # every owed notification delivered, once per key
    assert tally.lost == () and tally.duplicates == 0 and tally.unexpected == ()
    bad = {name: code for name, code in codes.items() if name != "replay" and code != 0}
    assert not bad, f"roles did not stop cleanly: {bad}\n{roles.logs()}"

"""Notifications: a real local webhook, the durable outbox, backoff, exactly-once, secrets, cooldown."""

from __future__ import annotations

import base64
import io
import logging
import time
from pathlib import Path

import pytest
import redis
import structlog

from alerts.notify import (AppriseChannel, Delivery, DeliveryStatus, MemoryCooldowns, NotificationChannel, Notifier,
                           NotifierStepReport, backoff_s, channel_id, compose)
from alerts.service import AlertsService
from tests.helpers import FakeClock, edge_verdict, free_port, plant, read_all, wait_for
from fallwatch import logging as fw_logging
from fallwatch.keys import Keys
from fallwatch.schemas import AlertEvent, DeadLetter, Decider, EventKind, EventType, encode
from fallwatch.settings import Settings
from fallwatch.webhook import WebhookReceiver

T0 = time.time()


@pytest.fixture
def hook():
    with WebhookReceiver() as receiver:
        yield receiver


def make_settings(redis_url: str, urls: list[str], cam_urls: list[str] = (), **notifications) -> Settings:
    notif = {"urls": urls, "retry_base_s": 0.2, "retry_cap_s": 0.8, "timeout_s": 0.1, **notifications}
    return Settings(redis={"url": redis_url}, notifications=notif,
                    cameras=[{"id": "cam1", "name": "Room 12", "url": "rtsp://cam.local/1", "notify": list(cam_urls)}])


def start_fall_event(settings: Settings, r: redis.Redis, keys: Keys) -> AlertEvent:
    plant(r, keys.verdicts_stream(), edge_verdict("cam1:0", T0, 0.91), edge_verdict("cam1:1", T0 + 0.5, 0.87))
    [event] = AlertsService(settings, r, keys, name="alerts", clock=FakeClock(T0 + 1)).step().events
    assert event.type is EventType.START
    return event


def test_notification_reaches_the_webhook(redis_url, r, keys, hook) -> None:
    settings = make_settings(redis_url, [f"json://127.0.0.1:{hook.port}/hook"])
    event = start_fall_event(settings, r, keys)
    notifier = Notifier(settings, r, keys, "n1")
    assert notifier.outbox_size() == 1
    rep = notifier.step()
    assert rep.delivered == 1 and rep.failed == 0
    [got] = hook.received
    assert got["title"] == "Fall detected: Room 12"
    assert "Room 12" in got["message"] and "Confidence 91%" in got["message"]
    assert "edge model" in got["message"] and event.event_id in got["message"]
    assert notifier.outbox_size() == 0
    channel = channel_id(f"json://127.0.0.1:{hook.port}/hook")
    assert r.get(keys.delivered(event.event_id, channel)) == b"delivered"
    assert notifier.step().attempts == 0 and len(hook.received) == 1


def next_attempt(notifier: Notifier, timeout: float = 20.0) -> tuple[NotifierStepReport, float]:
    """Step until an attempt is made; the report and how long after the call it came."""
    start, reps = time.monotonic(), []
    assert wait_for(lambda: reps.append(notifier.step()) or reps[-1].attempts, timeout, interval=0.02)
    return reps[-1], time.monotonic() - start


def test_webhook_down_is_retried_with_backoff_and_delivered_once(redis_url, r, keys) -> None:
    port = free_port()  # nothing listens here until the receiver starts
    settings = make_settings(redis_url, [f"json://127.0.0.1:{port}/hook"], retry_base_s=0.5, retry_cap_s=2.0)
    start_fall_event(settings, r, keys)
    notifier = Notifier(settings, r, keys, "n1")
    hook = None
    try:
        assert notifier.step().failed == 1
        rep, waited = next_attempt(notifier)
        assert (rep.retried, rep.failed) == (1, 1) and waited >= 0.4    # backoff 0.5 s, then 1.0 s
        rep, waited = next_attempt(notifier)
        assert (rep.retried, rep.failed) == (1, 1) and waited >= 0.9    # third attempt; next backoff 2.0 s
        assert notifier.outbox_size() == 1
        pending = r.xpending_range(keys.notify_outbox_stream(), keys.notify_group(), "-", "+", 10)
        assert [p["times_delivered"] for p in pending] == [3]
        hook = WebhookReceiver(port=port).start()
        rep, waited = next_attempt(notifier)
        assert rep.delivered == 1 and waited >= 1.9
        for _ in range(3):
            assert notifier.step().attempts == 0
        assert len(hook.received) == 1 and notifier.outbox_size() == 0
    finally:
        if hook is not None:
            hook.stop()


def test_backoff_is_capped_exponential_and_never_below_the_timeout(redis_url) -> None:
    cfg = make_settings(redis_url, [], retry_base_s=1.0, retry_cap_s=10.0, timeout_s=1.5).notifications
    assert [backoff_s(a, cfg) for a in range(1, 7)] == [1.5, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_a_dead_notifiers_delivery_is_taken_over(redis_url, r, keys, hook) -> None:
    settings = make_settings(redis_url, [f"json://127.0.0.1:{hook.port}/hook"])
    start_fall_event(settings, r, keys)
    Notifier(settings, r, keys, "n1").setup()
    r.xreadgroup(keys.notify_group(), "crashed", {keys.notify_outbox_stream(): ">"}, count=10)
    other = Notifier(settings, r, keys, "n2")
    rep, _waited = next_attempt(other)
    assert (rep.retried, rep.delivered) == (1, 1) and len(hook.received) == 1


def test_secrets_never_appear_in_logs_or_redis(redis_url, r, keys, hook) -> None:
    good = f"json://carer:S3cretPass@127.0.0.1:{hook.port}/hook-Tok3nXYZ"
    bad = f"json://127.0.0.1:{free_port()}/cam-Pr1vateTok"
    settings = make_settings(redis_url, [good], cam_urls=[bad])
    buf = io.StringIO()
    root, old_cfg = logging.getLogger(), structlog.get_config()
    old_handlers, old_level = root.handlers[:], root.level
    try:
        fw_logging.configure("debug", "json", stream=buf)
        root.setLevel(logging.DEBUG)  # let apprise and urllib3 log everything they would
        start_fall_event(settings, r, keys)
        notifier = Notifier(settings, r, keys, "n1")
        rep = notifier.step()
        next_attempt(notifier)  # the failing one once more, after its backoff
    finally:
        structlog.configure(**old_cfg)
        root.handlers[:], root.level = old_handlers, old_level
    assert (rep.delivered, rep.failed) == (1, 1)
    assert len(hook.received) == 1  # through the URL holding the secrets
    text = buf.getvalue()
    assert "notification_sent" in text and "notification_failed" in text and "apprise" in text.lower()
    for secret in ("S3cretPass", "Tok3nXYZ", "Pr1vateTok"):
        assert secret not in text
    stored = b" ".join(repr(r.xrange(k)).encode() for k in r.scan_iter() if r.type(k) == b"stream")
    stored += b" ".join(r.scan_iter())
    assert b"Tok3n" not in stored and b"S3cret" not in stored and b"Pr1vate" not in stored


def test_snapshot_attachment_when_enabled(redis_url, r, keys, hook) -> None:
    settings = make_settings(redis_url, [f"json://127.0.0.1:{hook.port}/hook"], snapshot=True)
    r.hset(keys.pixels("cam1:1"), mapping={"p0": b"\xff\xd8jpeg-bytes"})
    start_fall_event(settings, r, keys)
    assert Notifier(settings, r, keys, "n1").step().delivered == 1
    [att] = hook.received[0]["attachments"]
    assert base64.b64decode(att["base64"]) == b"\xff\xd8jpeg-bytes"


class Recorder(NotificationChannel):
    def __init__(self, name: str, cooldown_s: float = 0.0, broken: bool = False):
        super().__init__(name, cooldown_s)
        self.sent: list[Delivery] = []
        self.broken = broken

    def deliver(self, note: Delivery, attachment: Path | None = None) -> bool:
        if self.broken:
            raise ConnectionError("service exploded")
        self.sent.append(note)
        return True


def delivery(event_id: str, channel: str, camera: str = "cam1") -> Delivery:
    return Delivery(event_id=event_id, channel=channel, camera_id=camera, kind=EventKind.FALL, title="t", body="b")


def test_channel_cooldown_and_broken_channels(settings, r, keys) -> None:
    rec, broken = Recorder("rec", cooldown_s=60), Recorder("broken", broken=True)
    outbox = keys.notify_outbox_stream()
    for d in (delivery("e1", "rec"), delivery("e2", "rec"), delivery("e3", "rec", camera="cam2"),
              delivery("e4", "broken")):
        r.xadd(outbox, encode(d))
    rep = Notifier(settings, r, keys, "n1", channels={"rec": rec, "broken": broken}).step()
    assert (rep.delivered, rep.suppressed, rep.failed) == (2, 1, 1)
    assert [d.event_id for d in rec.sent] == ["e1", "e3"]
    assert r.get(keys.delivered("e2", "rec")) == DeliveryStatus.SUPPRESSED.value.encode()
    assert r.xlen(outbox) == 1  # only the failed one is still owed


def test_cooldown_is_kept_in_redis_across_notifier_restarts(settings, r, keys) -> None:
    outbox = keys.notify_outbox_stream()
    r.xadd(outbox, encode(delivery("e1", "rec")))
    first = Recorder("rec", cooldown_s=60)
    assert Notifier(settings, r, keys, "n1", channels={"rec": first}).step().delivered == 1
    cooldown = keys.notify_cooldown("rec", "cam1", EventKind.FALL.value)
    assert r.get(cooldown) == b"e1" and 59_000 < r.pttl(cooldown) <= 60_000

    restarted = Recorder("rec", cooldown_s=60)  # a new process: nothing in memory
    r.xadd(outbox, encode(delivery("e2", "rec")))
    r.xadd(outbox, encode(delivery("e3", "rec", camera="cam2")))
    rep = Notifier(settings, r, keys, "n2", channels={"rec": restarted}).step()
    assert (rep.delivered, rep.suppressed) == (1, 1)
    assert [d.event_id for d in restarted.sent] == ["e3"]

    r.delete(cooldown)  # the quiet period is over
    r.xadd(outbox, encode(delivery("e4", "rec")))
    assert Notifier(settings, r, keys, "n3", channels={"rec": restarted}).step().delivered == 1


def test_a_channel_on_its_own_keeps_cooldowns_in_memory() -> None:
    clock = FakeClock()
    rec = Recorder("rec", cooldown_s=30)
    rec.cooldowns = MemoryCooldowns(clock)
    assert rec.send(delivery("e1", "rec")) is DeliveryStatus.DELIVERED
    clock.advance(29)
    assert rec.send(delivery("e2", "rec")) is DeliveryStatus.SUPPRESSED
    assert rec.send(delivery("e3", "rec", camera="cam2")) is DeliveryStatus.DELIVERED
    clock.advance(2)
    assert rec.send(delivery("e4", "rec")) is DeliveryStatus.DELIVERED
    assert [d.event_id for d in rec.sent] == ["e1", "e3", "e4"]
    assert Recorder("quiet", cooldown_s=0).send(delivery("e5", "quiet")) is DeliveryStatus.DELIVERED


def test_bad_outbox_entries_are_dead_lettered(settings, r, keys) -> None:
    outbox = keys.notify_outbox_stream()
    r.xadd(outbox, {"x": "1"})
    r.xadd(outbox, encode(delivery("e1", "gone")))
    rep = Notifier(settings, r, keys, "n1", channels={}).step()
    assert rep.dead_letters == 2 and r.xlen(outbox) == 0
    reasons = [m.reason for m in read_all(r, keys.dead_letter_stream()) if isinstance(m, DeadLetter)]
    assert reasons == ["schema_error", "unknown_channel"]


def test_message_texts() -> None:
    fall = AlertEvent(type=EventType.START, kind=EventKind.FALL, camera_id="c", camera_name="Hall",
                      started_at=T0, confidence=0.734, decided_by=Decider.CLOUD)
    title, body = compose(fall)
    assert title == "Fall detected: Hall" and "Confidence 73%" in body and "cloud model" in body
    off = AlertEvent(type=EventType.START, kind=EventKind.CAMERA_OFFLINE, camera_id="c", started_at=T0,
                     description="no frames for 5 s")
    title, body = compose(off)
    assert title == "Camera offline: c" and "no frames for 5 s" in body


def test_apprise_channel_rejects_unknown_schemes() -> None:
    from pydantic import SecretStr

    with pytest.raises(ValueError, match="unknown notification scheme"):
        AppriseChannel(SecretStr("nosuchscheme://token@host"))


def test_message_texts_name_the_configured_models(settings) -> None:
    fall = AlertEvent(type=EventType.START, kind=EventKind.FALL, camera_id="c", started_at=T0, confidence=0.9,
                      decided_by=Decider.CLOUD)
    assert "cloud model (LLaVA-NeXT-Video-7B-hf)" in compose(fall, settings)[1]
    swapped = settings.model_copy(update={"cloud": settings.cloud.model_copy(update={"model": "/models/qwen-vl"}),
                                          "edge": settings.edge.model_copy(update={"model": "org/siglip-fall"})})
    assert "cloud model (qwen-vl)" in compose(fall, swapped)[1]
    edge = fall.model_copy(update={"decided_by": Decider.EDGE})
    assert "edge model (siglip-fall)" in compose(edge, swapped)[1]


class CrashBeforeMarker:
    """A client whose first SET (the delivered marker) fails as a crash right after sending would."""

    def __init__(self, client: redis.Redis):
        self._client, self.crashed = client, False

    def set(self, *args, **kwargs):
        if not self.crashed:
            self.crashed = True
            raise redis.ConnectionError("crashed between sending and the delivered marker")
        return self._client.set(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_a_repeat_after_a_crash_before_the_marker_carries_the_same_idempotency_key(redis_url, r, keys, hook) -> None:
    settings = make_settings(redis_url, [f"json://127.0.0.1:{hook.port}/hook"])
    event = start_fall_event(settings, r, keys)
    first = Notifier(settings, r, keys, "n1")
    first.client = CrashBeforeMarker(r)
    with pytest.raises(redis.ConnectionError):
        first.step()
    rep, _waited = next_attempt(Notifier(settings, r, keys, "n2"))  # takes the entry over, sends again
    assert rep.delivered == 1 and len(hook.received) == 2
    channel = channel_id(f"json://127.0.0.1:{hook.port}/hook")
    key = f"{event.event_id}:{channel}"
    assert hook.idempotency_keys == [key, key]
    assert [m["idempotency_key"] for m in hook.received] == [key, key]
    assert hook.unique() == 1

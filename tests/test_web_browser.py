"""The caregiver station in a real browser: headless Debian chromium driven by Playwright, against a
real `fallwatch web` process and a real Redis started here. Screenshots go to the test's output
folder (and to $FALLWATCH_WEB_SCREENSHOTS when set, e.g. docs/img); any JavaScript error fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from alerts.store import write_event
from fallwatch.keys import Keys
from fallwatch.redis import EmbeddedRedis
from fallwatch.schemas import AlertEvent, Decider, EventKind, EventOutcome, EventType
from ingest.status import StatusReporter
from tests.helpers import free_port, wait_for
from tests.web_helpers import PASSWORD, write_users

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--disable-quic"]
LIVE_S = 2.0  # what the page promises: a change shows within 2 s, without a reload
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (web extra)")
if CHROMIUM is None:
    pytest.skip("chromium is not installed and could not be (scripts/install-test-deps.sh installs it)",
                allow_module_level=True)


class Station:
    def __init__(self, url: str, client: redis.Redis, keys: Keys, out: Path):
        self.url, self.client, self.keys, self.out = url, client, keys, out

    def publish_fall(self, camera: str = "room-12", name: str = "Room 12") -> AlertEvent:
        """An event as the alerts service writes it: record, index, XADD to the alerts stream, PUBLISH."""
        now = time.time()
        ev = AlertEvent(type=EventType.START, kind=EventKind.FALL, camera_id=camera, camera_name=name,
                        started_at=now, at=now, confidence=0.91, decided_by=Decider.EDGE_TIMEOUT,
                        frame_ids=[f"{camera}:1", f"{camera}:2"])
        with self.client.pipeline(transaction=True) as pipe:
            write_event(pipe, self.keys, ev, active=True, maxlen=1000)
            pipe.execute()
        return ev

    def event(self, event_id: str) -> AlertEvent:
        return AlertEvent.from_json(self.client.hget(self.keys.event(event_id), "m"))


@pytest.fixture(scope="module")
def station(tmp_path_factory) -> Iterator[Station]:
    work = Path(tempfile.mkdtemp(prefix="fw-web-"))  # short: the Redis socket lives here
    server = EmbeddedRedis(work / "redis", appendonly=False).start()
    users = write_users(work / "users.yaml")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALLWATCH_")}
    env.update({"FALLWATCH_REDIS__URL": server.url, "FALLWATCH_WEB__USERS_FILE": str(users),
                "FALLWATCH_WEB__PORT": str(port), "FALLWATCH_METRICS__PORT": "0",
                "FALLWATCH_WEB__CAMERA_REFRESH_S": "0.5", "FALLWATCH_LOGGING__FORMAT": "json"})
    log = open(work / "web.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "fallwatch", "web"], env=env, stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis.from_url(server.url)
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        def up() -> bool:
            try:
                return urllib.request.urlopen(f"{url}/login", timeout=2).status == 200
            except OSError:
                return proc.poll() is not None
        assert wait_for(up, timeout=60, interval=0.2) and proc.poll() is None, (work / "web.log").read_text()[-3000:]
        yield Station(url, client, Keys(), tmp_path_factory.mktemp("web-screens"))
    finally:
        proc.terminate()  # with browsers' event streams still open
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "killed after 15 s"
        log.close()
        client.close()
        server.stop()
        text = (work / "web.log").read_text()
        shutil.rmtree(work, ignore_errors=True)
    # uvicorn re-raises the SIGTERM it handled once it has shut down: -15 is its clean exit
    assert code in (0, -15) and "graceful shutdown exceeded" not in text, (code, text[-3000:])


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


@pytest.fixture
def js_errors() -> Iterator[list[str]]:
    """Uncaught exceptions and console errors of every page a test opens (network statuses aside)."""
    errors: list[str] = []
    yield errors
    assert errors == [], f"the page logged JavaScript errors: {errors}"


@pytest.fixture
def open_page(browser, station, js_errors):
    contexts = []

    def make(user: str | None = None, width: int = 1280, height: int = 860):
        ctx = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(ctx)
        page = ctx.new_page()
        page.on("pageerror", lambda exc: js_errors.append(f"{page.url}: {exc}"))
        page.on("console", lambda msg: msg.type == "error" and "Failed to load resource" not in msg.text
                and js_errors.append(f"{page.url}: {msg.text}"))
        page.set_default_timeout(10_000)
        if user is not None:
            sign_in(page, station, user)
        return page

    yield make
    for ctx in contexts:
        ctx.close()


def sign_in(page, station: Station, user: str, password: str = PASSWORD) -> None:
    page.goto(f"{station.url}/")
    page.wait_for_url("**/login")
    page.fill("#name", user)
    page.fill("#password", password)
    page.click("#submit")
    page.wait_for_url(f"{station.url}/")
    page.wait_for_selector("#live.on")


def card(page, event_id: str):
    return page.locator(f'article[data-event="{event_id}"]')


def test_1_a_new_fall_appears_within_2_s_without_reload(open_page, station):
    page = open_page("carol")
    page.evaluate("window.__marker = 'same document'")
    ev = station.publish_fall()
    t0 = time.monotonic()
    card(page, ev.event_id).wait_for(timeout=LIVE_S * 1000)
    assert time.monotonic() - t0 <= LIVE_S
    assert page.evaluate("window.__marker") == "same document"  # no reload
    text = card(page, ev.event_id).inner_text()
    assert "Room 12" in text and "confidence 91%" in text and "the cloud did not answer in time" in text
    assert page.locator("#banner").is_visible() and "FALL: Room 12" in page.locator("#banner").inner_text()
    assert page.title().startswith("(") and "FALL: Room 12" in page.title()


def test_2_acknowledged_on_one_screen_shows_on_another_within_2_s(open_page, station):
    ev = station.publish_fall(camera="room-14", name="Room 14")
    carol, cara = open_page("carol"), open_page("cara")
    for page in (carol, cara):
        card(page, ev.event_id).wait_for(timeout=LIVE_S * 1000)
    card(carol, ev.event_id).locator('[data-action="ack"]').click()
    t0 = time.monotonic()
    cara.wait_for_function(
        "id => (document.querySelector(`article[data-event='${id}'] [data-state]`) || {}).textContent?.includes('carol is going')",
        arg=ev.event_id, timeout=LIVE_S * 1000)
    assert time.monotonic() - t0 <= LIVE_S
    stored = station.event(ev.event_id)
    assert stored.acknowledged_by == "carol" and stored.ack_source == "web"
    assert card(cara, ev.event_id).locator('[data-action="ack"]').count() == 0


def test_3_resolve_as_false_alarm_stores_outcome_with_user_and_time(open_page, station):
    ev = station.publish_fall(camera="room-15", name="Room 15")
    page = open_page("carol")
    c = card(page, ev.event_id)
    c.wait_for(timeout=LIVE_S * 1000)
    c.locator('input[value="false_alarm"]').check()
    c.locator("textarea").fill("bag fell off the chair")
    before = time.time()
    c.locator('[data-action="resolve"]').click()
    c.wait_for(state="detached", timeout=LIVE_S * 1000)
    stored = station.event(ev.event_id)
    assert stored.outcome is EventOutcome.FALSE_ALARM and stored.resolved_by == "carol"
    assert before - 1 <= stored.resolved_at <= time.time() and stored.outcome_note == "bag fell off the chair"
    assert station.client.xlen(station.keys.outcomes_stream()) >= 1
    page.wait_for_function(
        "id => (document.querySelector(`#history tr[data-event='${id}']`) || {}).textContent?.includes('false alarm')",
        arg=ev.event_id, timeout=LIVE_S * 1000)
    page.locator(f'#history tr[data-event="{ev.event_id}"]').click()
    assert "resolved as false alarm by carol" in page.locator("#history tr.detail").inner_text()


def test_4_a_camera_going_offline_shows_on_its_tile_within_2_s(open_page, station):
    rep = StatusReporter(station.client, station.keys, "garden", name="Garden door")
    rep.online(fps=2.0)
    station.client.hset(station.keys.camera_info("garden"), "last_frame_at", time.time())
    page = open_page("cara")
    tile = page.locator('.tile[data-camera="garden"]')
    tile.wait_for(timeout=5000)
    assert "Online" in tile.inner_text()
    rep.offline("connection refused")
    t0 = time.monotonic()
    page.wait_for_selector('.tile.offline[data-camera="garden"]', timeout=LIVE_S * 1000)
    assert time.monotonic() - t0 <= LIVE_S
    assert "Offline" in tile.inner_text() and "connection refused" in tile.inner_text()


def test_4b_a_camera_whose_frames_stop_turns_stale_without_any_message(open_page, station):
    rep = StatusReporter(station.client, station.keys, "porch", name="Porch")
    rep.online(fps=2.0)
    stale_after = 10.0  # fallwatch.status: twice ingest.read_timeout_s (5 s)
    station.client.hset(station.keys.camera_info("porch"), "last_frame_at", time.time() - stale_after + 6.0)
    page = open_page("cara")
    page.wait_for_selector('.tile.online[data-camera="porch"]', timeout=5000)
    page.wait_for_selector('.tile.stale[data-camera="porch"]', timeout=(6.0 + LIVE_S) * 1000)
    assert "No frames" in page.locator('.tile[data-camera="porch"]').inner_text()


def test_5_wrong_password_csrf_and_roles(open_page, station):
    page = open_page()
    page.goto(f"{station.url}/login")
    page.fill("#name", "carol")
    page.fill("#password", "not the password")
    page.click("#submit")
    page.wait_for_selector("#error:not(.hidden)")
    assert "wrong name or password" in page.inner_text("#error") and page.url.endswith("/login")
    sign_in(page, station, "carol")
    ev = station.publish_fall(camera="room-16", name="Room 16")
    res = page.request.post(f"{station.url}/api/events/{ev.event_id}/ack")  # the session cookie, no token
    assert res.status == 403 and "CSRF" in res.json()["detail"]
    assert not station.event(ev.event_id).acknowledged
    res = page.goto(f"{station.url}/admin")
    assert res.status == 403 and "needs the admin role" in page.inner_text("#forbidden")


def test_6_screenshots_desktop_phone_and_admin(open_page, station):
    station.publish_fall(camera="room-12", name="Room 12")
    rep = StatusReporter(station.client, station.keys, "room-12", name="Room 12")
    rep.online(fps=2.0)
    station.client.hset(station.keys.camera_info("room-12"), "last_frame_at", time.time())
    shots = {}
    desktop = open_page("carol")
    desktop.wait_for_selector("article.event")
    shots["caregiver-desktop.png"] = desktop
    phone = open_page("cara", width=390, height=844)
    phone.wait_for_selector("article.event")
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the phone layout scrolls sideways ({width} px)"
    shots["caregiver-phone.png"] = phone
    admin = open_page("adam")
    admin.goto(f"{station.url}/admin")
    admin.wait_for_selector("#redis dd")
    assert "MiB" in admin.inner_text("#redis") and "web" in admin.inner_text("#workers")
    shots["admin-desktop.png"] = admin
    extra = os.environ.get("FALLWATCH_WEB_SCREENSHOTS")
    for name, page in shots.items():
        page.screenshot(path=str(station.out / name), full_page=name == "admin-desktop.png")
        assert (station.out / name).stat().st_size > 10_000
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy(station.out / name, Path(extra) / name)


def test_cookie_is_secure_behind_a_trusted_tls_proxy(station):
    import httpx

    with httpx.Client(base_url=station.url) as c:
        token = c.get("/api/login-token").json()["csrf"]
        res = c.post("/api/login", json={"name": "carol", "password": PASSWORD},
                     headers={"X-CSRF-Token": token, "X-Forwarded-Proto": "https"})
        assert res.status_code == 200
        cookie = next(x for x in res.headers.get_list("set-cookie") if x.startswith("fw_session="))
        assert "Secure" in cookie and "HttpOnly" in cookie

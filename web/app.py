"""The caregiver station's FastAPI app: pages, the JSON API (OpenAPI at /api/openapi.json) and the
live event stream. Every route but the login page, its token and the static files needs a session;
the admin page and /api/status need the admin role; every state change needs the CSRF token."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import redis
import structlog
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from alerts.history import history, load_many, open_events
from alerts.store import BadTransition, EventNotFound, acknowledge, resolve
from fallwatch import __version__
from fallwatch.keys import Keys
from fallwatch.schemas import EventOutcome
from fallwatch.settings import Settings
from web.hub import Hub
from web.sessions import CSRF_HEADER, LOGIN_CSRF_COOKIE, SESSION_COOKIE, Session, Sessions, same, signing_key
from web.users import all_users, verify_password
from web.views import admin_view, cameras_view, event_view

log = structlog.get_logger(__name__)

STATIC = Path(__file__).parent / "static"
KEEPALIVE_S = 15.0
STATUS_EVERY_S = 5.0
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; media-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
}


class LoginBody(BaseModel):
    name: str = Field(..., min_length=1, max_length=64)
    password: str = Field(..., min_length=1, max_length=1024)


class ResolveBody(BaseModel):
    outcome: EventOutcome = Field(..., description="confirmed_fall, false_alarm or not_sure.")
    note: str = Field("", max_length=2000, description="Optional note (web.note_max_chars at most).")


class Me(BaseModel):
    name: str
    role: str
    csrf: str = Field(description="Send it back in the X-CSRF-Token header of every POST.")
    snapshots: bool
    version: str


class Web:
    """What the routes share: settings, Redis, sessions and the live hub."""

    def __init__(self, settings: Settings, client: redis.Redis, keys: Keys):
        self.settings, self.client, self.keys, self.cfg = settings, client, keys, settings.web
        self.sessions = Sessions(client, keys, self.cfg, signing_key(client, keys, self.cfg))
        self.hub = Hub(client, keys, lambda: cameras_view(client, keys, settings), self.cfg.camera_refresh_s)

    def secure(self, request: Request) -> bool:
        return self.cfg.secure_cookies == "always" or (self.cfg.secure_cookies == "auto" and request.url.scheme == "https")

    def session_of(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def event(self, event_id: str) -> dict[str, Any]:
        found = load_many(self.client, self.keys, [event_id])
        if not found:
            raise HTTPException(404, f"no event {event_id!r}")
        return event_view(found[0])


def _web(request: Request) -> Web:
    return request.app.state.web


def session(request: Request) -> Session:
    s = _web(request).session_of(request)
    if s is None:
        raise HTTPException(401, "sign in first")
    return s


def admin(s: Annotated[Session, Depends(session)]) -> Session:
    if not s.is_admin:
        raise HTTPException(403, "the admin role is needed")
    return s


def changing(request: Request, s: Annotated[Session, Depends(session)]) -> Session:
    """A state change: the session's CSRF token must come back in the X-CSRF-Token header."""
    if not same(request.headers.get(CSRF_HEADER), s.csrf):
        raise HTTPException(403, "missing or wrong CSRF token (X-CSRF-Token)")
    return s


def create_app(settings: Settings, client: redis.Redis, keys: Keys) -> FastAPI:
    web = Web(settings, client, keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        web.hub.start(asyncio.get_running_loop())
        yield
        await run_in_threadpool(web.hub.close)

    app = FastAPI(title="fallwatch caregiver station", version=__version__, lifespan=lifespan,
                  openapi_url="/api/openapi.json", docs_url=None, redoc_url=None)
    app.state.web = web
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        if request.url.path == "/api/openapi.json" and await run_in_threadpool(web.session_of, request) is None:
            response: Response = JSONResponse({"detail": "sign in first"}, status_code=401)
        else:
            response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if request.url.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    _pages(app, web)
    _auth_routes(app, web)
    _event_routes(app, web)
    _status_routes(app, web)
    return app


# --- pages -----------------------------------------------------------------------------------------


def _page(name: str, status: int = 200) -> FileResponse:
    return FileResponse(STATIC / name, status_code=status, headers={"Cache-Control": "no-store"})


def _pages(app: FastAPI, web: Web) -> None:
    @app.get("/", include_in_schema=False)
    def caregiver_page(request: Request) -> Response:
        return _page("index.html") if web.session_of(request) else RedirectResponse("/login", 303)

    @app.get("/admin", include_in_schema=False)
    def admin_page(request: Request) -> Response:
        s = web.session_of(request)
        if s is None:
            return RedirectResponse("/login", 303)
        return _page("admin.html") if s.is_admin else _page("forbidden.html", 403)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/login", include_in_schema=False)
    def login_page() -> Response:
        return _page("login.html")


# --- sign-in -----------------------------------------------------------------------------------------


def _client_addr(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _auth_routes(app: FastAPI, web: Web) -> None:
    @app.get("/api/login-token", tags=["auth"])
    def login_token(request: Request, response: Response) -> dict[str, str]:
        """A token for the login POST (sent back in X-CSRF-Token; a signed cookie holds its twin)."""
        token, cookie = web.sessions.login_token()
        response.set_cookie(LOGIN_CSRF_COOKIE, cookie, max_age=3600, httponly=True, samesite="strict",
                            secure=web.secure(request), path="/api/login")
        return {"csrf": token}

    @app.post("/api/login", tags=["auth"])
    def login(body: LoginBody, request: Request, response: Response) -> Me:
        """Sign in. Wrong name or password: 401; too many failures: 429 with Retry-After."""
        if not web.sessions.login_token_ok(request.cookies.get(LOGIN_CSRF_COOKIE), request.headers.get(CSRF_HEADER)):
            raise HTTPException(403, "missing or wrong CSRF token (get one from /api/login-token)")
        addr = _client_addr(request)
        wait = web.sessions.throttled(body.name, addr)
        if wait is not None:
            raise HTTPException(429, f"too many failed sign-ins; try again in {wait} s", {"Retry-After": str(wait)})
        user = all_users(web.settings).get(body.name)
        if not verify_password(user.password_hash.get_secret_value() if user else None, body.password):
            web.sessions.failed(body.name, addr)
            log.warning("web_login_failed", user=body.name, addr=addr)
            raise HTTPException(401, "wrong name or password")
        web.sessions.succeeded(body.name)
        s, cookie = web.sessions.create(user.name, user.role)
        response.set_cookie(SESSION_COOKIE, cookie, max_age=web.cfg.session_ttl_s, httponly=True, samesite="lax",
                            secure=web.secure(request), path="/")
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/api/login")
        log.info("web_login", user=user.name, role=user.role, addr=addr)
        return _me(web, s)

    @app.post("/api/logout", tags=["auth"])
    def logout(response: Response, s: Annotated[Session, Depends(changing)]) -> dict[str, bool]:
        web.sessions.delete(s)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return {"ok": True}

    @app.get("/api/me", tags=["auth"])
    def me(s: Annotated[Session, Depends(session)]) -> Me:
        """Who is signed in, and the CSRF token of the session."""
        return _me(web, s)


def _me(web: Web, s: Session) -> Me:
    return Me(name=s.user, role=s.role, csrf=s.csrf, snapshots=web.cfg.snapshots, version=__version__)


# --- events -----------------------------------------------------------------------------------------


def _event_routes(app: FastAPI, web: Web) -> None:
    @app.get("/api/events/open", tags=["events"])
    def list_open(s: Annotated[Session, Depends(session)]) -> list[dict[str, Any]]:
        """Events a person must act on, newest first: running ones, and falls nobody resolved."""
        return [event_view(e) for e in open_events(web.client, web.keys)]

    @app.get("/api/events", tags=["events"])
    def list_history(
        s: Annotated[Session, Depends(session)],
        camera: Annotated[str | None, Query(max_length=64)] = None,
        outcome: Annotated[Literal["confirmed_fall", "false_alarm", "not_sure", "none"] | None, Query()] = None,
        kind: Annotated[Literal["fall", "camera_offline"] | None, Query()] = None,
        since: Annotated[float | None, Query(ge=0, description="Started at or after (epoch s).")] = None,
        until: Annotated[float | None, Query(ge=0, description="Started at or before (epoch s).")] = None,
        page: Annotated[int, Query(ge=1, le=100_000)] = 1,
        size: Annotated[int | None, Query(ge=1, le=500)] = None,
    ) -> dict[str, Any]:
        """Past events, newest first, filtered by camera, outcome ("none": unresolved), kind and time."""
        size = size or web.cfg.page_size
        rows, total = history(web.client, web.keys, camera=camera, outcome=outcome, kind=kind, since=since,
                              until=until, page=page, size=size)
        return {"events": [event_view(e) for e in rows], "total": total, "page": page, "size": size,
                "pages": max(1, -(-total // size))}

    @app.get("/api/events/{event_id}", tags=["events"])
    def get_event(event_id: str, s: Annotated[Session, Depends(session)]) -> dict[str, Any]:
        return web.event(event_id)

    @app.post("/api/events/{event_id}/ack", tags=["events"])
    def ack(event_id: str, s: Annotated[Session, Depends(changing)]) -> dict[str, Any]:
        """"I'm going": acknowledge as the signed-in user (the first acknowledgement stands)."""
        try:
            acknowledge(web.client, web.keys, event_id, s.user, web.settings.alerts.stream_maxlen, source="web")
        except EventNotFound:
            raise HTTPException(404, f"no event {event_id!r}") from None
        return web.event(event_id)

    @app.post("/api/events/{event_id}/resolve", tags=["events"])
    def resolve_event(event_id: str, body: ResolveBody, s: Annotated[Session, Depends(changing)]) -> dict[str, Any]:
        """Close a fall event with what was found. Unknown event: 404; not a fall, or resolved already: 409."""
        if len(body.note) > web.cfg.note_max_chars:
            raise HTTPException(422, f"note: at most {web.cfg.note_max_chars} characters")
        try:
            resolve(web.client, web.keys, event_id, s.user, body.outcome, web.settings.alerts.stream_maxlen,
                    note=body.note.strip(), source="web", cooldown_s=web.settings.alerts.cooldown_s)
        except EventNotFound:
            raise HTTPException(404, f"no event {event_id!r}") from None
        except BadTransition as exc:
            raise HTTPException(409, str(exc)) from None
        return web.event(event_id)

    @app.get("/api/events/{event_id}/snapshot", tags=["events"], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}})
    def snapshot(event_id: str, s: Annotated[Session, Depends(session)]) -> Response:
        """The event's newest frame still kept (only with web.snapshots); never cached; each view is logged."""
        if not web.cfg.snapshots:
            raise HTTPException(403, "snapshots are off (web.snapshots)")
        event = web.event(event_id)
        for frame_id in reversed(event["frame_ids"]):
            images = web.client.hgetall(web.keys.pixels(frame_id))
            if images:
                _audit(web, s, "snapshot_viewed", event_id=event_id, frame_id=frame_id)
                names = sorted(images, key=lambda k: int(k[1:]) if k[1:].isdigit() else 0)
                return Response(images[names[len(names) // 2]], media_type="image/jpeg",
                                headers={"Cache-Control": "no-store, private", "Pragma": "no-cache"})
        raise HTTPException(404, "no frame of this event is kept any more")


def _audit(web: Web, s: Session, action: str, **fields: str) -> None:
    log.info(action, user=s.user, **fields)
    web.client.xadd(web.keys.web_audit_stream(), {"action": action, "user": s.user, "at": repr(time.time()), **fields},
                    maxlen=100_000, approximate=True)


# --- cameras, status, live stream -------------------------------------------------------------------


def _status_routes(app: FastAPI, web: Web) -> None:
    @app.get("/api/cameras", tags=["cameras"])
    def cameras(s: Annotated[Session, Depends(session)]) -> list[dict[str, Any]]:
        """One row per camera: online/offline/stale, last frame age, the open event if any."""
        return cameras_view(web.client, web.keys, web.settings)

    @app.get("/api/status", tags=["status"])
    def status(s: Annotated[Session, Depends(admin)]) -> dict[str, Any]:
        """Admin: offload rate, cloud queue depth and age, timeouts, budget, switcher, workers, Redis memory,
        alert precision per camera and day, metrics links."""
        return admin_view(web.client, web.keys, web.settings)

    @app.get("/api/stream", tags=["live"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def stream(request: Request, s: Annotated[Session, Depends(session)],
                     status: Annotated[bool, Query(description="Admin: also push the status every few seconds.")] = False,
                     ) -> StreamingResponse:
        """Server-sent events: ``event`` (an AlertEvent), ``cameras`` (tiles changed), ``status`` (admin,
        with ?status=1), ``logout`` (the session ended)."""
        if status and not s.is_admin:
            raise HTTPException(403, "the admin role is needed")
        cookie = request.cookies.get(SESSION_COOKIE)
        return StreamingResponse(_events(web, request, cookie, status), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _sse(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


async def _events(web: Web, request: Request, cookie: str | None, status: bool) -> AsyncIterator[str]:
    q = web.hub.subscribe()
    wait = STATUS_EVERY_S if status else KEEPALIVE_S
    try:
        yield "retry: 2000\n\n" + _sse("hello", {"at": time.time()})
        while not await request.is_disconnected():
            try:
                kind, data = await asyncio.wait_for(q.get(), wait)
            except TimeoutError:
                if await run_in_threadpool(web.sessions.get, cookie, False) is None:
                    yield _sse("logout", {})
                    return
                if status:
                    yield _sse("status", await run_in_threadpool(admin_view, web.client, web.keys, web.settings))
                else:
                    yield ": keep-alive\n\n"
                continue
            if kind == "bye":
                return
            yield _sse(kind, data)
    finally:
        web.hub.unsubscribe(q)

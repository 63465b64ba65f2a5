"""Sessions, login throttling and CSRF tokens, all kept in Redis so several web processes agree.

The cookie holds only a random session id, signed (itsdangerous) so a forged or altered cookie is
refused before Redis is asked. The session hash expires after ``web.idle_timeout_s`` without a
request and, whatever the activity, ``web.session_ttl_s`` after login.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

from fallwatch.keys import Keys
from fallwatch.settings import WebSettings

SESSION_COOKIE = "fw_session"
LOGIN_CSRF_COOKIE = "fw_login_csrf"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Session:
    id: str
    user: str
    role: str
    csrf: str
    created_at: float

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def signing_key(client: Any, keys: Keys, cfg: WebSettings) -> str:
    """web.secret_key, else one random key shared through Redis (created once, SET NX)."""
    if cfg.secret_key is not None:
        return cfg.secret_key.get_secret_value()
    client.set(keys.web_secret(), secrets.token_urlsafe(32), nx=True)
    return client.get(keys.web_secret()).decode()


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


class Sessions:
    def __init__(self, client: Any, keys: Keys, cfg: WebSettings, secret: str):
        self.client, self.keys, self.cfg = client, keys, cfg
        self.signer = URLSafeTimedSerializer(secret, salt="fallwatch-session")
        self.login_signer = URLSafeTimedSerializer(secret, salt="fallwatch-login-csrf")

    # --- sessions ---------------------------------------------------------------------------------
    def create(self, user: str, role: str) -> tuple[Session, str]:
        """A new session and its signed cookie value."""
        session = Session(secrets.token_urlsafe(24), user, role, secrets.token_urlsafe(24), time.time())
        key = self.keys.web_session(session.id)
        self.client.hset(key, mapping={"user": user, "role": role, "csrf": session.csrf,
                                       "created_at": repr(session.created_at)})
        self.client.expire(key, min(self.cfg.idle_timeout_s, self.cfg.session_ttl_s))
        return session, self.signer.dumps(session.id)

    def get(self, cookie: str | None, touch: bool = True) -> Session | None:
        """The live session of a cookie (with ``touch``, its idle timer restarted), or None."""
        sid = self._unsign(cookie)
        if sid is None:
            return None
        key = self.keys.web_session(sid)
        raw = {k.decode(): v.decode() for k, v in self.client.hgetall(key).items()}
        if not raw:
            return None
        session = Session(sid, raw["user"], raw["role"], raw["csrf"], float(raw["created_at"]))
        left = self.cfg.session_ttl_s - (time.time() - session.created_at)
        if left <= 0:
            self.client.delete(key)
            return None
        if touch:
            self.client.expire(key, max(1, int(min(self.cfg.idle_timeout_s, left))))
        return session

    def _unsign(self, cookie: str | None) -> str | None:
        if not cookie:
            return None
        try:
            return str(self.signer.loads(cookie, max_age=self.cfg.session_ttl_s))
        except BadSignature:  # includes SignatureExpired
            return None

    def delete(self, session: Session) -> None:
        self.client.delete(self.keys.web_session(session.id))

    # --- login CSRF (double submit: a signed cookie and the same token in a header) ---------------
    def login_token(self) -> tuple[str, str]:
        token = secrets.token_urlsafe(24)
        return token, self.login_signer.dumps(token)

    def login_token_ok(self, cookie: str | None, header: str | None) -> bool:
        if not cookie:
            return False
        try:
            token = self.login_signer.loads(cookie, max_age=3600)
        except BadSignature:
            return False
        return same(str(token), header)

    # --- login throttling ---------------------------------------------------------------------------
    def _failure_keys(self, user: str, addr: str) -> list[str]:
        return [self.keys.web_login_failures("user", user.lower()[:64]), self.keys.web_login_failures("addr", addr)]

    def throttled(self, user: str, addr: str) -> int | None:
        """Seconds until another attempt is allowed, or None when allowed."""
        for key in self._failure_keys(user, addr):
            count = self.client.get(key)
            if count is not None and int(count) >= self.cfg.login_max_failures:
                return max(1, int(self.client.ttl(key)))
        return None

    def failed(self, user: str, addr: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        for key in self._failure_keys(user, addr):
            pipe.set(key, 0, ex=self.cfg.login_window_s, nx=True).incr(key)  # INCR keeps the TTL
        pipe.execute()

    def succeeded(self, user: str) -> None:
        self.client.delete(self.keys.web_login_failures("user", user.lower()[:64]))

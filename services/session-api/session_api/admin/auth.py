"""Who may use the operator console: sign-in with ADMIN_TOKEN, a signed session cookie, and
the checks every POST passes (same origin, the session's CSRF token).

The cookie is not the token: it is `<expires>.<nonce>.<mac>`, the MAC an HMAC-SHA256 under a
key derived from ADMIN_TOKEN. Nothing is stored on the server, so any replica accepts it;
rotating ADMIN_TOKEN changes the key and signs every operator out at once. Signing out
deletes the cookie; a copy taken before stays valid until its expiry (ADMIN_SESSION_SECONDS),
the price of keeping no session store.

A POST is refused (403) unless its `Origin` is the console's own and its form carries the
session's CSRF token (an HMAC of the session's nonce, so it needs no storage either). The
cookie's SameSite=Strict already keeps other sites' requests from carrying it; the two checks
hold even where a browser or a proxy gets that wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from shared.web import ascii_int

COOKIE = "paypush_admin"
# Only the console's own paths ever see the cookie.
COOKIE_PATH = "/admin"
# The form field carrying the CSRF token.
CSRF_FIELD = "csrf"
_KEY_LABEL = b"paypush admin session v1"
_NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")
_MAC_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class AdminSession:
    """A signed-in operator: when the sign-in ends, and the CSRF token its forms carry."""

    expires: int
    csrf: str


class AdminAuth:
    """Checks the token, issues and verifies session cookies, judges a POST's origin."""

    def __init__(self, token: str, *, max_age: int, secure: bool, site_url: str) -> None:
        self._token = token.encode()
        # An empty ADMIN_TOKEN (a process that holds no secrets) signs nobody in.
        self._key = hmac.new(self._token, _KEY_LABEL, hashlib.sha256).digest() if token else b""
        self.max_age = max_age
        self.secure = secure
        self._site_host = urlsplit(site_url).netloc.lower()

    def token_matches(self, given: str) -> bool:
        """`given` is ADMIN_TOKEN (constant time; an empty one matches nothing)."""
        if not self._key:
            return False
        return hmac.compare_digest(given.strip().encode(), self._token)

    def _mac(self, purpose: bytes, payload: str) -> str:
        return hmac.new(self._key, purpose + b"." + payload.encode(), hashlib.sha256).hexdigest()

    def issue(self, now: float | None = None) -> str:
        """A new session cookie's value."""
        expires = int(now if now is not None else time.time()) + self.max_age
        payload = f"{expires}.{secrets.token_urlsafe(16)}"
        return f"{payload}.{self._mac(b'session', payload)}"

    def verify(self, value: str | None, now: float | None = None) -> AdminSession | None:
        """The session this cookie proves, or None (absent, malformed, tampered, expired, or
        signed under another ADMIN_TOKEN)."""
        if not value or not self._key:
            return None
        raw_expires, _, rest = value.partition(".")
        nonce, _, mac = rest.partition(".")
        expires = ascii_int(raw_expires, 12)
        if expires is None:
            return None
        if not (_NONCE_RE.fullmatch(nonce) and _MAC_RE.fullmatch(mac)):
            return None
        payload = f"{raw_expires}.{nonce}"
        if not hmac.compare_digest(mac, self._mac(b"session", payload)):
            return None
        current = now if now is not None else time.time()
        if not current < expires <= current + self.max_age:
            return None
        return AdminSession(expires, self._mac(b"csrf", nonce))

    def same_origin(self, request: web.Request) -> bool:
        """The request's `Origin` names the console's host: the site's public one, or the host
        the request itself was sent to (a browser sets both Host and Origin; another site's
        form sends its own Origin). Hosts, not schemes: behind a proxy that ends TLS the
        request arrives over http while the browser's Origin says https."""
        origin = request.headers.get("Origin", "").strip().lower()
        if not origin or origin == "null":
            return False
        host = urlsplit(origin).netloc
        return bool(host) and host in (self._site_host, request.host.lower())

    @staticmethod
    def csrf_matches(session: AdminSession, given: object) -> bool:
        return isinstance(given, str) and hmac.compare_digest(given.encode(), session.csrf.encode())

    def set_cookie(self, response: web.StreamResponse, value: str) -> None:
        response.set_cookie(
            COOKIE,
            value,
            max_age=self.max_age,
            path=COOKIE_PATH,
            httponly=True,
            samesite="Strict",
            secure=self.secure,
        )

    def clear_cookie(self, response: web.StreamResponse) -> None:
        response.del_cookie(COOKIE, path=COOKIE_PATH, samesite="Strict", secure=self.secure)

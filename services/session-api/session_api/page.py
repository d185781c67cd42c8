"""The deposit page: one HTML document in the reader's language, its script and style, and
the QR image of a session."""

from __future__ import annotations

import io
from urllib.parse import urlsplit

import segno
from aiohttp import web

from shared.appkeys import SETTINGS
from shared.i18n import request_language, switch_redirect
from shared.model import is_valid_uuid

from . import document
from .appkeys import DEPOSIT_PAGE, SESSIONS
from .errors import InvalidRequest, NotFound

STATIC_DIR = document.STATIC_DIR


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


async def index(request: web.Request) -> web.Response:
    """`GET /`: the page in the reader's language, configured with where the stream lives.
    `?lang=` (the switch) is remembered in a cookie and dropped from the address."""
    settings = request.app[SETTINGS]
    switched = switch_redirect(request, secure=settings.is_production)
    if switched is not None:
        return switched
    language = request_language(request)
    response = web.Response(
        text=request.app[DEPOSIT_PAGE].render(request, language), content_type="text/html"
    )
    # The same address answers in either language.
    response.headers["Vary"] = "Accept-Language, Cookie"
    response.headers["Content-Language"] = language
    return response


async def qr_svg(request: web.Request) -> web.Response:
    """`GET /api/sessions/{uuid}/qr.svg`: the session's VietQR payload drawn as SVG."""
    uuid = request.match_info["uuid"]
    if not is_valid_uuid(uuid):
        raise InvalidRequest("`uuid` must be a uuid4")
    doc = await request.app[SESSIONS].find(uuid)
    if doc is None or not doc.get("qrCode"):
        raise NotFound("no payment session with this uuid")
    out = io.BytesIO()
    segno.make(doc["qrCode"], error="m").save(out, kind="svg", scale=6, border=2, xmldecl=False)
    return web.Response(
        body=out.getvalue(),
        content_type="image/svg+xml",
        headers={"Cache-Control": "private, max-age=86400"},
    )


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response of the page's origin carries (`on_response_prepare`)."""
    stream_origin = _origin(request.app[SETTINGS].stream_public_url)
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src 'self' {stream_origin}; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'self'",
    )
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")

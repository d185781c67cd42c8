"""The deposit page: one HTML document, its script and style, and the QR image of a session."""

from __future__ import annotations

import io
import json
from pathlib import Path
from urllib.parse import urlsplit

import segno
from aiohttp import web

from shared.appkeys import SETTINGS
from shared.model import is_valid_uuid

from .appkeys import SESSIONS
from .errors import InvalidRequest, NotFound

STATIC_DIR = Path(__file__).parent / "static"
# The wait before the page gives up, and the fallback polling period (the original's).
MAX_WAIT_MS = 10 * 60 * 1000
POLL_INTERVAL_MS = 5000
# Polling starts only after this many stream failures in a row without an event in between
# (a rollout's dropped stream reconnects in one); while polling, the stream is tried again
# about every STREAM_PROBE_MS. A refused stream (503) is opened again after about RECONNECT_MS.
STREAM_FAILURES_BEFORE_POLLING = 4
STREAM_PROBE_MS = 30_000
RECONNECT_MS = 3000


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


async def index(request: web.Request) -> web.Response:
    """`GET /`: the page, configured with where the stream lives."""
    settings = request.app[SETTINGS]
    config = {
        "streamUrl": settings.stream_public_url.rstrip("/"),
        "pollIntervalMs": POLL_INTERVAL_MS,
        "streamFailuresBeforePolling": STREAM_FAILURES_BEFORE_POLLING,
        "streamProbeMs": STREAM_PROBE_MS,
        "reconnectMs": RECONNECT_MS,
        "maxWaitMs": MAX_WAIT_MS,
    }
    # `<` escaped so no value can close the script element.
    payload = json.dumps(config).replace("<", "\\u003c")
    html = (STATIC_DIR / "index.html").read_text().replace("__CONFIG__", payload)
    return web.Response(text=html, content_type="text/html")


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

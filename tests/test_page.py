"""The deposit page's server side: the document, its configuration, headers and QR image."""

from __future__ import annotations

import io
import json
import re
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from typing import Any

import cairosvg
import pytest
import zxingcpp
from aiohttp.test_utils import TestClient
from PIL import Image

from devstack.payos_simulator.vietqr import vietqr_payload
from devstack.system import Backends
from session_api import create_app
from shared.mongo import Store
from shared.settings import Settings
from tests.helpers import add_session

Client = TestClient[Any, Any]


@pytest.fixture
async def site(
    aiohttp_client: Callable[..., Awaitable[Client]], settings: Settings, store: Store
) -> Client:
    return await aiohttp_client(
        create_app(
            Settings.from_env(
                {},
                redis_url=settings.redis_url,
                mongodb_url=settings.mongodb_url,
                mongodb_timeout_ms=settings.mongodb_timeout_ms,
                stream_public_url="http://127.0.0.1:18082",
            )
        )
    )


async def test_page_carries_the_stream_url_and_a_strict_csp(site: Client) -> None:
    resp = await site.get("/")
    html = await resp.text()
    assert resp.status == 200 and resp.content_type == "text/html"
    match = re.search(r'<script id="config" type="application/json">(.*?)</script>', html)
    assert match is not None
    config = json.loads(match.group(1))
    assert config.pop("language") == "vi"
    assert config.pop("messages")["page.title"] == "Nạp tiền qua chuyển khoản"
    assert config == {
        "streamUrl": "http://127.0.0.1:18082",
        "pollIntervalMs": 5000,
        "maxWaitMs": 600000,
        "streamFailuresBeforePolling": 4,
        "streamDownBeforePollingMs": 20000,
        "streamProbeMs": 30000,
        "reconnectMs": 3000,
        "signedAccounts": False,
    }
    csp = resp.headers["Content-Security-Policy"]
    assert "connect-src 'self' http://127.0.0.1:18082" in csp and "unsafe" not in csp


async def test_page_assets_are_served_locally(site: Client) -> None:
    for path, kind in (("/static/deposit.js", "javascript"), ("/static/deposit.css", "css")):
        resp = await site.get(path)
        assert resp.status == 200 and kind in resp.content_type
        assert "http" not in (await resp.text()).replace("http-equiv", "")


def decode_qr(svg: bytes) -> list[tuple[str, str]]:
    """(format, text) of every barcode in `svg`, rendered by Cairo and read by ZXing: neither
    is the library that drew it, so only a picture any phone would read passes."""
    png = cairosvg.svg2png(
        bytestring=svg, output_width=480, output_height=480, background_color="white"
    )
    image = Image.open(io.BytesIO(png)).convert("L")
    return [(found.format.name, found.text) for found in zxingcpp.read_barcodes(image)]


@pytest.mark.parametrize(
    ("bank", "account", "amount", "description"),
    [
        ("970422", "0123456789", 50_000, "NAPTIEN"),
        ("970436", "9876543210123", 1_234_567, "NAPTIEN 8a1f"),
    ],
)
async def test_qr_image_draws_the_sessions_vietqr_payload(
    site: Client, store: Store, bank: str, account: str, amount: int, description: str
) -> None:
    payload = vietqr_payload(bank, account, amount, description)
    session = await add_session(store, qrCode=payload)
    resp = await site.get(f"/api/sessions/{session['uuid']}/qr.svg")
    assert resp.status == 200 and resp.content_type == "image/svg+xml"
    assert decode_qr(await resp.read()) == [("QRCode", payload)]


async def test_qr_image_of_an_unknown_or_malformed_uuid_is_refused(site: Client) -> None:
    assert (await site.get(f"/api/sessions/{uuidlib.uuid4()}/qr.svg")).status == 404
    bad = await site.get("/api/sessions/not-a-uuid/qr.svg")
    assert bad.status == 400 and (await bad.json())["success"] is False


async def test_qr_image_while_mongodb_is_down_is_503(
    site: Client, store: Store, servers: Backends
) -> None:
    if servers.mongo is None:
        pytest.skip("MongoDB is external; the suite cannot stop it")
    session = await add_session(store, qrCode="000201")
    servers.mongo.stop()
    try:
        resp = await site.get(f"/api/sessions/{session['uuid']}/qr.svg")
        assert resp.status == 503 and (await resp.json())["retryable"] is True
    finally:
        servers.mongo.start()

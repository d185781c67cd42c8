"""The operator console at /admin (issue 13) over HTTP: who may use it, every bad input, the
lists it shows, and the gateway figures it computes. The browser tests are in
tests/test_admin_browser.py."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry, generate_latest

from devstack.servers import free_port
from session_api import create_app
from session_api.admin.appkeys import ADMIN_AUTH
from session_api.admin.auth import COOKIE, AdminAuth
from session_api.admin.filters import VIETNAM
from session_api.admin.gateway import GatewayScraper, parse_metrics, quantile
from session_api.admin.overview import MINUTES, per_minute
from shared.ledger import IssueKind, Ledger, NewIssue
from shared.model import utcnow
from shared.mongo import Store
from shared.settings import Settings
from stream_gateway.metrics import GatewayMetrics
from tests.helpers import add_session
from tests.test_session_api import Client, _ready

TOKEN = "test-admin-token"
CSRF_RE = re.compile(r'name="csrf" value="([0-9a-f]{64})"')


@pytest.fixture
def admin_settings(settings: Settings) -> Settings:
    # No gateway listens on a fresh free port: the console must show "—", not fail.
    return dataclasses.replace(
        settings,
        admin_token=TOKEN,
        gateway_metrics_urls=(f"http://127.0.0.1:{free_port()}/metrics",),
    )


@pytest.fixture
async def site(
    aiohttp_client: Callable[..., Awaitable[Client]], admin_settings: Settings, store: Store
) -> Client:
    return await _ready(await aiohttp_client(create_app(admin_settings)))


def origin(site: Client) -> dict[str, str]:
    return {"Origin": str(site.make_url("")).rstrip("/")}


async def sign_in(site: Client, token: str = TOKEN) -> aiohttp.ClientResponse:
    return await site.post(
        "/admin/signin", data={"token": token}, headers=origin(site), allow_redirects=False
    )


async def csrf_of(site: Client, path: str = "/admin/issues") -> str:
    resp = await site.get(path)
    assert resp.status == 200
    match = CSRF_RE.search(await resp.text())
    assert match is not None
    return match.group(1)


def error_text(html: str) -> str:
    match = re.search(r'<p class="error" id="error" role="alert">(.*?)</p>', html, re.S)
    assert match is not None, html
    return match.group(1)


async def open_item(store: Store, order_code: int = 900_001) -> str:
    await Ledger(store).record(
        NewIssue(IssueKind.UNKNOWN_ORDER, order_code, "FT1", 20_000, {"orderCode": order_code})
    )
    doc = await store.issues.find_one({"orderCode": order_code})
    assert doc is not None
    return str(doc["_id"])


# --- sign-in ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/admin", "/admin/sessions", "/admin/issues", "/admin/sessions?status=bogus"]
)
async def test_a_console_page_without_a_cookie_redirects_to_sign_in(
    site: Client, path: str
) -> None:
    resp = await site.get(path, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/admin/signin"


async def test_the_counters_and_the_chart_without_a_cookie_are_401(site: Client) -> None:
    assert (await site.get("/admin/api/counters")).status == 401
    assert (await site.get("/admin/chart.svg")).status == 401


@pytest.mark.parametrize("token", ["wrong-token", "", TOKEN + "x", TOKEN[:-1]])
async def test_a_wrong_token_is_401_with_the_form_again_and_no_cookie(
    site: Client, token: str
) -> None:
    resp = await sign_in(site, token)
    assert resp.status == 401
    html = await resp.text()
    assert "Mã quản trị không đúng" in html and 'name="token"' in html
    assert COOKIE not in resp.cookies
    assert (await site.get("/admin", allow_redirects=False)).status == 303


async def test_sign_in_attempts_are_limited_per_address_even_with_the_right_token(
    site: Client,
) -> None:
    for _ in range(10):
        assert (await sign_in(site, "guess")).status == 401
    resp = await sign_in(site)
    assert resp.status == 429
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert "quá nhiều lần" in await resp.text()
    assert COOKIE not in resp.cookies


async def test_the_right_token_sets_an_httponly_strict_session_cookie_that_is_not_the_token(
    site: Client,
) -> None:
    resp = await sign_in(site)
    assert resp.status == 303 and resp.headers["Location"] == "/admin"
    header = resp.headers["Set-Cookie"]
    morsel = SimpleCookie(header)[COOKIE]
    assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/admin"
    assert not morsel["secure"]  # development: plain http
    assert TOKEN not in morsel.value
    page = await site.get("/admin", allow_redirects=False)
    assert page.status == 200
    assert "Tổng quan" in await page.text()


async def test_the_cookie_is_secure_in_production(settings: Settings) -> None:
    production = dataclasses.replace(
        settings,
        app_env="production",
        payos_client_id="id",
        payos_api_key="key",
        payos_checksum_key="checksum",
        cron_secret="cron",
        admin_token=TOKEN,
    )
    app = create_app(production)
    response = web.Response()
    app[ADMIN_AUTH].set_cookie(response, app[ADMIN_AUTH].issue())
    assert response.cookies[COOKIE]["secure"] is True


def tampered(value: str) -> list[str]:
    expires, nonce, mac = value.split(".")
    flip = "0" if mac[0] != "0" else "1"
    return [
        f"{expires}.{nonce}.{flip}{mac[1:]}",  # the MAC
        f"{int(expires) + 3600}.{nonce}.{mac}",  # a later expiry
        f"{expires}.{nonce[::-1]}.{mac}",  # another nonce
        f"{expires}.{nonce}",  # no MAC
        TOKEN,  # the token itself
    ]


async def test_a_tampered_cookie_is_refused_and_deleted(site: Client) -> None:
    await sign_in(site)
    value = site.session.cookie_jar.filter_cookies(site.make_url("/admin"))[COOKIE].value
    for bad in tampered(value):
        site.session.cookie_jar.clear()
        site.session.cookie_jar.update_cookies({COOKIE: bad}, site.make_url("/admin"))
        resp = await site.get("/admin", allow_redirects=False)
        assert resp.status == 303, bad
        assert resp.headers["Location"] == "/admin/signin?expired=1"
        assert resp.cookies[COOKIE].value == ""  # deleted


async def test_an_expired_cookie_is_refused(site: Client) -> None:
    auth = site.app[ADMIN_AUTH]
    old = auth.issue(now=time.time() - auth.max_age - 1)
    site.session.cookie_jar.update_cookies({COOKIE: old}, site.make_url("/admin"))
    resp = await site.get("/admin", allow_redirects=False)
    assert (resp.status, resp.headers["Location"]) == (303, "/admin/signin?expired=1")
    follow = await site.get(resp.headers["Location"])
    assert "Phiên đăng nhập đã hết hạn" in await follow.text()


async def test_a_cookie_signed_under_a_rotated_token_is_refused(site: Client) -> None:
    before = AdminAuth("the-previous-token", max_age=3600, secure=False, site_url="http://x")
    site.session.cookie_jar.update_cookies({COOKIE: before.issue()}, site.make_url("/admin"))
    assert (await site.get("/admin", allow_redirects=False)).status == 303


async def test_sign_out_deletes_the_cookie(site: Client) -> None:
    await sign_in(site)
    csrf = await csrf_of(site, "/admin")
    resp = await site.post(
        "/admin/signout", data={"csrf": csrf}, headers=origin(site), allow_redirects=False
    )
    assert (resp.status, resp.headers["Location"]) == (303, "/admin/signin?out=1")
    assert (await site.get("/admin", allow_redirects=False)).status == 303


# --- POSTs: origin and CSRF ------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Origin": "https://evil.example"}, {"Origin": "null"}],
    ids=["no-origin", "other-origin", "null-origin"],
)
async def test_a_post_from_another_origin_is_403(
    site: Client, store: Store, headers: dict[str, str]
) -> None:
    item = await open_item(store)
    assert (await site.post("/admin/signin", data={"token": TOKEN}, headers=headers)).status == 403
    await sign_in(site)
    csrf = await csrf_of(site)
    resp = await site.post(
        f"/admin/issues/{item}/resolve",
        data={"csrf": csrf, "resolvedBy": "an", "note": "refunded"},
        headers=headers,
    )
    assert resp.status == 403
    assert "không đến từ bảng điều khiển" in error_text(await resp.text())
    doc = await store.issues.find_one({"orderCode": 900_001})
    assert doc is not None and doc["status"] == "open"


@pytest.mark.parametrize(
    "csrf", [None, "", "0" * 64, "not-hex"], ids=["none", "empty", "wrong", "junk"]
)
async def test_a_post_without_the_sessions_csrf_token_is_403(
    site: Client, store: Store, csrf: str | None
) -> None:
    item = await open_item(store)
    await sign_in(site)
    form = {"resolvedBy": "an", "note": "refunded"}
    if csrf is not None:
        form["csrf"] = csrf
    resp = await site.post(f"/admin/issues/{item}/resolve", data=form, headers=origin(site))
    assert resp.status == 403
    assert "Biểu mẫu đã cũ" in error_text(await resp.text())
    signout = await site.post("/admin/signout", data=form, headers=origin(site))
    assert signout.status == 403
    doc = await store.issues.find_one({"orderCode": 900_001})
    assert doc is not None and doc["status"] == "open"


async def test_another_sessions_csrf_token_is_403(site: Client, store: Store) -> None:
    item = await open_item(store)
    await sign_in(site)
    theirs = await csrf_of(site)
    site.session.cookie_jar.clear()
    await sign_in(site)
    assert await csrf_of(site) != theirs
    resp = await site.post(
        f"/admin/issues/{item}/resolve",
        data={"csrf": theirs, "resolvedBy": "an", "note": "x"},
        headers=origin(site),
    )
    assert resp.status == 403


async def test_a_post_without_a_session_goes_to_sign_in(site: Client, store: Store) -> None:
    item = await open_item(store)
    resp = await site.post(
        f"/admin/issues/{item}/resolve",
        data={"csrf": "0" * 64, "resolvedBy": "an", "note": "x"},
        headers=origin(site),
        allow_redirects=False,
    )
    assert (resp.status, resp.headers["Location"]) == (303, "/admin/signin")


# --- resolve ---------------------------------------------------------------------------------


async def test_resolving_an_item_records_who_and_why_and_returns_to_the_list(
    site: Client, store: Store
) -> None:
    item = await open_item(store)
    await sign_in(site)
    csrf = await csrf_of(site, "/admin/issues?status=open&kind=unknown_order")
    resp = await site.post(
        f"/admin/issues/{item}/resolve",
        data={
            "csrf": csrf,
            "resolvedBy": "Lan",
            "note": "Đã hoàn tiền cho khách",
            "back": "status=open&kind=unknown_order&evil=1",
        },
        headers=origin(site),
        allow_redirects=False,
    )
    assert resp.status == 303
    assert resp.headers["Location"] == "/admin/issues?status=open&kind=unknown_order&done=900001"
    doc = await store.issues.find_one({"orderCode": 900_001})
    assert doc is not None
    assert (doc["status"], doc["resolvedBy"], doc["note"]) == (
        "resolved",
        "Lan",
        "Đã hoàn tiền cho khách",
    )
    listed = await (await site.get(resp.headers["Location"])).text()
    assert "Đã ghi nhận xử lý xong mục của đơn hàng 900001" in listed
    again = await site.post(
        f"/admin/issues/{item}/resolve",
        data={"csrf": csrf, "resolvedBy": "Minh", "note": "again"},
        headers=origin(site),
    )
    assert again.status == 409
    assert "đã được Lan xử lý" in error_text(await again.text())


@pytest.mark.parametrize(
    ("path_id", "form", "status", "message"),
    [
        ("nothex", {"resolvedBy": "an", "note": "x"}, 400, "Không tìm thấy mục này"),
        ("0" * 24, {"resolvedBy": "an", "note": "x"}, 404, "Không tìm thấy mục này"),
        (None, {"resolvedBy": "", "note": "x"}, 400, "Vui lòng ghi tên người xử lý"),
        (None, {"resolvedBy": "an", "note": "   "}, 400, "Vui lòng ghi tên người xử lý"),
        (None, {"note": "x"}, 400, "Vui lòng ghi tên người xử lý"),
        (None, {"resolvedBy": "an", "note": "x" * 2001}, 400, "Vui lòng ghi tên người xử lý"),
    ],
    ids=["bad-id", "unknown-id", "no-name", "blank-note", "missing-name", "long-note"],
)
async def test_a_bad_resolve_is_refused_with_a_clear_message(
    site: Client,
    store: Store,
    path_id: str | None,
    form: dict[str, str],
    status: int,
    message: str,
) -> None:
    item = await open_item(store)
    await sign_in(site)
    csrf = await csrf_of(site)
    resp = await site.post(
        f"/admin/issues/{path_id or item}/resolve",
        data={"csrf": csrf, **form},
        headers=origin(site),
    )
    assert resp.status == status
    assert message in error_text(await resp.text())
    doc = await store.issues.find_one({"orderCode": 900_001})
    assert doc is not None and doc["status"] == "open"


# --- filters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("status=bogus", "Trạng thái không hợp lệ. Chọn một trong: pending, completed"),
        ("account=has%20space", "Tài khoản không hợp lệ"),
        ("account=" + "a" * 65, "Tài khoản không hợp lệ"),
        ("from=yesterday", "Thời gian ở ô “from” không hợp lệ"),
        ("to=2026-13-01T00:00", "Thời gian ở ô “to” không hợp lệ"),
        ("from=2026-11-27T10:00&to=2026-11-27T09:00", "Thời điểm bắt đầu phải trước"),
        ("from=2026-11-27T10:00&to=2026-11-27T10:00", "Thời điểm bắt đầu phải trước"),
        ("page=0", "Số trang hoặc số dòng"),
        ("page=x", "Số trang hoặc số dòng"),
        ("limit=1000", "Số trang hoặc số dòng"),
    ],
)
async def test_a_bad_session_filter_is_400_with_a_clear_message(
    site: Client, query: str, message: str
) -> None:
    await sign_in(site)
    resp = await site.get(f"/admin/sessions?{query}")
    assert resp.status == 400
    assert message in error_text(await resp.text())


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("status=closed", "`status` must be one of"),
        ("kind=nope", "`kind` must be one of"),
        ("page=-1", "`page` must be between"),
    ],
)
async def test_a_bad_ledger_filter_is_400_with_a_clear_message(
    site: Client, query: str, message: str
) -> None:
    await sign_in(site)
    resp = await site.get(f"/admin/issues?{query}")
    assert resp.status == 400
    text = error_text(await resp.text())
    assert text.startswith("Bộ lọc không hợp lệ") and message in text


async def test_a_bad_filter_is_explained_in_english_when_asked(site: Client) -> None:
    await sign_in(site)
    resp = await site.get("/admin/sessions?status=bogus", headers={"Accept-Language": "en"})
    assert resp.status == 400
    assert error_text(await resp.text()).startswith("Unknown status.")


def rows(html: str) -> list[str]:
    """The orderCodes of the sessions table, in order."""
    return re.findall(r'<tr data-status="[^"]*"><td>[^<]*</td><td>(\d+)</td>', html)


async def test_sessions_are_filtered_by_status_account_and_time(site: Client, store: Store) -> None:
    now = utcnow()
    a1 = await add_session(store, account="acct-a", createdAt=now - timedelta(hours=3))
    a2 = await add_session(store, account="acct-a", status="completed", createdAt=now)
    b1 = await add_session(store, account="acct-b", createdAt=now - timedelta(minutes=5))
    await sign_in(site)

    async def listed(query: str) -> list[str]:
        resp = await site.get(f"/admin/sessions?{query}")
        assert resp.status == 200
        return rows(await resp.text())

    def code(doc: dict[str, Any]) -> str:
        return str(doc["orderCode"])

    assert await listed("") == [code(a2), code(b1), code(a1)]
    assert await listed("account=acct-a") == [code(a2), code(a1)]
    assert await listed("status=pending") == [code(b1), code(a1)]
    assert await listed("status=completed&account=acct-b") == []
    assert await listed("status=cancelled") == []
    # The form's times are Vietnam's.
    since = (now - timedelta(hours=1)).astimezone(VIETNAM)
    assert await listed(f"from={since:%Y-%m-%dT%H:%M}") == [code(a2), code(b1)]
    assert await listed(f"to={since:%Y-%m-%dT%H:%M}") == [code(a1)]


async def test_sessions_are_paged_newest_first(site: Client, store: Store) -> None:
    now = utcnow()
    docs = [
        await add_session(store, account="pager", createdAt=now - timedelta(minutes=i))
        for i in range(5)
    ]
    await sign_in(site)
    first = await (await site.get("/admin/sessions?account=pager&limit=2")).text()
    assert rows(first) == [str(d["orderCode"]) for d in docs[:2]]
    assert "Trang 1/3" in first and 'rel="next"' in first and 'rel="prev"' not in first
    last = await (await site.get("/admin/sessions?account=pager&limit=2&page=3")).text()
    assert rows(last) == [str(docs[4]["orderCode"])]
    assert "Trang 3/3" in last and 'rel="prev"' in last and 'rel="next"' not in last


async def test_a_status_the_console_does_not_know_is_shown_as_it_is(
    site: Client, store: Store
) -> None:
    doc = await add_session(store, account="odd", status="refunded")
    await sign_in(site)
    html = await (await site.get("/admin/sessions?account=odd")).text()
    assert rows(html) == [str(doc["orderCode"])]
    assert '<span class="badge s-other">refunded</span>' in html


async def test_the_filter_offers_cancelled(site: Client) -> None:
    await sign_in(site)
    html = await (await site.get("/admin/sessions")).text()
    assert '<option value="cancelled">Đã huỷ</option>' in html


# --- overview and counters -------------------------------------------------------------------


async def test_a_missing_gateway_shows_a_dash_not_an_error(site: Client, store: Store) -> None:
    await add_session(store)
    await sign_in(site)
    page = await site.get("/admin")
    assert page.status == 200
    resp = await site.get("/admin/api/counters")
    assert resp.status == 200
    body = await resp.json()
    assert body["counters"] == {
        "streams": "—",
        "pending": "1",
        "payments": "0",
        "p50": "—",
        "p99": "—",
    }
    assert body["paymentsLastHour"] == 0


async def test_payments_of_the_last_hour_are_counted_by_minute(site: Client, store: Store) -> None:
    now = utcnow()
    received = [now, now, now - timedelta(minutes=10), now - timedelta(minutes=70)]
    await store.webhooks.insert_many(
        [
            {"orderCode": i, "reference": f"R{i}", "success": True, "receivedAt": at}
            for i, at in enumerate(received)
        ]
        + [{"orderCode": 99, "reference": "F", "success": False, "receivedAt": now}]
    )
    await sign_in(site)
    body = await (await site.get("/admin/api/counters")).json()
    assert body["counters"]["payments"] == "3"
    svg = await site.get("/admin/chart.svg")
    assert svg.status == 200 and svg.content_type == "image/svg+xml"
    counts = [int(n) for n in re.findall(r'class="bar" data-count="(\d+)"', await svg.text())]
    assert len(counts) == MINUTES and sum(counts) == 3 and counts[-1] == 2


def test_per_minute_puts_each_time_in_its_minute() -> None:
    last = datetime(2026, 11, 27, 7, 30, tzinfo=UTC)
    times = [
        last + timedelta(seconds=59),
        last,
        last - timedelta(minutes=59),
        last - timedelta(hours=1),
    ]
    counts = per_minute(times, last)
    assert counts[-1] == 2 and counts[0] == 1 and sum(counts) == 3


def test_quantiles_are_interpolated_within_the_bucket_like_prometheus() -> None:
    inf = float("inf")
    # 10 observations: 5 up to 1 ms, 4 in (1, 2.5] ms, 1 above 5 ms.
    buckets = ((0.001, 5.0), (0.0025, 9.0), (0.005, 9.0), (inf, 10.0))
    assert quantile(0.5, buckets) == pytest.approx(0.001)
    assert quantile(0.7, buckets) == pytest.approx(0.001 + 0.0015 * 2 / 4)
    assert quantile(0.99, buckets) == pytest.approx(0.005)  # beyond the last finite bound
    assert quantile(0.5, ((0.001, 0.0), (inf, 0.0))) is None


@pytest.fixture
async def gateway_metrics() -> AsyncIterator[tuple[GatewayMetrics, str]]:
    """The gateway's own metric definitions, served as its /metrics serves them."""
    registry = CollectorRegistry()
    metrics = GatewayMetrics.create(registry)

    async def serve(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", serve)
    server = TestServer(app)
    await server.start_server()
    try:
        yield metrics, str(server.make_url("/metrics"))
    finally:
        await server.close()


async def test_the_gateways_figures_are_their_streams_and_the_latency_since_the_last_look(
    gateway_metrics: tuple[GatewayMetrics, str],
) -> None:
    metrics, url = gateway_metrics
    metrics.open_streams.set(7)
    for _ in range(20):
        metrics.latency.observe(0.2)  # before the first look: not in the window
    missing = f"http://127.0.0.1:{free_port()}/metrics"
    async with aiohttp.ClientSession() as http:
        scraper = GatewayScraper(http, [url, missing])
        first = await scraper.figures()
        assert (first.open_streams, first.p50_seconds, first.answered, first.asked) == (
            7,
            None,
            1,
            2,
        )
        for _ in range(99):
            metrics.latency.observe(0.003)
        metrics.latency.observe(0.04)
        second = await scraper.figures()
    assert second.p50_seconds is not None and 0.0025 < second.p50_seconds <= 0.005
    assert second.p99_seconds is not None and 0.0025 < second.p99_seconds <= 0.005
    assert parse_metrics(generate_latest(CollectorRegistry()).decode()).buckets == ()


async def test_console_pages_send_their_origin_with_forms_but_no_referrer_elsewhere(
    site: Client,
) -> None:
    """Under the site's `no-referrer` a browser posts forms with `Origin: null`, which the
    Origin check refuses: the console's pages say `same-origin` instead."""
    resp = await site.get("/admin/signin")
    assert resp.headers["Referrer-Policy"] == "same-origin"
    assert resp.headers["Cache-Control"] == "no-store"
    assert "script-src 'self';" in resp.headers["Content-Security-Policy"]

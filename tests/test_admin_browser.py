"""The operator console in a real headless Chromium, against the whole system running as
processes: sign-in, filters, resolve, live counters moving as a payment lands, the chart."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Page, ViewportSize
from pymongo import AsyncMongoClient

from devstack.system import Backends, System
from shared.ledger import IssueKind, Ledger, NewIssue
from shared.mongo import Store
from tests.helpers import browser_page, system_over
from tests.test_deposit_page import create_deposit, new_account, sim_pay
from tests.test_deposit_page import shots as shots  # the same fixture: docs/ on request

DESKTOP: ViewportSize = {"width": 1280, "height": 900}


@pytest.fixture(scope="module")
def system(servers: Backends) -> Iterator[System]:
    with system_over(servers, "console") as started:
        yield started


@pytest.fixture
async def page(system: System) -> AsyncIterator[Page]:
    async with browser_page(DESKTOP) as page:
        yield page


async def sign_in(page: Page, system: System) -> None:
    await page.goto(system.url + "/admin")
    await page.get_by_label("Mã quản trị (ADMIN_TOKEN)").fill(system.settings.admin_token)
    await page.get_by_role("button", name="Đăng nhập").click()
    await page.wait_for_selector("body[data-page=overview]")


async def until(page: Page, selector: str, ok: Callable[[str], bool], timeout: float = 10) -> str:
    """The text of `selector` once `ok(text)` (polled: the page's CSP forbids the eval a
    page-side wait_for_function needs)."""
    text = ""
    try:
        async with asyncio.timeout(timeout):
            while not ok(text := await page.inner_text(selector)):
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"{selector} stayed {text!r}") from None
    return text


async def new_session(system: System, account: str, amount: int = 20_000) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{system.url}/api/sessions", json={"accountNumber": account, "amount": amount}
        ) as resp,
    ):
        assert resp.status == 201, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def test_sign_in_refuses_a_wrong_token_and_opens_the_console_with_the_right_one(
    page: Page, system: System, shots: Path
) -> None:
    await page.goto(system.url + "/admin")
    assert page.url.endswith("/admin/signin")
    assert await page.inner_text("h1") == "Đăng nhập vận hành"
    await page.screenshot(path=shots / "admin-signin.png", full_page=True)
    await page.get_by_label("Mã quản trị (ADMIN_TOKEN)").fill("not-the-token")
    await page.get_by_role("button", name="Đăng nhập").click()
    notice = await page.inner_text("#signin-notice")
    assert notice == "Mã quản trị không đúng. Vui lòng kiểm tra lại."
    await page.get_by_label("Mã quản trị (ADMIN_TOKEN)").fill(system.settings.admin_token)
    await page.get_by_role("button", name="Đăng nhập").click()
    await page.wait_for_selector("body[data-page=overview]")
    assert await page.inner_text("h1") == "Tổng quan"
    # The cookie is the browser's only: scripts cannot read it.
    assert await page.evaluate("document.cookie") == ""
    await page.get_by_role("button", name="Đăng xuất").click()
    assert await page.inner_text("#signin-notice") == "Bạn đã đăng xuất."
    await page.goto(system.url + "/admin/sessions")
    assert page.url.endswith("/admin/signin")


async def test_filters_narrow_the_sessions_list(page: Page, system: System, shots: Path) -> None:
    first, second = new_account(), new_account()
    paid = await new_session(system, first, 30_000)
    await new_session(system, first, 40_000)
    other = await new_session(system, second, 50_000)
    await sim_pay(system, str(paid["orderCode"]))
    await sign_in(page, system)
    await page.get_by_role("link", name="Phiên nạp tiền").click()
    await page.get_by_label("Tài khoản").fill(first)
    await page.get_by_role("button", name="Lọc").click()
    await page.wait_for_selector("#sessions")
    accounts = await page.locator("#sessions tbody td:nth-child(3)").all_inner_texts()
    assert accounts == [first, first]
    assert str(other["orderCode"]) not in await page.inner_text("#sessions")
    await page.get_by_label("Trạng thái").select_option(label="Đã thanh toán")
    await page.get_by_role("button", name="Lọc").click()
    await page.wait_for_url(re.compile(r"status=completed"))
    orders = await page.locator("#sessions tbody td:nth-child(2)").all_inner_texts()
    assert orders == [str(paid["orderCode"])]
    assert await page.inner_text("#sessions tbody .badge") == "Đã thanh toán"
    assert await page.inner_text("#result-count") == "1 phiên phù hợp"
    # Shown with every session of both accounts for the screenshot.
    await page.goto(system.url + "/admin/sessions")
    await page.screenshot(path=shots / "admin-sessions.png", full_page=True)


async def test_resolving_an_issue_records_it_and_leaves_the_open_list(
    page: Page, system: System, shots: Path
) -> None:
    order_code = 800_000_000 + secrets.randbelow(10**8)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(system.settings.mongodb_url)
    try:
        store = Store(client)
        await Ledger(store).record(
            NewIssue(IssueKind.UNKNOWN_ORDER, order_code, "FT2611270001", 120_000, None)
        )
        doc = await store.issues.find_one({"orderCode": order_code})
        assert doc is not None
        item = f"#issue-{doc['_id']}"
        await sign_in(page, system)
        await page.get_by_role("link", name="Giao dịch cần xử lý").click()
        await page.wait_for_selector(item)
        assert "Không tìm thấy đơn hàng" in await page.inner_text(item)
        await page.screenshot(path=shots / "admin-issues.png", full_page=True)
        await page.locator(item).get_by_label("Người xử lý").fill("Nguyễn Lan")
        await page.locator(item).get_by_label("Cách xử lý").fill("Đã hoàn tiền cho khách")
        await page.locator(item).get_by_role("button", name="Đánh dấu đã xử lý").click()
        notice = await page.inner_text("#issue-notice")
        assert notice == f"Đã ghi nhận xử lý xong mục của đơn hàng {order_code}."
        assert await page.locator(item).count() == 0
        stored = await store.issues.find_one({"orderCode": order_code})
        assert stored is not None
        assert (stored["status"], stored["resolvedBy"], stored["note"]) == (
            "resolved",
            "Nguyễn Lan",
            "Đã hoàn tiền cho khách",
        )
    finally:
        await client.close()


def as_int(text: str) -> int:
    return int(text.replace(".", ""))


async def test_live_counters_move_when_a_payment_lands(
    page: Page, system: System, shots: Path
) -> None:
    await sign_in(page, system)
    payments = as_int(await until(page, "[data-counter=payments]", lambda t: t[:1].isdigit()))
    pending = as_int(await page.inner_text("[data-counter=pending]"))
    assert await page.inner_text("[data-counter=streams]") == "0"
    shopper = await page.context.new_page()
    order_code = await create_deposit(shopper, system, new_account(), 25_000)
    # The shopper's page holds a stream open at the gateway, and a pending session.
    await until(page, "[data-counter=streams]", lambda t: t == "1")
    await until(page, "[data-counter=pending]", lambda t: t.isdigit() and as_int(t) == pending + 1)
    await sim_pay(system, order_code)
    await shopper.wait_for_selector("body[data-state=paid]", timeout=5_000)
    await until(page, "[data-counter=payments]", lambda t: as_int(t) == payments + 1)
    await until(page, "[data-counter=pending]", lambda t: as_int(t) == pending)
    # The push to the shopper's stream is in the gateway's histogram now.
    p50 = await until(page, "[data-counter=p50]", lambda t: t.endswith(" ms"))
    p99 = await page.inner_text("[data-counter=p99]")
    assert re.fullmatch(r"\d+(,\d)? ms", p50) and re.fullmatch(r"\d+(,\d)? ms", p99), (p50, p99)
    await shopper.close()
    await until(page, "[data-counter=streams]", lambda t: t == "0")
    await page.screenshot(path=shots / "admin-overview.png", full_page=True)


async def test_the_payments_chart_is_drawn_on_the_server(page: Page, system: System) -> None:
    session = await new_session(system, new_account(), 10_000)
    # Delivered (acknowledged by the ingest) before the console counts.
    await sim_pay(system, str(session["orderCode"]), wait=True)
    await sign_in(page, system)
    assert await page.evaluate("document.getElementById('chart').naturalWidth") == 640
    payments = as_int(await page.inner_text("[data-counter=payments]"))
    assert payments >= 1
    svg = await page.request.get(system.url + "/admin/chart.svg")
    assert svg.ok and svg.headers["content-type"].startswith("image/svg+xml")
    counts = [int(n) for n in re.findall(r'class="bar" data-count="(\d+)"', await svg.text())]
    # The payment of a moment ago is in the last minute's bar, or the one before if a
    # minute began in between.
    assert len(counts) == 60 and sum(counts) == payments and sum(counts[-2:]) >= 1
    summary = await page.inner_text("#chart-summary")
    assert summary.startswith(f"{payments} thanh toán trong 60 phút qua")
    headers = (await page.request.get(system.url + "/admin")).headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "'unsafe-inline'" not in headers["content-security-policy"]

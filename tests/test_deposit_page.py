"""The deposit page in a real headless Chromium, against the whole system running as processes."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Page, Route
from pymongo import AsyncMongoClient

from devstack.system import Backends, System
from session_api.document import STREAM_DOWN_BEFORE_POLLING_MS
from shared.model import utcnow
from tests.helpers import browser_page, system_over

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture
def shots(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Where the page's screenshots go: the README's docs/ with `--update-screenshots`, a
    temporary folder otherwise (a test run leaves the checkout as it found it)."""
    return DOCS if request.config.getoption("--update-screenshots") else tmp_path


# The uuid of the session the page keeps for resuming after a reload.
SAVED_UUID = "JSON.parse(localStorage.getItem('paypush.session')).uuid"


@pytest.fixture(scope="module")
def system(servers: Backends) -> Iterator[System]:
    with system_over(servers, "page") as started:
        yield started


@pytest.fixture
async def page(system: System) -> AsyncIterator[Page]:
    async with browser_page() as page:
        yield page


def new_account() -> str:
    return "9" + "".join(secrets.choice("0123456789") for _ in range(9))


async def create_deposit(page: Page, system: System, account: str, amount: int = 50_000) -> str:
    """Fill the form, create the session, wait for its QR; return the orderCode shown."""
    await page.goto(system.page_url)
    await page.get_by_label("Tài khoản").fill(account)
    await page.get_by_label("Số tiền (VND)").fill(str(amount))
    await page.get_by_role("button", name="Tạo mã QR").click()
    await page.wait_for_selector("body[data-state=waiting]")
    # Polled from here: a page-side wait_for_function needs eval, which the page's CSP forbids.
    async with asyncio.timeout(5):
        while not await page.evaluate("document.getElementById('qr').naturalWidth > 0"):
            await asyncio.sleep(0.05)
    return await page.inner_text("#pay-order")


async def pending_sessions(system: System, account: str, n: int) -> None:
    """`n` pending sessions of `account`, made through session-api's API."""
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            async with http.post(
                f"{system.settings.site_public_url}/api/sessions",
                json={"accountNumber": account, "amount": 10_000},
            ) as resp:
                assert resp.status == 201


async def sim_pay(system: System, order_code: str, **body: Any) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{system.settings.payos_base_url}/sim/pay/{order_code}", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


async def test_paying_on_the_simulator_page_shows_success_within_a_second(
    page: Page, system: System, shots: Path
) -> None:
    await create_deposit(page, system, new_account(), 50_000)
    await page.screenshot(path=shots / "deposit-waiting.png", full_page=True)
    checkout = await page.get_attribute("#checkout", "href")
    assert checkout and checkout.startswith(system.settings.payos_base_url)
    payer = await page.context.new_page()
    await payer.goto(checkout)
    await payer.screenshot(path=shots / "simulator-checkout.png", full_page=True)
    clicked_at = time.time() * 1000
    await payer.get_by_role("button", name="Thanh toán 50.000 ₫", exact=True).click()
    await page.wait_for_selector("body[data-state=paid]", timeout=5_000)
    paid_at = await page.evaluate("window.paypushPaidAt")
    assert paid_at - clicked_at < 1_000
    status = await page.inner_text("#status")
    assert status.startswith("Đã nhận thanh toán 50.000\xa0₫ lúc ")
    # The time in vi-VN form, in Vietnam's zone: "14:07 27/11/2026".
    assert re.search(r"lúc \d{2}:\d{2} \d{2}/\d{2}/\d{4}\. Cảm ơn bạn!$", status), status
    assert await page.get_attribute("body", "data-transport") == "stream"
    await page.screenshot(path=shots / "deposit-paid.png", full_page=True)


async def test_blocked_stream_falls_back_to_polling_and_still_succeeds(
    page: Page, system: System
) -> None:
    async def block(route: Route) -> None:
        await route.abort()

    await page.route("**/api/webhooks/stream*", block)
    order_code = await create_deposit(page, system, new_account())
    waiting = time.monotonic()
    await page.wait_for_selector("body[data-transport=polling]", timeout=45_000)
    # Not before the stream has been down longer than a gateway restart takes.
    assert time.monotonic() - waiting >= STREAM_DOWN_BEFORE_POLLING_MS / 1000 - 2
    await sim_pay(system, order_code)
    # The page polls every 5 s.
    await page.wait_for_selector("body[data-state=paid]", timeout=8_000)
    assert "Đã nhận thanh toán" in await page.inner_text("#status")


async def test_refused_stream_is_opened_again_without_polling(page: Page, system: System) -> None:
    """A gateway that is full or stopping answers 503 (EventSource then gives up): the page
    opens the stream again after ~3 s instead of polling, up to its failure budget."""
    refused = 0

    async def full_twice(route: Route) -> None:
        nonlocal refused
        if refused < 2:
            refused += 1
            await route.fulfill(
                status=503,
                headers={"Retry-After": "3", "Content-Type": "application/json"},
                body='{"success": false, "error": "full", "retryable": true}',
            )
        else:
            await route.continue_()

    polls = 0

    def count(request: Any) -> None:
        nonlocal polls
        polls += "/api/webhooks?uuid=" in request.url

    page.on("request", count)
    await page.route("**/api/webhooks/stream*", full_twice)
    order_code = await create_deposit(page, system, new_account())
    await page.wait_for_selector("body[data-transport=stream]", timeout=20_000)
    assert refused == 2
    await sim_pay(system, order_code)
    await page.wait_for_selector("body[data-state=paid]", timeout=5_000)
    assert polls == 0
    assert await page.get_attribute("body", "data-transport") == "stream"


async def test_reload_mid_wait_resumes_the_same_session_and_qr(page: Page, system: System) -> None:
    order_code = await create_deposit(page, system, new_account())
    qr_before = await page.get_attribute("#qr", "src")
    await page.reload()
    await page.wait_for_selector("body[data-state=waiting]")
    assert await page.inner_text("#pay-order") == order_code
    assert await page.get_attribute("#qr", "src") == qr_before
    await sim_pay(system, order_code)
    await page.wait_for_selector("body[data-state=paid]", timeout=5_000)


async def test_partial_payment_shows_what_is_still_due(
    page: Page, system: System, shots: Path
) -> None:
    order_code = await create_deposit(page, system, new_account(), 40_000)
    await sim_pay(system, order_code, amount=15_000)
    await page.wait_for_selector("body[data-state=partial]", timeout=5_000)
    status = await page.inner_text("#status")
    assert (
        status == "Đã nhận 15.000\xa0₫ trên tổng số 40.000\xa0₫. Vui lòng chuyển thêm 25.000\xa0₫."
    )
    await page.screenshot(path=shots / "deposit-partial.png", full_page=True)
    await sim_pay(system, order_code, amount=25_000)
    await page.wait_for_selector("body[data-state=paid]", timeout=5_000)


async def expire_session(system: System, uuid: str) -> None:
    """Make `uuid`'s session outlive its day, and run the cleanup that expires it."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(system.settings.mongodb_url)
    try:
        sessions = client.get_default_database()["sessions"]
        doc = await sessions.find_one({"uuid": uuid})
        assert doc is not None
        # Created 25 h ago: cleanup's rule for a pending session that outlived its day.
        # (A whole-document replace: the stand-in mangles a datetime given to `$set`.)
        doc["createdAt"] = utcnow() - timedelta(hours=25)
        await sessions.replace_one({"_id": doc["_id"]}, doc)
    finally:
        await client.close()
    headers = {"Authorization": f"Bearer {system.settings.cron_secret}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{system.settings.site_public_url}/api/webhooks/cleanup", headers=headers
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()


async def test_expired_session_shows_expired(page: Page, system: System, shots: Path) -> None:
    await create_deposit(page, system, new_account())
    await expire_session(system, await page.evaluate(SAVED_UUID))
    await page.wait_for_selector("body[data-state=expired]", timeout=5_000)
    assert "đã hết hạn" in await page.inner_text("#status")
    await page.screenshot(path=shots / "deposit-expired.png", full_page=True)


async def test_resuming_a_session_that_expired_meanwhile_deposits_again_under_a_fresh_uuid(
    page: Page, system: System
) -> None:
    order_code = await create_deposit(page, system, new_account())
    old_uuid = await page.evaluate(SAVED_UUID)

    async def expire_first(route: Route) -> None:
        # The reload found the session pending and resumes it under its uuid; the cron job
        # expires it just before that request lands (a used uuid: 409, not retryable).
        if old_uuid in (route.request.post_data or ""):
            await expire_session(system, old_uuid)
        await route.continue_()

    await page.route("**/api/sessions", expire_first)
    await page.reload()
    await page.wait_for_selector("body[data-state=waiting]", timeout=5_000)
    assert await page.evaluate(SAVED_UUID) != old_uuid
    assert await page.inner_text("#pay-order") != order_code
    assert await page.inner_text("#error") == ""


async def test_sixth_pending_deposit_shows_the_limit_message(
    page: Page, system: System, shots: Path
) -> None:
    account = new_account()
    await pending_sessions(system, account, 5)
    await page.goto(system.page_url)
    await page.get_by_label("Tài khoản").fill(account)
    await page.get_by_role("button", name="Tạo mã QR").click()
    await page.wait_for_selector("body[data-state=limit]")
    assert "5/5 giao dịch nạp tiền chờ thanh toán" in await page.inner_text("#error")
    await page.screenshot(path=shots / "deposit-limit.png", full_page=True)


async def test_waiting_gives_up_after_ten_minutes_and_offers_a_new_qr(
    page: Page, system: System, shots: Path
) -> None:
    await page.clock.install()
    await create_deposit(page, system, new_account())
    await page.clock.fast_forward("10:01")
    await page.wait_for_selector("body[data-state=timeout]")
    assert "ngừng chờ sau 10 phút" in await page.inner_text("#error")
    await page.screenshot(path=shots / "deposit-timeout.png", full_page=True)
    await page.get_by_role("button", name="Tạo mã QR mới").click()
    await page.wait_for_selector("body[data-state=form]")
    assert await page.evaluate("localStorage.getItem('paypush.session')") is None


async def test_page_fetches_nothing_from_outside_and_sends_security_headers(
    page: Page, system: System
) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    response = await page.goto(system.page_url)
    assert response is not None
    headers = await response.all_headers()
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    await create_deposit(page, system, new_account())
    assert requested and all(url.startswith("http://127.0.0.1:") for url in requested)


async def test_form_rejects_bad_input_without_creating_anything(page: Page, system: System) -> None:
    await page.goto(system.page_url)
    await page.get_by_label("Tài khoản").fill("tài khoản")
    await page.get_by_role("button", name="Tạo mã QR").click()
    assert "tối đa 64 ký tự, gồm chữ, số và\xa0.\xa0_\xa0-" in await page.inner_text("#error")
    assert await page.get_attribute("body", "data-state") == "form"
    focused = await page.evaluate("document.activeElement.id")
    assert focused == "account"


@pytest.fixture
async def english_page(system: System) -> AsyncIterator[Page]:
    """A browser whose reader prefers English (Accept-Language: en-US)."""
    async with browser_page(locale="en-US") as page:
        yield page


async def test_page_speaks_english_to_a_browser_that_asks_for_it(
    english_page: Page, system: System
) -> None:
    page = english_page
    await page.goto(system.page_url)
    assert await page.get_attribute("html", "lang") == "en"
    assert await page.title() == "Deposit by bank transfer"
    await page.get_by_label("Account").fill(new_account())
    await page.get_by_label("Amount (VND)").fill("50000")
    await page.get_by_role("button", name="Create QR code").click()
    await page.wait_for_selector("body[data-state=waiting]")
    assert await page.inner_text("#status") == "Waiting for your transfer…"
    await sim_pay(system, await page.inner_text("#pay-order"))
    await page.wait_for_selector("body[data-state=paid]", timeout=5_000)
    assert (await page.inner_text("#status")).startswith("Payment received: ₫50,000 at ")


async def test_language_switch_is_remembered_across_reloads(page: Page, system: System) -> None:
    await page.goto(system.page_url)
    assert await page.get_attribute("html", "lang") == "vi"
    assert await page.inner_text("h1") == "Nạp tiền qua chuyển khoản"
    await page.get_by_role("link", name="English").click()
    await page.wait_for_selector("html[lang=en]")
    # The choice is in a cookie, not the address: a reload (or a later visit) keeps it.
    assert page.url == system.page_url
    await page.reload()
    assert await page.inner_text("h1") == "Deposit by bank transfer"
    assert await page.get_attribute("#lang-en", "aria-current") == "true"
    await page.get_by_role("link", name="Tiếng Việt").click()
    await page.wait_for_selector("html[lang=vi]")
    await page.reload()
    assert await page.inner_text("h1") == "Nạp tiền qua chuyển khoản"


async def test_switching_language_while_waiting_keeps_the_same_qr(
    page: Page, system: System
) -> None:
    order_code = await create_deposit(page, system, new_account(), 120_000)
    await page.get_by_role("link", name="English").click()
    await page.wait_for_selector("html[lang=en]")
    await page.wait_for_selector("body[data-state=waiting]")
    assert await page.inner_text("#pay-order") == order_code
    assert await page.inner_text("#pay-amount") == "₫120,000"
    assert (await page.inner_text("#countdown")).endswith(" left")
    await sim_pay(system, order_code)
    await page.wait_for_selector("body[data-state=paid]", timeout=5_000)


async def test_simulator_checkout_speaks_vietnamese_and_switches_to_english(
    page: Page, system: System
) -> None:
    await create_deposit(page, system, new_account(), 30_000)
    checkout = await page.get_attribute("#checkout", "href")
    assert checkout is not None
    payer = await page.context.new_page()
    await payer.goto(checkout)
    assert await payer.get_attribute("html", "lang") == "vi"
    assert await payer.inner_text("#link-status") == "Chờ thanh toán"
    await payer.get_by_role("button", name="Thanh toán thiếu (15.000 ₫)").click()
    assert await payer.inner_text("#message") == ("Đã chuyển 15.000 ₫ và gửi webhook thành công.")
    assert await payer.inner_text("#link-status") == "Thanh toán thiếu"
    await payer.get_by_role("link", name="English").click()
    await payer.wait_for_selector("html[lang=en]")
    assert await payer.inner_text("#link-status") == "Underpaid"
    assert await payer.inner_text("#message") == "Transferred 15,000 VND; webhook delivered."
    await payer.reload()
    await payer.get_by_role("button", name="Pay 15,000 VND", exact=True).click()
    assert await payer.inner_text("#link-status") == "Paid"
    await page.wait_for_selector("body[data-state=paid]", timeout=5_000)


async def _pending_count(system: System, account: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{system.settings.site_public_url}/api/webhooks/check-session-limit",
            params={"accountNumber": account},
        ) as resp,
    ):
        body: dict[str, Any] = await resp.json()
        return int(body["pendingCount"])


async def test_cancel_on_the_page_cancels_and_frees_the_slot_for_a_sixth_deposit(
    page: Page, system: System, shots: Path
) -> None:
    account = new_account()
    await pending_sessions(system, account, 4)
    await create_deposit(page, system, account)
    assert await _pending_count(system, account) == 5
    await page.get_by_role("button", name="Huỷ giao dịch").click()
    await page.wait_for_selector("body[data-state=cancelled]", timeout=5_000)
    assert await page.inner_text("#status") == (
        "Bạn đã huỷ giao dịch này. Khi cần, bạn có thể tạo mã QR mới."
    )
    assert await page.evaluate("localStorage.getItem('paypush.session')") is None
    await page.screenshot(path=shots / "deposit-cancelled.png", full_page=True)
    assert await _pending_count(system, account) == 4
    # The place is free again: a sixth deposit for the account goes through.
    await page.get_by_role("button", name="Tạo mã QR mới").click()
    await page.get_by_role("button", name="Tạo mã QR").click()
    await page.wait_for_selector("body[data-state=waiting]", timeout=5_000)
    assert await _pending_count(system, account) == 5


async def test_cancel_on_the_checkout_page_comes_back_cancelled(page: Page, system: System) -> None:
    account = new_account()
    order_code = await create_deposit(page, system, account)
    uuid = await page.evaluate(SAVED_UUID)
    checkout = await page.get_attribute("#checkout", "href")
    assert checkout
    # In the same tab, as a shopper who follows the checkout link on a phone.
    await page.goto(checkout)
    await page.get_by_role("button", name="Huỷ thanh toán").click()
    await page.wait_for_selector("body[data-state=cancelled]", timeout=5_000)
    # Back on our page, its address cleaned: a reload does not cancel again.
    assert page.url == system.page_url.rstrip("/") + "/"
    assert await _pending_count(system, account) == 0
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{system.settings.site_public_url}/api/webhooks", params={"uuid": uuid}) as resp,
    ):
        body = await resp.json()
    assert (body["status"], str(body["orderCode"])) == ("cancelled", order_code)


async def test_cancel_after_the_payment_landed_shows_it_paid(page: Page, system: System) -> None:
    """The payment wins: PayOS took it (its webhook lost), the shopper presses cancel."""

    async def block(route: Route) -> None:
        await route.abort()

    # No stream: the paid state can only come from the cancel's answer.
    await page.route("**/api/webhooks/stream*", block)
    order_code = await create_deposit(page, system, new_account())
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{system.settings.payos_base_url}/sim/faults", json={"dropAllDeliveries": True}
        ) as resp:
            assert resp.status == 200
        try:
            await sim_pay(system, order_code)
            await page.get_by_role("button", name="Huỷ giao dịch").click()
            await page.wait_for_selector("body[data-state=paid]", timeout=5_000)
        finally:
            async with http.post(
                f"{system.settings.payos_base_url}/sim/faults", json={"dropAllDeliveries": False}
            ) as resp:
                assert resp.status == 200

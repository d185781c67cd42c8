"""The PayOS simulator, driven by the unmodified payos SDK, delivering to a real ingest."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from payos import APIError, AsyncPayOS, WebhookError
from payos.types import CreatePaymentLinkRequest

from shared.mongo import Store
from shared.settings import Settings
from tests.helpers import Sim, add_session, simulator_to_ingest


@pytest.fixture
async def sim(settings: Settings, store: Store) -> AsyncIterator[Sim]:
    async with simulator_to_ingest(settings) as running:
        yield running


def _request(order_code: int, amount: int = 15_000) -> CreatePaymentLinkRequest:
    return CreatePaymentLinkRequest(
        order_code=order_code,
        amount=amount,
        description="NAPTIEN",
        cancel_url="http://127.0.0.1:8083/",
        return_url="http://127.0.0.1:8083/",
    )


async def test_sdk_creates_gets_and_cancels_a_link(sim: Sim) -> None:
    order_code = secrets.randbelow(10**9) + 1
    created = await sim.payos.payment_requests.create(_request(order_code))
    assert (created.order_code, created.amount, created.status) == (order_code, 15_000, "PENDING")
    assert created.checkout_url.startswith(sim.url) and created.qr_code.startswith("000201")
    fetched = await sim.payos.payment_requests.get(order_code)
    assert (fetched.id, fetched.amount_remaining) == (created.payment_link_id, 15_000)
    cancelled = await sim.payos.payment_requests.cancel(order_code, "changed my mind")
    assert (cancelled.status, cancelled.cancellation_reason) == ("CANCELLED", "changed my mind")


async def test_sdk_rejects_a_duplicate_order_code(sim: Sim) -> None:
    order_code = secrets.randbelow(10**9) + 1
    await sim.payos.payment_requests.create(_request(order_code))
    with pytest.raises(APIError) as err:
        await sim.payos.payment_requests.create(_request(order_code))
    assert err.value.error_code == "231"


async def test_late_mode_creates_the_link_and_answers_after_the_delay(sim: Sim) -> None:
    order_code = secrets.randbelow(10**9) + 1
    async with sim.http.post(
        f"{sim.url}/sim/faults", json={"mode": "late", "delaySeconds": 5}
    ) as resp:
        assert resp.status == 200
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await sim.payos.payment_requests.create(_request(order_code))
    # Only the creation is late: the link is there, and PayOS's other calls answer at once.
    async with asyncio.timeout(1):
        fetched = await sim.payos.payment_requests.get(order_code)
    assert (fetched.order_code, fetched.status) == (order_code, "PENDING")


async def test_wrong_api_key_is_refused(sim: Sim, settings: Settings) -> None:
    intruder = AsyncPayOS(
        "dev-client-id", "wrong", settings.payos_checksum_key, base_url=sim.url, max_retries=0
    )
    with pytest.raises(APIError):
        await intruder.payment_requests.create(_request(1))
    await intruder.aclose()


async def test_paying_a_link_delivers_a_signed_webhook_that_completes_the_session(
    sim: Sim, store: Store
) -> None:
    session = await add_session(store, amount=15_000)
    await sim.payos.payment_requests.create(_request(session["orderCode"]))
    paid = await sim.pay(session["orderCode"])
    assert (paid["delivered"], paid["status"]) == (True, "PAID")
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and stored["status"] == "completed"
    link = await sim.payos.payment_requests.get(session["orderCode"])
    assert (link.status, link.amount_paid, len(link.transactions)) == ("PAID", 15_000, 1)


async def test_partial_payment_leaves_link_underpaid_and_session_pending(
    sim: Sim, store: Store
) -> None:
    session = await add_session(store, amount=15_000)
    await sim.payos.payment_requests.create(_request(session["orderCode"]))
    paid = await sim.pay(session["orderCode"], amount=5_000)
    assert paid["status"] == "UNDERPAID"
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and (stored["status"], stored["amountPaid"]) == ("pending", 5_000)


async def test_duplicate_deliveries_are_stored_once(sim: Sim, store: Store) -> None:
    session = await add_session(store, amount=15_000)
    await sim.payos.payment_requests.create(_request(session["orderCode"]))
    paid = await sim.pay(session["orderCode"], copies=5)
    assert paid["firstStatuses"] == [200] * 5
    assert await store.webhooks.count_documents({"orderCode": session["orderCode"]}) == 1


async def test_lost_deliveries_are_redelivered_until_acknowledged(sim: Sim, store: Store) -> None:
    session = await add_session(store, amount=15_000)
    await sim.payos.payment_requests.create(_request(session["orderCode"]))
    async with sim.http.post(f"{sim.url}/sim/faults", json={"dropDeliveries": 2}):
        pass
    paid = await sim.pay(session["orderCode"], wait=True)
    assert (paid["delivered"], paid["attempts"]) == (True, [0, 0, 200])
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and stored["status"] == "completed"
    async with sim.http.get(f"{sim.url}/sim/deliveries") as resp:
        [delivery] = await resp.json()
    assert delivery["delivered"] is True


async def test_confirm_webhook_sends_payos_test_delivery(sim: Sim, store: Store) -> None:
    result = await sim.payos.webhooks.confirm(sim.ingest_url)
    assert result.webhook_url == sim.ingest_url
    recorded = await store.webhooks.find_one({"orderCode": 123})
    assert recorded is not None and recorded["data"]["description"] == "VQRIO123"


async def test_confirm_webhook_fails_for_a_url_that_does_not_answer(sim: Sim) -> None:
    with pytest.raises(WebhookError):
        await sim.payos.webhooks.confirm("http://127.0.0.1:9/api/webhooks")


async def test_checkout_page_pays_in_full(sim: Sim, store: Store) -> None:
    session = await add_session(store, amount=15_000)
    created = await sim.payos.payment_requests.create(_request(session["orderCode"]))
    async with sim.http.get(created.checkout_url) as resp:
        page = await resp.text()
    assert resp.status == 200 and 'id="pay"' in page and "Thanh toán 15.000 ₫" in page
    async with sim.http.post(f"{created.checkout_url}/pay") as resp:
        after = await resp.text()
    assert "Đã chuyển 15.000 ₫ và gửi webhook thành công." in after
    assert 'data-status="PAID">Đã thanh toán<' in after
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and stored["status"] == "completed"


async def test_checkout_page_speaks_english_when_asked(sim: Sim, store: Store) -> None:
    session = await add_session(store, amount=15_000)
    created = await sim.payos.payment_requests.create(_request(session["orderCode"]))
    english = {"Accept-Language": "en-GB,en;q=0.9,vi;q=0.5"}
    async with sim.http.get(created.checkout_url, headers=english) as resp:
        page = await resp.text()
    assert resp.headers["Content-Language"] == "en"
    assert '<html lang="en">' in page and "Pay 15,000 VND" in page and ">Pending<" in page


async def test_checkout_language_switch_sets_a_cookie_and_keeps_the_message(sim: Sim) -> None:
    order_code = secrets.randbelow(10**9) + 1
    created = await sim.payos.payment_requests.create(_request(order_code))
    async with sim.http.get(
        f"{created.checkout_url}?m=cancelled&lang=en", allow_redirects=False
    ) as resp:
        assert resp.status == 303
        assert resp.headers["Location"].endswith(
            f"{created.checkout_url.rsplit('/', 1)[1]}?m=cancelled"
        )
        assert "paypush_lang=en" in resp.headers["Set-Cookie"]


async def test_checkout_shows_no_text_taken_from_its_address(sim: Sim) -> None:
    order_code = secrets.randbelow(10**9) + 1
    created = await sim.payos.payment_requests.create(_request(order_code))
    async with sim.http.get(created.checkout_url, params={"m": "<b>Pay to 123</b>"}) as resp:
        page = await resp.text()
    assert resp.status == 200 and "Pay to 123" not in page
    assert '<p role="status" id="message"></p>' in page


async def test_checkout_page_pays_less_then_cancels(sim: Sim, store: Store) -> None:
    session = await add_session(store, amount=15_000)
    created = await sim.payos.payment_requests.create(_request(session["orderCode"]))
    async with sim.http.post(f"{created.checkout_url}/pay-less") as resp:
        assert 'data-status="UNDERPAID">Thanh toán thiếu<' in await resp.text()
    async with sim.http.post(f"{created.checkout_url}/cancel", allow_redirects=False) as resp:
        # Back to the merchant's cancel URL with PayOS's query, as PayOS does.
        assert resp.status == 303
        assert resp.headers["Location"] == (
            "http://127.0.0.1:8083/?code=00&id="
            + created.payment_link_id
            + f"&cancel=true&status=CANCELLED&orderCode={session['orderCode']}"
        )
    async with sim.http.get(created.checkout_url) as resp:
        after = await resp.text()
    assert 'data-status="CANCELLED">Đã huỷ<' in after
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and (stored["status"], stored["amountPaid"]) == ("pending", 7_500)
    link = await sim.payos.payment_requests.get(session["orderCode"])
    assert link.status == "CANCELLED"


async def _faults(sim: Sim, **faults: Any) -> None:
    async with sim.http.post(f"{sim.url}/sim/faults", json=faults) as resp:
        assert resp.status == 200


async def test_get_reports_every_transaction_like_payos_when_no_webhook_got_through(
    sim: Sim, store: Store
) -> None:
    session = await add_session(store, amount=15_000)
    await sim.payos.payment_requests.create(_request(session["orderCode"]))
    await _faults(sim, dropAllDeliveries=True)
    first = await sim.pay(session["orderCode"], amount=5_000)
    second = await sim.pay(session["orderCode"], amount=10_000)
    assert (first["delivered"], second["delivered"]) == (False, False)
    # Read through the unmodified SDK, which checks the response's signature.
    link = await sim.payos.payment_requests.get(session["orderCode"])
    assert (link.status, link.amount_paid, link.amount_remaining) == ("PAID", 15_000, 0)
    assert [(t.reference, t.amount) for t in link.transactions] == [
        (first["reference"], 5_000),
        (second["reference"], 10_000),
    ]
    assert (
        link.transactions[0].transaction_date_time
        == first["webhook"]["data"]["transactionDateTime"]
    )
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and (stored["status"], stored["amountPaid"]) == ("pending", 0)


async def test_dropped_deliveries_arrive_when_redelivered_later(sim: Sim, store: Store) -> None:
    session = await add_session(store, amount=15_000)
    await sim.payos.payment_requests.create(_request(session["orderCode"]))
    await _faults(sim, dropAllDeliveries=True)
    await sim.pay(session["orderCode"])
    await _faults(sim)
    async with sim.http.post(f"{sim.url}/sim/deliveries/redeliver") as resp:
        assert await resp.json() == {"attempted": 1, "delivered": 1}
    stored = await store.sessions.find_one({"uuid": session["uuid"]})
    assert stored is not None and stored["status"] == "completed"


async def test_get_calls_are_counted_per_order(sim: Sim) -> None:
    order_code = secrets.randbelow(10**9) + 1
    await sim.payos.payment_requests.create(_request(order_code))
    for _ in range(3):
        await sim.payos.payment_requests.get(order_code)
    async with sim.http.get(f"{sim.url}/sim/calls") as resp:
        assert (await resp.json())["get"] == {str(order_code): 3}


async def test_a_link_past_its_expiry_takes_no_payment(sim: Sim) -> None:
    order_code = secrets.randbelow(10**9) + 1
    request = _request(order_code)
    request.expired_at = int(time.time()) - 1
    await sim.payos.payment_requests.create(request)
    async with sim.http.post(f"{sim.url}/sim/pay/{order_code}", json={}) as resp:
        assert resp.status == 409
    link = await sim.payos.payment_requests.get(order_code)
    assert (link.status, link.transactions) == ("EXPIRED", [])

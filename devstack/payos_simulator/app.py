"""The simulator's app: PayOS's own API paths plus `/sim/*` actions for people and tests."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web

from shared.settings import Settings
from shared.signing import sign_data, sign_payment_request
from shared.web import request_context_middleware

from .appkeys import HTTP, RETRY_DELAYS, SETTINGS, TASKS, WORLD
from .checkout import add_checkout_routes
from .delivery import attempt, signed_delivery, transfer
from .state import (
    ACCOUNT_NAME,
    ACCOUNT_NUMBER,
    BANK_BIN,
    Faults,
    PaymentLink,
    Transaction,
    World,
    new_link_id,
    new_reference,
    vn_now,
)
from .vietqr import vietqr_payload

log = structlog.get_logger(__name__)


# PayOS limits a payment link's description to 25 characters.
MAX_DESCRIPTION = 25
TEST_ORDER_CODE = 123
TEST_DESCRIPTION = "VQRIO123"


def payos_ok(data: dict[str, Any], key: str) -> web.Response:
    """PayOS's envelope, with `data` signed as PayOS signs response bodies."""
    return web.json_response(
        {"code": "00", "desc": "success", "data": data, "signature": sign_data(data, key)}
    )


def payos_error(status: int, code: str, desc: str) -> web.Response:
    return web.json_response({"code": code, "desc": desc, "data": None}, status=status)


def _authorised(request: web.Request) -> bool:
    s = request.app[SETTINGS]
    return hmac.compare_digest(
        request.headers.get("x-client-id", ""), s.payos_client_id
    ) and hmac.compare_digest(request.headers.get("x-api-key", ""), s.payos_api_key)


async def _apply_faults(request: web.Request) -> web.Response | None:
    faults = request.app[WORLD].faults
    if faults.mode == "slow":
        await asyncio.sleep(faults.delay_seconds)
    elif faults.mode == "error":
        return payos_error(200, "20", "Internal error (simulated)")
    elif faults.mode == "down":
        return payos_error(503, "503", "Service unavailable (simulated)")
    if not _authorised(request):
        return payos_error(401, "201", "Invalid x-client-id or x-api-key")
    return None


async def create_payment_request(request: web.Request) -> web.Response:
    if (fault := await _apply_faults(request)) is not None:
        return fault
    settings, world = request.app[SETTINGS], request.app[WORLD]
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return payos_error(400, "400", "Invalid JSON")
    if not isinstance(body, dict):
        return payos_error(400, "400", "Invalid body")
    order_code, amount = body.get("orderCode"), body.get("amount")
    description = body.get("description")
    if not isinstance(order_code, int) or not isinstance(amount, int) or amount <= 0:
        return payos_error(200, "20", "orderCode and a positive amount are required")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        return payos_error(200, "20", f"description must be at most {MAX_DESCRIPTION} characters")
    expected = sign_payment_request(body, settings.payos_checksum_key) or ""
    if not hmac.compare_digest(expected, str(body.get("signature", ""))):
        return payos_error(200, "201", "Signature is invalid")
    if order_code in world.by_order:
        return payos_error(200, "231", "Payment link for this orderCode already exists")
    link = PaymentLink(
        id=new_link_id(),
        order_code=order_code,
        amount=amount,
        description=description,
        cancel_url=str(body.get("cancelUrl", "")),
        return_url=str(body.get("returnUrl", "")),
        created_at=vn_now(),
        expired_at=body.get("expiredAt") if isinstance(body.get("expiredAt"), int) else None,
    )
    world.add(link)
    if world.faults.mode == "late":
        # PayOS created the link, its answer is late: a caller that gives up must not assume
        # that nothing was created.
        await asyncio.sleep(world.faults.delay_seconds)
    # Links point back at this simulator, at whatever address the caller reached it on.
    base = str(request.url.origin())
    data = {
        "bin": BANK_BIN,
        "accountNumber": ACCOUNT_NUMBER,
        "accountName": ACCOUNT_NAME,
        "amount": amount,
        "description": description,
        "orderCode": order_code,
        "currency": "VND",
        "paymentLinkId": link.id,
        "status": "PENDING",
        "expiredAt": link.expired_at,
        "checkoutUrl": f"{base}/web/{link.id}",
        "qrCode": vietqr_payload(BANK_BIN, ACCOUNT_NUMBER, amount, description),
    }
    return payos_ok(data, settings.payos_checksum_key)


async def get_payment_request(request: web.Request) -> web.Response:
    if (fault := await _apply_faults(request)) is not None:
        return fault
    world = request.app[WORLD]
    link = world.find(request.match_info["ref"])
    if link is None:
        return payos_error(200, "101", "Payment link not found")
    world.get_calls[link.order_code] += 1
    return payos_ok(link.to_payos(), request.app[SETTINGS].payos_checksum_key)


async def cancel_payment_request(request: web.Request) -> web.Response:
    if (fault := await _apply_faults(request)) is not None:
        return fault
    link = request.app[WORLD].find(request.match_info["ref"])
    if link is None:
        return payos_error(200, "101", "Payment link not found")
    with contextlib.suppress(json.JSONDecodeError):
        body = await request.json()
        if isinstance(body, dict) and isinstance(body.get("cancellationReason"), str):
            link.cancellation_reason = body["cancellationReason"]
    if link.status in ("PENDING", "UNDERPAID"):
        link.canceled_at = vn_now()
    return payos_ok(link.to_payos(), request.app[SETTINGS].payos_checksum_key)


async def confirm_webhook(request: web.Request) -> web.Response:
    """PayOS checks a merchant's webhook URL by sending it a test delivery (orderCode 123)."""
    if not _authorised(request):
        return payos_error(401, "201", "Invalid x-client-id or x-api-key")
    body = await request.json()
    url = body.get("webhookUrl") if isinstance(body, dict) else None
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
        return payos_error(200, "20", "webhookUrl is required")
    tx = Transaction(new_reference(), 3000, TEST_DESCRIPTION, vn_now())
    delivery = signed_delivery(
        request.app, TEST_ORDER_CODE, "test-link", TEST_DESCRIPTION, tx, "00"
    )
    request.app[WORLD].deliveries.append(delivery)
    status = await attempt(request.app, url, delivery)
    if not 200 <= status < 300:
        return payos_error(200, "20", f"Webhook URL answered {status or 'nothing'}")
    settings = request.app[SETTINGS]
    data = {
        "webhookUrl": url,
        "accountName": ACCOUNT_NAME,
        "accountNumber": ACCOUNT_NUMBER,
        "name": ACCOUNT_NAME,
        "shortName": "DEMO",
    }
    return payos_ok(data, settings.payos_checksum_key)


async def pay(request: web.Request) -> web.Response:
    """`POST /sim/pay/{ref}`: a bank transfer arrives; PayOS sends (and resends) the webhook.

    Body (all optional): `amount` (less than due = partial), `reference`, `code` ("00" paid),
    `copies` (deliver the same webhook N times at once, as PayOS's retries can), `wait`
    (answer only after a delivery was acknowledged).
    """
    link = request.app[WORLD].find(request.match_info["ref"])
    if link is None:
        return web.json_response({"error": "no such payment link"}, status=404)
    body: dict[str, Any] = {}
    if request.can_read_body:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": "invalid JSON"}, status=400)
    if link.status in ("PAID", "CANCELLED", "EXPIRED") and not body.get("force"):
        return web.json_response({"error": f"payment link is {link.status}"}, status=409)
    amount = body.get("amount", max(link.amount - link.amount_paid, 0) or link.amount)
    if not isinstance(amount, int) or amount <= 0:
        return web.json_response({"error": "amount must be a positive integer"}, status=400)
    result = await transfer(
        request.app,
        link,
        amount,
        code=str(body.get("code", "00")),
        reference=body.get("reference"),
        copies=max(1, min(int(body.get("copies", 1)), 100)),
        wait=bool(body.get("wait")),
    )
    return web.json_response(result)


async def set_faults(request: web.Request) -> web.Response:
    """`POST /sim/faults` `{mode, delaySeconds, dropDeliveries, dropAllDeliveries,
    deliveryDelaySeconds}`.

    For fault tests: `mode` and `delaySeconds` make the payment-link API misbehave (`slow`
    answers every call late, `late` answers a creation late after creating the link),
    `dropDeliveries` loses that many webhook delivery attempts, `dropAllDeliveries` every
    one while set, `deliveryDelaySeconds` holds back every delivery attempt. Each call
    replaces all of them.
    """
    body = await request.json()
    world = request.app[WORLD]
    world.faults = Faults(
        mode=str(body.get("mode", "none")),
        delay_seconds=float(body.get("delaySeconds", 0)),
        drop_deliveries=int(body.get("dropDeliveries", 0)),
        delivery_delay_seconds=float(body.get("deliveryDelaySeconds", 0)),
        drop_all_deliveries=bool(body.get("dropAllDeliveries", False)),
    )
    return web.json_response({"mode": world.faults.mode})


async def redeliver_pending(request: web.Request) -> web.Response:
    """`POST /sim/deliveries/redeliver`: one more attempt of every delivery not acknowledged
    yet (PayOS's retry that finally gets through); how many were acknowledged now."""
    app = request.app
    url = app[SETTINGS].payos_webhook_url
    waiting = [d for d in app[WORLD].deliveries if not d.delivered]
    statuses = await asyncio.gather(*(attempt(app, url, d) for d in waiting))
    return web.json_response(
        {"attempted": len(waiting), "delivered": sum(200 <= s < 300 for s in statuses)}
    )


async def payos_calls(request: web.Request) -> web.Response:
    """`GET /sim/calls`: `payment_requests.get` calls per orderCode."""
    calls = request.app[WORLD].get_calls
    return web.json_response({"get": {str(k): v for k, v in calls.items()}})


async def list_deliveries(request: web.Request) -> web.Response:
    deliveries = request.app[WORLD].deliveries
    return web.json_response(
        [{"body": d.body, "attempts": d.attempts, "delivered": d.delivered} for d in deliveries]
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _http_ctx(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        app[HTTP] = http
        yield
        tasks = app[TASKS]
        for task in tasks.copy():
            task.cancel()


def create_app(
    settings: Settings, *, retry_delays: Sequence[float] = (0.5, 1, 2, 4, 8, 15, 30, 60)
) -> web.Application:
    """The PayOS simulator; `retry_delays` spaces its webhook redeliveries."""
    app = web.Application(middlewares=[request_context_middleware])
    app[SETTINGS] = settings
    app[WORLD] = World()
    app[RETRY_DELAYS] = tuple(retry_delays)
    app[TASKS] = set()
    app.cleanup_ctx.append(_http_ctx)
    app.router.add_post("/v2/payment-requests", create_payment_request)
    app.router.add_get("/v2/payment-requests/{ref}", get_payment_request)
    app.router.add_post("/v2/payment-requests/{ref}/cancel", cancel_payment_request)
    app.router.add_post("/confirm-webhook", confirm_webhook)
    app.router.add_post("/sim/pay/{ref}", pay)
    app.router.add_post("/sim/faults", set_faults)
    app.router.add_get("/sim/deliveries", list_deliveries)
    app.router.add_post("/sim/deliveries/redeliver", redeliver_pending)
    app.router.add_get("/sim/calls", payos_calls)
    app.router.add_get("/healthz", healthz)
    add_checkout_routes(app)
    return app

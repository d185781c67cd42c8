"""Webhook deliveries as PayOS makes them: signed, retried until acknowledged."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from .appkeys import HTTP, RETRY_DELAYS, SETTINGS, TASKS, WORLD
from .state import Delivery, PaymentLink, Transaction, new_reference, vn_now
from .webhooks import webhook_body

log = structlog.get_logger(__name__)


async def transfer(
    app: web.Application,
    link: PaymentLink,
    amount: int,
    *,
    code: str = "00",
    reference: object = None,
    copies: int = 1,
    wait: bool = False,
) -> dict[str, Any]:
    """A transfer to `link` arrives: record it and deliver its webhook, redelivering on failure."""
    tx = Transaction(str(reference or new_reference()), amount, link.description, vn_now())
    if code == "00":
        link.transactions.append(tx)
    delivery = signed_delivery(app, link.order_code, link.id, link.description, tx, code)
    app[WORLD].deliveries.append(delivery)
    url = app[SETTINGS].payos_webhook_url
    statuses = await asyncio.gather(*(attempt(app, url, delivery) for _ in range(copies)))
    if not delivery.delivered:
        task = asyncio.create_task(redeliver(app, url, delivery))
        app[TASKS].add(task)
        task.add_done_callback(app[TASKS].discard)
        if wait:
            await task
    return {
        "orderCode": link.order_code,
        "status": link.status,
        "reference": tx.reference,
        "amount": amount,
        "delivered": delivery.delivered,
        "attempts": delivery.attempts,
        "firstStatuses": statuses,
        "webhook": delivery.body,
    }


def signed_delivery(
    app: web.Application,
    order_code: int,
    link_id: str,
    description: str,
    tx: Transaction,
    code: str,
) -> Delivery:
    body = webhook_body(
        order_code=order_code,
        link_id=link_id,
        description=description,
        tx=tx,
        checksum_key=app[SETTINGS].payos_checksum_key,
        code=code,
    )
    return Delivery(body=body)


async def attempt(app: web.Application, url: str, delivery: Delivery) -> int:
    world = app[WORLD]
    if world.faults.drop_all_deliveries:
        delivery.attempts.append(0)
        return 0
    if world.faults.drop_deliveries > 0:
        world.faults.drop_deliveries -= 1
        delivery.attempts.append(0)
        return 0
    if world.faults.delivery_delay_seconds > 0:
        await asyncio.sleep(world.faults.delivery_delay_seconds)
    try:
        async with app[HTTP].post(url, json=delivery.body) as resp:
            await resp.read()
            status: int = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.info("webhook_delivery_failed", url=url, error=str(exc))
        status = 0
    delivery.attempts.append(status)
    return status


async def redeliver(app: web.Application, url: str, delivery: Delivery) -> None:
    """Deliver again, with growing delays, until acknowledged (as PayOS does)."""
    for delay in app[RETRY_DELAYS]:
        await asyncio.sleep(delay)
        if 200 <= await attempt(app, url, delivery) < 300:
            return
    log.warning("webhook_given_up", order_code=delivery.body["data"]["orderCode"])

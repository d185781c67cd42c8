"""The simulator's checkout page (a link's `checkoutUrl`): a person pays, pays less, cancels."""

from __future__ import annotations

import html
from urllib.parse import urlencode

from aiohttp import web

from .appkeys import WORLD
from .delivery import transfer
from .state import PaymentLink, vn_now

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>PayOS simulator: order {order}</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 420px; margin: 24px auto;
        padding: 0 12px; color: #1b1f24; }}
.badge {{ display: inline-block; padding: 2px 8px; border-radius: 6px; background: #e8eef5; }}
button {{ width: 100%; padding: 12px; margin: 6px 0; font: inherit; font-weight: 600;
          border: 0; border-radius: 8px; color: #fff; background: #0b5cad; cursor: pointer; }}
button.secondary {{ background: #4a5360; }} button.danger {{ background: #a1161c; }}
:focus-visible {{ outline: 3px solid #f0a500; outline-offset: 2px; }}
</style></head><body>
<h1>PayOS simulator</h1>
<p role="status" id="message">{message}</p>
<dl>
  <dt>Order</dt><dd id="order">{order}</dd>
  <dt>Amount</dt><dd>{amount} VND</dd>
  <dt>Paid</dt><dd id="paid">{paid} VND</dd>
  <dt>Status</dt><dd><span class="badge" id="link-status">{status}</span></dd>
</dl>
<form method="post" action="/web/{id}/pay">
  <button id="pay" {disabled}>Pay {remaining} VND</button></form>
<form method="post" action="/web/{id}/pay-less">
  <button id="pay-less" class="secondary" {disabled}>Pay less ({half} VND)</button></form>
<form method="post" action="/web/{id}/cancel">
  <button id="cancel" class="danger" {disabled}>Cancel payment</button></form>
</body></html>"""


def _link(request: web.Request) -> PaymentLink:
    link = request.app[WORLD].find(request.match_info["id"])
    if link is None:
        raise web.HTTPNotFound(text="no such payment link")
    return link


async def page(request: web.Request) -> web.Response:
    link = _link(request)
    remaining = max(link.amount - link.amount_paid, 0)
    open_ = link.status in ("PENDING", "UNDERPAID")
    body = _PAGE.format(
        id=html.escape(link.id),
        order=link.order_code,
        amount=f"{link.amount:,}",
        paid=f"{link.amount_paid:,}",
        remaining=f"{remaining:,}",
        half=f"{max(remaining // 2, 1):,}",
        status=link.status,
        message=html.escape(request.query.get("m", "")),
        disabled="" if open_ else "disabled",
    )
    return web.Response(text=body, content_type="text/html")


async def act(request: web.Request) -> web.Response:
    link = _link(request)
    action = request.match_info["action"]
    remaining = max(link.amount - link.amount_paid, 0)
    if link.status not in ("PENDING", "UNDERPAID"):
        message = f"This payment link is {link.status}."
    elif action == "cancel":
        link.canceled_at = vn_now()
        link.cancellation_reason = "cancelled on the checkout page"
        message = "Payment cancelled."
    else:
        amount = remaining if action == "pay" else max(remaining // 2, 1)
        result = await transfer(request.app, link, amount)
        state = "delivered" if result["delivered"] else "not delivered yet (retrying)"
        message = f"Transferred {amount:,} VND; webhook {state}."
    raise web.HTTPSeeOther(f"/web/{link.id}?" + urlencode({"m": message}))


def add_checkout_routes(app: web.Application) -> None:
    app.router.add_get("/web/{id}", page)
    app.router.add_post("/web/{id}/{action:pay|pay-less|cancel}", act)

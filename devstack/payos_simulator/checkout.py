"""The simulator's checkout page (a link's `checkoutUrl`): a person pays, pays less, cancels.

Vietnamese unless the reader asks for English (`shared.i18n`); its words are in
`locales/<language>.json`.
"""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import urlencode

from aiohttp import web

from shared.i18n import (
    Catalogues,
    Language,
    language_switch,
    request_language,
    switch_redirect,
)

from .appkeys import WORLD
from .delivery import transfer
from .state import PaymentLink, vn_now

LOCALES_DIR = Path(__file__).parent / "locales"
# Loaded at import: the simulator is a development tool, and a catalogue that lacks a key
# should stop it (and the test that imports it) at once.
CATALOGUES = Catalogues.load(LOCALES_DIR)
# What an action tells the page it redirects to (`?m=`): a key, never text from the address.
MESSAGES = ("closed", "cancelled", "delivered", "retrying")

_STYLE = """
body { font: 16px/1.5 system-ui, sans-serif; max-width: 420px; margin: 24px auto;
       padding: 0 12px; color: #1b1f24; }
.badge { display: inline-block; padding: 2px 8px; border-radius: 6px; background: #e8eef5; }
.lang { display: flex; justify-content: flex-end; gap: 12px; font-size: .9rem; }
.lang a { color: #0b5cad; }
.lang a[aria-current] { color: #1b1f24; font-weight: 600; text-decoration: none; }
button { width: 100%; padding: 12px; margin: 6px 0; font: inherit; font-weight: 600;
         border: 0; border-radius: 8px; color: #fff; background: #0b5cad; cursor: pointer; }
button.secondary { background: #4a5360; } button.danger { background: #a1161c; }
:focus-visible { outline: 3px solid #f0a500; outline-offset: 2px; }
"""


def money(language: Language, amount: int) -> str:
    """`50.000 ₫` in Vietnamese, `50,000 VND` in English."""
    grouped = f"{amount:,}".replace(",", CATALOGUES.text(language, "format.thousands"))
    return CATALOGUES.text(language, "format.money", amount=grouped)


def _link(request: web.Request) -> PaymentLink:
    link = request.app[WORLD].find(request.match_info["id"])
    if link is None:
        raise web.HTTPNotFound(text="no such payment link")
    return link


def _message(request: web.Request, language: Language, link: PaymentLink) -> str:
    key = request.query.get("m", "")
    if key not in MESSAGES:
        return ""
    try:
        amount = int(request.query.get("amount", "0"))
    except ValueError:
        amount = 0
    status = CATALOGUES.text(language, f"status.{link.status}")
    return CATALOGUES.text(
        language, f"message.{key}", amount=money(language, amount), status=status
    )


async def page(request: web.Request) -> web.Response:
    link = _link(request)
    switched = switch_redirect(request, secure=False)
    if switched is not None:
        return switched
    lang = request_language(request)

    def t(key: str, **params: object) -> str:
        return html.escape(CATALOGUES.text(lang, key, **params))

    remaining = max(link.amount - link.amount_paid, 0)
    disabled = "" if link.status in ("PENDING", "UNDERPAID") else "disabled"
    link_id = html.escape(link.id)
    body = f"""<!doctype html>
<html lang="{lang}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{t("page.title", order=link.order_code)}</title>
<style>{_STYLE}</style></head><body>
<nav class="lang" aria-label="{t("lang.switch")}">{language_switch(request, lang, CATALOGUES)}</nav>
<h1>{t("page.heading")}</h1>
<p role="status" id="message">{html.escape(_message(request, lang, link))}</p>
<dl>
  <dt>{t("field.order")}</dt><dd id="order">{link.order_code}</dd>
  <dt>{t("field.amount")}</dt><dd>{html.escape(money(lang, link.amount))}</dd>
  <dt>{t("field.paid")}</dt><dd id="paid">{html.escape(money(lang, link.amount_paid))}</dd>
  <dt>{t("field.status")}</dt><dd><span class="badge" id="link-status"
    data-status="{link.status}">{t(f"status.{link.status}")}</span></dd>
</dl>
<form method="post" action="/web/{link_id}/pay">
  <button id="pay" {disabled}>{t("button.pay", amount=money(lang, remaining))}</button></form>
<form method="post" action="/web/{link_id}/pay-less">
  <button id="pay-less" class="secondary" {disabled}>{
        t("button.pay_less", amount=money(lang, max(remaining // 2, 1)))
    }</button></form>
<form method="post" action="/web/{link_id}/cancel">
  <button id="cancel" class="danger" {disabled}>{t("button.cancel")}</button></form>
</body></html>"""
    response = web.Response(text=body, content_type="text/html")
    response.headers["Vary"] = "Accept-Language, Cookie"
    response.headers["Content-Language"] = lang
    return response


async def act(request: web.Request) -> web.Response:
    link = _link(request)
    action = request.match_info["action"]
    remaining = max(link.amount - link.amount_paid, 0)
    message: dict[str, str | int]
    if link.status not in ("PENDING", "UNDERPAID"):
        message = {"m": "closed"}
    elif action == "cancel":
        link.canceled_at = vn_now()
        link.cancellation_reason = "cancelled on the checkout page"
        if link.cancel_url:
            # As PayOS does: back to the merchant's cancel URL, which learns what happened
            # from the query (and must not trust it: it is not signed).
            raise web.HTTPSeeOther(_with_query(link.cancel_url, _cancel_return(link)))
        message = {"m": "cancelled"}
    else:
        amount = remaining if action == "pay" else max(remaining // 2, 1)
        result = await transfer(request.app, link, amount)
        message = {"m": "delivered" if result["delivered"] else "retrying", "amount": amount}
    raise web.HTTPSeeOther(f"/web/{link.id}?" + urlencode(message))


def _cancel_return(link: PaymentLink) -> dict[str, str]:
    """The query PayOS adds to the cancel URL."""
    return {
        "code": "00",
        "id": link.id,
        "cancel": "true",
        "status": "CANCELLED",
        "orderCode": str(link.order_code),
    }


def _with_query(url: str, params: dict[str, str]) -> str:
    return url + ("&" if "?" in url else "?") + urlencode(params)


def add_checkout_routes(app: web.Application) -> None:
    app.router.add_get("/web/{id}", page)
    app.router.add_post("/web/{id}/{action:pay|pay-less|cancel}", act)

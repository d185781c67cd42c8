"""PayOS webhook bodies, shaped and signed as PayOS sends them."""

from __future__ import annotations

from typing import Any

from shared.signing import sign_data

from .state import Transaction


def webhook_body(
    *,
    order_code: int,
    link_id: str,
    description: str,
    tx: Transaction,
    checksum_key: str,
    code: str = "00",
) -> dict[str, Any]:
    """The JSON body of the webhook for transaction `tx` on a payment link."""
    desc = "success" if code == "00" else "failed"
    data = {
        **tx.to_payos(),
        "orderCode": order_code,
        "description": description,
        "currency": "VND",
        "paymentLinkId": link_id,
        "code": code,
        "desc": desc,
    }
    return {
        "code": code,
        "desc": desc,
        "success": code == "00",
        "data": data,
        "signature": sign_data(data, checksum_key),
    }

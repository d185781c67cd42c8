"""Parsing and authenticating a PayOS webhook body."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import bson
from bson.errors import BSONError

from shared.logs import signature_hint
from shared.model import MAX_ORDER_CODE
from shared.signing import verify_data

from .errors import BadSignature, InvalidWebhook

# Fields we act on, with their JSON types; every other field is kept and signed as sent.
DATA_FIELDS: dict[str, type] = {"orderCode": int, "amount": int, "reference": str}
OPTIONAL_STRINGS = (
    "code",
    "desc",
    "description",
    "accountNumber",
    "currency",
    "paymentLinkId",
    "transactionDateTime",
)
MAX_REFERENCE_LEN = 128
# Amounts are JavaScript-safe too (VND), like order codes: and what MongoDB stores as a
# 64-bit integer.
MAX_AMOUNT = MAX_ORDER_CODE


@dataclass(frozen=True, slots=True)
class Webhook:
    """An authenticated webhook: the fields we use plus the signed `data` as received.

    `code`, `desc` and `success` are the unsigned envelope: kept for the record only.
    """

    code: str
    desc: str
    success: bool | None
    data: dict[str, Any]
    order_code: int
    amount: int
    reference: str

    @property
    def paid(self) -> bool:
        """The signed `data.code` is "00"; the envelope (`code`, `success`) is unsigned, so
        it is stored as received and decides nothing, and a missing signed code is no success."""
        return self.data.get("code") == "00"


def parse_webhook(body: bytes, checksum_key: str) -> Webhook:
    """Decode, validate and authenticate a delivery, or raise InvalidWebhook / BadSignature."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidWebhook(
            f"body is not valid JSON: {exc.msg if hasattr(exc, 'msg') else exc}"
        ) from None
    except ValueError:
        # An integer of more than 4,300 digits (Python's int-from-string limit).
        raise InvalidWebhook("body is not valid JSON: number too long") from None
    except RecursionError:
        raise InvalidWebhook("body is not valid JSON: nested too deeply") from None
    if not isinstance(payload, dict):
        raise InvalidWebhook("body must be a JSON object")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise InvalidWebhook("`data` must be an object")
    for name, typ in DATA_FIELDS.items():
        value = data.get(name)
        if value is None:
            raise InvalidWebhook(f"`data.{name}` is required")
        # bool is an int in Python, never in PayOS's JSON.
        if not isinstance(value, typ) or isinstance(value, bool):
            raise InvalidWebhook(
                f"`data.{name}` must be {'an integer' if typ is int else 'a string'}"
            )
    for name in OPTIONAL_STRINGS:
        if name in data and data[name] is not None and not isinstance(data[name], str):
            raise InvalidWebhook(f"`data.{name}` must be a string")
    order_code, amount, reference = data["orderCode"], data["amount"], data["reference"]
    if not 0 < order_code <= MAX_ORDER_CODE:
        raise InvalidWebhook("`data.orderCode` is out of range")
    if not 0 <= amount <= MAX_AMOUNT:
        raise InvalidWebhook("`data.amount` is out of range")
    if not reference or len(reference) > MAX_REFERENCE_LEN:
        raise InvalidWebhook(f"`data.reference` must have 1 to {MAX_REFERENCE_LEN} characters")
    code, desc, success = payload.get("code", ""), payload.get("desc", ""), payload.get("success")
    if not isinstance(code, str) or not isinstance(desc, str):
        raise InvalidWebhook("`code` and `desc` must be strings")
    if success is not None and not isinstance(success, bool):
        raise InvalidWebhook("`success` must be a boolean")

    signature = payload.get("signature")
    if signature is None or signature == "":
        raise BadSignature("signature is missing")
    if not isinstance(signature, str):
        raise InvalidWebhook("`signature` must be a string")
    if not verify_data(data, signature, checksum_key):
        raise BadSignature("signature does not match the data", hint=signature_hint(signature))
    try:
        # What is stored must be storable: an integer beyond 64 bits, or a lone surrogate in
        # the unsigned `code`/`desc`, would otherwise fail in MongoDB's encoder (a 500).
        bson.encode({"code": code, "desc": desc, "data": data})
    except (BSONError, OverflowError, RecursionError):
        raise InvalidWebhook("the webhook holds a value that cannot be stored") from None
    return Webhook(
        code=code,
        desc=desc,
        success=success,
        data=data,
        order_code=order_code,
        amount=amount,
        reference=reference,
    )

"""The webhook payload's checks at their edges: parse_webhook with the payos SDK's signing.

The bounds are written out here, not imported from payload.py, so that changing one there
is a change this file notices.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.signing import sign_data
from tests.helpers import TEST_CHECKSUM_KEY, signed_webhook
from webhook_ingest.errors import BadSignature, InvalidWebhook
from webhook_ingest.payload import Webhook, parse_webhook

# 2^53 - 1: PayOS's order codes and amounts are JavaScript-safe integers.
JS_MAX = 9_007_199_254_740_991
OPTIONAL_STRINGS = (
    "code",
    "desc",
    "description",
    "accountNumber",
    "currency",
    "paymentLinkId",
    "transactionDateTime",
)


def body(**data_changes: Any) -> dict[str, Any]:
    """A webhook with `data` changed (a value of None removes the field), signed again."""
    webhook = signed_webhook(1234, 5_000)
    for name, value in data_changes.items():
        if value is None:
            webhook["data"].pop(name, None)
        else:
            webhook["data"][name] = value
    webhook["signature"] = sign_data(webhook["data"], TEST_CHECKSUM_KEY)
    return webhook


def parse(webhook: dict[str, Any]) -> Webhook:
    return parse_webhook(json.dumps(webhook).encode(), TEST_CHECKSUM_KEY)


@pytest.mark.parametrize("name", OPTIONAL_STRINGS)
@pytest.mark.parametrize("value", [7, 1.5, True, ["00"], {"a": "b"}], ids=type)
def test_each_optional_string_field_must_be_a_string(name: str, value: Any) -> None:
    with pytest.raises(InvalidWebhook, match=f"`data.{name}` must be a string"):
        parse(body(**{name: value}))


@pytest.mark.parametrize("name", OPTIONAL_STRINGS)
def test_each_optional_string_field_may_be_null_or_absent(name: str) -> None:
    webhook = body()
    webhook["data"][name] = None
    webhook["signature"] = sign_data(webhook["data"], TEST_CHECKSUM_KEY)
    assert parse(webhook).data[name] is None
    assert name not in parse(body(**{name: None})).data


@pytest.mark.parametrize("order_code", [1, 2, JS_MAX])
def test_order_codes_from_one_to_the_javascript_maximum_are_accepted(order_code: int) -> None:
    assert parse(body(orderCode=order_code)).order_code == order_code


@pytest.mark.parametrize("order_code", [0, -1, JS_MAX + 1])
def test_order_codes_outside_one_to_the_javascript_maximum_are_refused(order_code: int) -> None:
    with pytest.raises(InvalidWebhook, match="orderCode` is out of range"):
        parse(body(orderCode=order_code))


@pytest.mark.parametrize("amount", [0, 1, JS_MAX])
def test_amounts_from_zero_to_the_javascript_maximum_are_accepted(amount: int) -> None:
    assert parse(body(amount=amount)).amount == amount


@pytest.mark.parametrize("amount", [-1, JS_MAX + 1])
def test_amounts_outside_zero_to_the_javascript_maximum_are_refused(amount: int) -> None:
    with pytest.raises(InvalidWebhook, match="amount` is out of range"):
        parse(body(amount=amount))


@pytest.mark.parametrize("length", [1, 128])
def test_references_of_one_to_128_characters_are_accepted(length: int) -> None:
    assert parse(body(reference="R" * length)).reference == "R" * length


@pytest.mark.parametrize("reference", ["", "R" * 129])
def test_references_empty_or_over_128_characters_are_refused(reference: str) -> None:
    with pytest.raises(InvalidWebhook, match="reference` must have 1 to 128 characters"):
        parse(body(reference=reference))


@pytest.mark.parametrize(
    ("code", "paid"), [("00", True), ("01", False), ("", False), (None, False)]
)
def test_only_a_signed_data_code_of_00_is_paid(code: str | None, paid: bool) -> None:
    webhook = body(code=code)
    # The unsigned envelope says "paid" every time: it decides nothing.
    webhook.update(code="00", success=True, desc="success")
    parsed = parse(webhook)
    assert ("code" in parsed.data) is (code is not None)
    assert parsed.paid is paid


def test_bounds_are_checked_before_the_signature() -> None:
    # A body out of range is a 400 even when its signature is wrong: nothing is verified.
    webhook = body(orderCode=0)
    webhook["signature"] = "0" * 64
    with pytest.raises(InvalidWebhook):
        parse(webhook)
    with pytest.raises(BadSignature):
        parse({**body(), "signature": "0" * 64})


@pytest.mark.parametrize("name", ["orderCode", "amount"])
def test_a_boolean_is_no_integer(name: str) -> None:
    with pytest.raises(InvalidWebhook, match=f"`data.{name}` must be an integer"):
        parse(body(**{name: True}))


def test_the_unsigned_envelope_is_kept_as_received() -> None:
    webhook = {**body(), "code": "01", "desc": "failed", "success": False}
    parsed = parse(webhook)
    assert (parsed.code, parsed.desc, parsed.success) == ("01", "failed", False)


def test_an_envelope_without_code_desc_or_success_is_accepted_as_empty() -> None:
    webhook = body()
    for name in ("code", "desc", "success"):
        webhook.pop(name, None)
    parsed = parse(webhook)
    assert (parsed.code, parsed.desc, parsed.success) == ("", "", None)


@pytest.mark.parametrize("name", ["code", "desc"])
def test_an_envelope_code_or_desc_that_is_no_string_is_refused(name: str) -> None:
    with pytest.raises(InvalidWebhook, match="`code` and `desc` must be strings"):
        parse({**body(), name: 0})


def test_an_envelope_success_that_is_no_boolean_is_refused() -> None:
    with pytest.raises(InvalidWebhook, match="`success` must be a boolean"):
        parse({**body(), "success": "true"})


@pytest.mark.parametrize("signature", [None, ""])
def test_a_null_or_empty_signature_is_missing(signature: str | None) -> None:
    webhook = body()
    webhook["signature"] = signature
    with pytest.raises(BadSignature, match="signature is missing"):
        parse(webhook)
    webhook.pop("signature")
    with pytest.raises(BadSignature, match="signature is missing"):
        parse(webhook)


def test_a_signature_that_is_no_string_is_refused() -> None:
    with pytest.raises(InvalidWebhook, match="`signature` must be a string"):
        parse({**body(), "signature": 12})


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"desc": "\ud800"}, id="lone-surrogate-in-unsigned-desc"),
        pytest.param({"code": "\udfff"}, id="lone-surrogate-in-unsigned-code"),
    ],
)
def test_a_webhook_mongodb_cannot_store_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(InvalidWebhook, match="cannot be stored"):
        parse({**body(), **change})


def test_a_signed_integer_beyond_64_bits_is_refused() -> None:
    with pytest.raises(InvalidWebhook, match="cannot be stored"):
        parse(body(extra=2**64))

"""PayOS signatures: PayOS's own SDK test vectors, and our verification around them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.signing import sign_data, sign_payment_request, verify_data

# PayOS's own SDK test vectors (MIT), kept in the repository: see data/payos/README.md.
VECTORS = Path(__file__).resolve().parent / "data" / "payos" / "testCases.json"
# The key PayOS's SDK tests sign their vectors with.
VECTOR_KEY = "test_checksum_key"


def _cases(kind: str) -> list[Any]:
    cases = [c for c in json.loads(VECTORS.read_text()) if c["type"] == kind]
    assert cases, f"no {kind} vectors"
    return [pytest.param(c, id=c["caseName"]) for c in cases]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for kind, name in (("body", "body_case"), ("create-payment-link", "link_case")):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, _cases(kind))


def test_body_vector_verifies(body_case: dict[str, Any]) -> None:
    payload, expected = body_case["payload"], body_case["expect"]
    assert sign_data(payload, VECTOR_KEY) == expected
    assert verify_data(payload, expected, VECTOR_KEY)


def test_payment_request_vector_signs(link_case: dict[str, Any]) -> None:
    assert sign_payment_request(link_case["payload"], VECTOR_KEY) == link_case["expect"]


def test_vector_with_one_changed_value_fails() -> None:
    [webhook] = [c for c in json.loads(VECTORS.read_text()) if c["caseName"] == "webhook"]
    data = dict(webhook["payload"], amount=webhook["payload"]["amount"] + 1)
    assert not verify_data(data, webhook["expect"], VECTOR_KEY)
    assert not verify_data(webhook["payload"], webhook["expect"], "another-key")


def test_signature_covers_every_key_sorted_with_null_as_empty() -> None:
    import hashlib
    import hmac

    data = {"b": None, "a": 1, "c": True}
    expected = hmac.new(b"k", b"a=1&b=&c=true", hashlib.sha256).hexdigest()
    assert sign_data(data, "k") == expected


@pytest.mark.parametrize("where", ["data-value", "data-key", "signature"])
def test_a_lone_surrogate_never_verifies(where: str) -> None:
    # "\ud800" is valid JSON but not text: nothing PayOS signs can hold it, and it must be a
    # plain "no" (a 401), neither a "yes" nor an exception (a 500).
    data: dict[str, Any] = {"orderCode": 1, "amount": 5_000, "reference": "R1"}
    signature = sign_data(data, VECTOR_KEY)
    if where == "data-value":
        data["description"] = "\ud800"
    elif where == "data-key":
        data["\ud800"] = "x"
    else:
        signature = signature[:-1] + "\ud800"
    assert verify_data(data, signature, VECTOR_KEY) is False

"""PayOS signatures, computed with the payos SDK's own crypto.

The SDK's `webhooks.verify` first parses the payload into a model that forbids unknown
fields, so a field PayOS adds tomorrow would make it reject a genuinely signed webhook. We
sign and verify the `data` object exactly as received instead: every key, sorted.
"""

from __future__ import annotations

import hmac
from typing import Any

from payos._crypto.provider import CryptoProvider

_crypto = CryptoProvider()


def sign_data(data: dict[str, Any], checksum_key: str) -> str:
    """HMAC-SHA256 (hex) of `data` as PayOS signs webhook and response bodies."""
    signature: str | None = _crypto.create_signature_from_object(data, checksum_key)
    if signature is None:
        raise ValueError("cannot sign without a checksum key")
    return signature


def sign_payment_request(data: dict[str, Any], checksum_key: str) -> str | None:
    """The signature PayOS expects on a create-payment-link request (five fields)."""
    signature: str | None = _crypto.create_signature_of_payment_request(data, checksum_key)
    return signature


def verify_data(data: dict[str, Any], signature: str, checksum_key: str) -> bool:
    """True when `signature` signs `data` with `checksum_key` (constant-time compare)."""
    try:
        expected = sign_data(data, checksum_key)
        claimed = signature.encode()
    except UnicodeEncodeError:
        # A lone surrogate (`"\ud800"` is valid JSON, not valid text): nothing PayOS signs.
        return False
    return hmac.compare_digest(expected.encode(), claimed)

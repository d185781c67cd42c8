"""The ingest's OpenAPI document: the bounds are payload.py's own constants."""

from __future__ import annotations

from shared import openapi
from shared.model import MAX_ORDER_CODE
from shared.openapi import Doc
from shared.settings import Settings

from .ingest import Outcome
from .payload import DATA_FIELDS, MAX_AMOUNT, MAX_REFERENCE_LEN, OPTIONAL_STRINGS

_NULLABLE_STRING: Doc = {"type": ["string", "null"]}

WEBHOOK_DATA: Doc = {
    "type": "object",
    "description": "The signed transaction. Every key is signed as received (sorted, "
    "`key=value` joined by `&`, null as empty); keys PayOS adds later are accepted.",
    "required": sorted(DATA_FIELDS),
    "properties": {
        "orderCode": {"type": "integer", "minimum": 1, "maximum": MAX_ORDER_CODE},
        "amount": {"type": "integer", "minimum": 0, "maximum": MAX_AMOUNT},
        "reference": {"type": "string", "minLength": 1, "maxLength": MAX_REFERENCE_LEN},
        **{name: _NULLABLE_STRING for name in OPTIONAL_STRINGS},
    },
    "additionalProperties": True,
}

WEBHOOK: Doc = {
    "type": "object",
    "required": ["data", "signature"],
    "properties": {
        "code": {
            "type": "string",
            "description": "Unsigned, like `desc` and `success`: recorded, decides nothing "
            '(a transfer succeeded when the signed `data.code` is "00").',
        },
        "desc": {"type": "string"},
        "success": {"type": ["boolean", "null"]},
        "data": WEBHOOK_DATA,
        "signature": {
            "type": "string",
            "minLength": 1,
            "description": "HMAC-SHA256 (hex) of `data` with the checksum key; a missing, "
            "empty or wrong one is 401.",
        },
    },
}

ACK: Doc = openapi.success_object(
    {
        "code": {"const": "00"},
        "desc": {"const": "success"},
        "outcome": {"enum": [o.value for o in Outcome]},
    },
    required=["code", "desc", "outcome"],
)


def document(settings: Settings) -> Doc:
    return openapi.document(
        title="webhook-ingest",
        description="Receives PayOS's signed webhooks: verified, stored, applied once.",
        schemas={"Webhook": WEBHOOK, "Acknowledgement": ACK},
        paths={
            "/api/webhooks": {
                "post": {
                    "operationId": "receiveWebhook",
                    "summary": "PayOS's signed delivery.",
                    "description": "Stored first (unique on orderCode + reference), then the "
                    "session is completed once and its status published. A redelivery is "
                    f"acknowledged and changes nothing. Body at most {settings.max_body_bytes} "
                    "bytes.",
                    "requestBody": {
                        "required": True,
                        "content": openapi.json_body({"$ref": "#/components/schemas/Webhook"}),
                    },
                    "responses": {
                        "200": openapi.ok(
                            "Acknowledged (stored now or before).",
                            {"$ref": "#/components/schemas/Acknowledgement"},
                        ),
                        "400": openapi.error("Not a well-formed webhook; nothing stored."),
                        "401": openapi.error("Signature missing or wrong; nothing stored."),
                        "413": openapi.error("Body too large; nothing stored."),
                        "503": openapi.error(
                            "MongoDB unavailable; nothing acknowledged, deliver again."
                        ),
                    },
                }
            }
        },
    )

"""The OpenAPI description of the shop's events API (session_api.events), merged into
session-api's document; the bounds are the validators' own constants."""

from __future__ import annotations

from shared import openapi
from shared.openapi import Doc

from .event_log import MAX_PAGE, MAX_REPLAY
from .events import DEFAULT_LIMIT, MAX_CURSOR_DIGITS

_REF = "#/components/schemas/"

EVENT: Doc = {
    "type": "object",
    "required": ["cursor", "id", "type", "timestamp", "data"],
    "properties": {
        "cursor": {"type": "string", "description": "Continue after this event."},
        "id": {"type": "string", "description": "Stable: the same change, the same id."},
        "type": {
            "enum": [
                "payment.completed",
                "payment.partial",
                "session.expired",
                "session.cancelled",
                "payment.needs_attention",
            ]
        },
        "timestamp": {"type": "string", "format": "date-time"},
        "data": {"type": "object"},
    },
}

EVENT_PAGE: Doc = openapi.success_object(
    {
        "events": {"type": "array", "items": {"$ref": _REF + "Event"}},
        "next": {"type": "string"},
        "hasMore": {"type": "boolean"},
    },
    required=["events", "next", "hasMore"],
)

REPLAY_REQUEST: Doc = {
    "oneOf": [
        {
            "type": "object",
            "required": ["id"],
            "additionalProperties": False,
            "properties": {"id": {"type": "string", "pattern": "^evt_[0-9a-f]{32}$"}},
        },
        {
            "type": "object",
            "required": ["from", "to"],
            "additionalProperties": False,
            "properties": {
                "from": {"type": "string", "format": "date-time"},
                "to": {"type": "string", "format": "date-time"},
            },
        },
    ]
}

REPLAY_RESULT: Doc = openapi.success_object(
    {"replayed": {"type": "integer", "minimum": 0}}, required=["replayed"]
)

SCHEMAS: Doc = {
    "Event": EVENT,
    "EventPage": EVENT_PAGE,
    "ReplayRequest": REPLAY_REQUEST,
    "ReplayResult": REPLAY_RESULT,
}

SECURITY_SCHEMES: Doc = {
    "shopToken": {"type": "http", "scheme": "bearer", "description": "SHOP_API_TOKEN"},
}

PATHS: Doc = {
    "/api/events": {
        "get": {
            "operationId": "listEvents",
            "summary": "The shop's payment events in order, after a cursor (kept 7 days).",
            "security": [{"shopToken": []}],
            "parameters": [
                openapi.query_param(
                    "after",
                    {"type": "string", "pattern": f"^[0-9]{{0,{MAX_CURSOR_DIGITS}}}$"},
                    "The `next` of the previous page (empty or 0: from the oldest kept).",
                ),
                openapi.query_param(
                    "limit",
                    {
                        "anyOf": [
                            {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                            {"const": ""},
                        ]
                    },
                    f"Events per page (default {DEFAULT_LIMIT}).",
                ),
            ],
            "responses": {
                "200": openapi.ok("A page of events.", {"$ref": _REF + "EventPage"}),
                "400": openapi.error("Malformed cursor or limit, or an unknown parameter."),
                "401": openapi.BEARER_UNAUTHORIZED,
                "404": openapi.error("The pull API is off (SHOP_API_TOKEN is not set)."),
                "503": openapi.STORE_UNAVAILABLE,
            },
        }
    },
    "/api/events/replay": {
        "post": {
            "operationId": "replayEvents",
            "summary": "Deliver one event, or every event of a time range, again (same ids), "
            f"to every configured SHOP_WEBHOOK_URL; at most {MAX_REPLAY} events a call.",
            "security": [{"adminToken": []}],
            "requestBody": {
                "required": True,
                "content": openapi.json_body({"$ref": _REF + "ReplayRequest"}),
            },
            "responses": {
                "200": openapi.ok("Queued again.", {"$ref": _REF + "ReplayResult"}),
                "400": openapi.error("Malformed request or too wide a range; nothing changed."),
                "401": openapi.BEARER_UNAUTHORIZED,
                "404": openapi.error("No event with this id."),
                "409": openapi.error("No SHOP_WEBHOOK_URL is configured."),
                "413": openapi.error("Body over SESSION_MAX_BODY_BYTES; nothing changed."),
                "503": openapi.STORE_UNAVAILABLE,
            },
        }
    },
}

"""The gateway's OpenAPI document."""

from __future__ import annotations

from shared import openapi
from shared.openapi import Doc
from shared.settings import Settings

EVENT: Doc = {
    "type": "object",
    "description": "The `data` of each event; its `id:` is `version`.",
    "required": openapi.STATUS_EVENT_REQUIRED,
    "properties": openapi.STATUS_EVENT_PROPERTIES,
}

# One parsed event of the stream (what a client's EventSource hands over).
SSE_EVENT: Doc = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"const": "message"},
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "retry": {"type": "integer", "minimum": 0},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/StatusEvent"},
        },
    },
}


def document(settings: Settings) -> Doc:
    return openapi.document(
        title="stream-gateway",
        description="Server-Sent Events: a session's status now, then every change.",
        readiness_checks=("accepting", "redis", "mongodb", "pubsub"),
        required_checks=("accepting",),
        schemas={"StatusEvent": EVENT},
        paths={
            "/api/webhooks/stream": {
                "get": {
                    "operationId": "streamStatus",
                    "summary": "The session's status, then each change, as `text/event-stream`.",
                    "description": "The first event is the current status; the stream ends "
                    "after a final status (`done`, `expired`, `cancelled`) or after "
                    f"{settings.sse_max_wait_seconds:g} s. Keep-alive comments every "
                    f"{settings.sse_keepalive_seconds:g} s.",
                    "parameters": [
                        openapi.query_param("uuid", openapi.UUID, "The session.", required=True),
                        openapi.query_param(
                            "lastEventId",
                            {"type": "string"},
                            "The version the client has, where it cannot send `Last-Event-ID` "
                            "(a new EventSource); the header wins when both are given.",
                        ),
                        {
                            "name": "Last-Event-ID",
                            "in": "header",
                            "required": False,
                            "description": "The last `id:` received (resume); anything "
                            "but 1 to 18 digits is ignored.",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "The event stream; each `data:` is a StatusEvent.",
                            "content": {"text/event-stream": {"schema": SSE_EVENT}},
                        },
                        "204": {
                            "description": "Final status already seen (Last-Event-ID): stop "
                            "reconnecting."
                        },
                        "400": openapi.error("Malformed uuid; no stream started."),
                        "404": openapi.error("No session with this uuid; no stream started."),
                        "503": openapi.error(
                            "No stream started: this process is full (MAX_STREAMS, "
                            f"{settings.max_streams} by default, lowered to stay below its "
                            "open file limit), shutting down, or the status is unreadable. "
                            "Connect again (the Ingress tries another pod); `Retry-After` "
                            "says when.",
                            headers={
                                "Retry-After": {
                                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                                    "description": "Seconds to wait before reconnecting.",
                                }
                            },
                        ),
                    },
                }
            },
            "/api/stats": {
                "get": {
                    "operationId": "stats",
                    "summary": "Open streams and live subscriptions of this process.",
                    "responses": {
                        "200": openapi.ok(
                            "The counts.",
                            openapi.success_object(
                                {
                                    "connectionCount": {"type": "integer", "minimum": 0},
                                    "activeSubscriptions": {"type": "integer", "minimum": 0},
                                    "pubsubConnected": {"type": "boolean"},
                                },
                                required=[
                                    "connectionCount",
                                    "activeSubscriptions",
                                    "pubsubConnected",
                                ],
                            ),
                        )
                    },
                }
            },
        },
    )

"""What every service's OpenAPI document shares: the error shape, the ops paths, the route.

Each service writes its own document by hand (its `openapi.py`), with the bounds its
validation really applies, taken from the same constants; `/openapi.json` serves it. The
tests compare each document's operations with the app's routes, both ways.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from aiohttp import web

from .model import MAX_ORDER_CODE, UUID_RE, StatusEvent, StreamStatus

Doc = dict[str, Any]

OPENAPI_PATH = "/openapi.json"
OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"

# `{success: false, error, ...}`: every error of every service (shared.web.json_error).
ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA: Doc = {
    "type": "object",
    "required": ["success", "error"],
    "properties": {
        "success": {"const": False},
        "error": {"type": "string", "description": "What was wrong, for a human."},
        "retryable": {
            "type": "boolean",
            "description": "True when the same request may succeed later (503, 502, 504).",
        },
    },
}


# Schemas more than one service's document uses.
UUID: Doc = {"type": "string", "pattern": UUID_RE.pattern, "description": "A lowercase uuid4."}
ORDER_CODE: Doc = {"type": "integer", "minimum": 1, "maximum": MAX_ORDER_CODE}
TIMESTAMP: Doc = {"type": "string", "format": "date-time"}

# Each field of `StatusEvent` by its name in the model; `STATUS_EVENT_PROPERTIES` keys them
# by their JSON names (`StatusEvent.to_dict`), and the tests hold both to the model.
_STATUS_EVENT_FIELDS: Doc = {
    "uuid": UUID,
    "order_code": ORDER_CODE,
    "status": {"enum": [s.value for s in StreamStatus]},
    "amount": {"type": "integer"},
    "amount_paid": {"type": "integer"},
    "updated_at": TIMESTAMP,
    "version": {"type": "integer", "minimum": 1},
}


def _json_name(field: str) -> str:
    first, *rest = field.split("_")
    return first + "".join(part.capitalize() for part in rest)


STATUS_EVENT_PROPERTIES: Doc = {
    _json_name(f.name): _STATUS_EVENT_FIELDS[f.name] for f in fields(StatusEvent)
}
# Every field of the event is always sent.
STATUS_EVENT_REQUIRED = list(STATUS_EVENT_PROPERTIES)


def json_body(schema: Doc) -> Doc:
    return {"application/json": {"schema": schema}}


def ok(description: str, schema: Doc) -> Doc:
    """A JSON success response."""
    return {"description": description, "content": json_body(schema)}


def error(description: str, *, headers: Doc | None = None) -> Doc:
    """A JSON error response in the shared shape."""
    response: Doc = {"description": description, "content": json_body(ERROR_REF)}
    if headers:
        response["headers"] = headers
    return response


def success_object(properties: Doc, required: Iterable[str] = ()) -> Doc:
    """`{success: true, ...}` with `properties`."""
    return {
        "type": "object",
        "required": ["success", *required],
        "properties": {"success": {"const": True}, **properties},
    }


def query_param(name: str, schema: Doc, description: str, *, required: bool = False) -> Doc:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema,
    }


BEARER_UNAUTHORIZED = error(
    "Missing or wrong bearer token.",
    headers={"WWW-Authenticate": {"schema": {"const": "Bearer"}}},
)
STORE_UNAVAILABLE = error("MongoDB unavailable; retry later (`retryable: true`).")


def ops_paths(readiness_checks: Iterable[str], required_checks: Iterable[str]) -> Doc:
    """`/healthz`, `/readyz`, `/metrics` (shared.web.add_ops_routes) and `/openapi.json`."""
    checks = list(readiness_checks)
    required = list(required_checks)
    readiness = {
        "type": "object",
        "required": ["status", "checks", "required"],
        "properties": {
            "status": {"enum": ["ready", "degraded", "not ready"]},
            "checks": {
                "type": "object",
                "properties": {name: {"type": "string"} for name in checks},
                "required": checks,
            },
            "required": {"type": "array", "items": {"enum": required}},
        },
    }
    liveness = {
        "type": "object",
        "required": ["status", "tasks"],
        "properties": {
            "status": {"enum": ["ok", "unhealthy"]},
            "tasks": {
                "type": "object",
                "additionalProperties": {"enum": ["running", "restarting", "finished"]},
            },
        },
    }
    return {
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "tags": ["ops"],
                "summary": "The process is alive: every background task is running.",
                "responses": {
                    "200": ok("Alive.", liveness),
                    "500": ok(
                        "A background task died and waits for its restart (a pod whose "
                        "tasks keep dying fails this probe and is restarted).",
                        liveness,
                    ),
                },
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "tags": ["ops"],
                "summary": "Able to do its job: "
                + ", ".join(required)
                + " (every check is reported; only these decide).",
                "responses": {
                    "200": ok("Ready (`degraded`: a watched backend is down).", readiness),
                    "503": ok("A required check failed; each check says which.", readiness),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "tags": ["ops"],
                "summary": "Prometheus metrics of this process.",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        OPENAPI_PATH: {
            "get": {
                "operationId": "openapi",
                "tags": ["ops"],
                "summary": "This document.",
                "responses": {"200": ok("The OpenAPI document.", {"type": "object"})},
            }
        },
    }


def document(
    *,
    title: str,
    description: str,
    paths: Doc,
    readiness_checks: Iterable[str] = ("mongodb", "redis"),
    required_checks: Iterable[str] = ("mongodb",),
    schemas: Doc | None = None,
    security_schemes: Doc | None = None,
) -> Doc:
    """A whole OpenAPI document: the service's `paths` plus the ops paths and shared parts."""
    components: Doc = {"schemas": {"Error": ERROR_SCHEMA, **(schemas or {})}}
    if security_schemes:
        components["securitySchemes"] = security_schemes
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": API_VERSION, "description": description},
        "paths": {**paths, **ops_paths(readiness_checks, required_checks)},
        "components": components,
    }


def add_openapi_route(app: web.Application, doc: Doc) -> None:
    """Serve `doc` at `GET /openapi.json` (serialised once)."""
    body = json.dumps(doc, separators=(",", ":")).encode()

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app.router.add_get(OPENAPI_PATH, openapi)


_METHODS = frozenset({"get", "put", "post", "delete", "options", "patch", "trace"})


def documented_operations(doc: Doc) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation in `doc`."""
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in _METHODS
    }


# Routes whose name starts with this serve session-api's operator console (issue 13): HTML
# pages and forms for people behind a sign-in, answering in HTML even when they refuse, not
# an API; the OpenAPI document (and so the fuzzing) leaves them out.
CONSOLE_ROUTE_PREFIX = "console."


def app_operations(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path) of every route of `app`, HEAD, static files and the console left out."""
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        and not isinstance(route.resource, web.StaticResource)
        and not (route.resource.name or "").startswith(CONSOLE_ROUTE_PREFIX)
    }

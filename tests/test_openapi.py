"""Each service's OpenAPI document: served at /openapi.json, and true to the app's routes."""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient

from shared.appkeys import SETTINGS
from shared.openapi import OPENAPI_PATH, app_operations, documented_operations
from shared.settings import Settings

Client = TestClient[Any, Any]
SERVICES = ("webhook_ingest", "session_api", "stream_gateway")


def build(module: str, settings: Settings) -> tuple[web.Application, dict[str, Any]]:
    app: web.Application = importlib.import_module(module).create_app(settings)
    doc: dict[str, Any] = importlib.import_module(f"{module}.openapi").document(app[SETTINGS])
    return app, doc


@pytest.mark.parametrize("module", SERVICES)
def test_every_route_is_documented_and_every_documented_operation_is_a_route(
    module: str,
) -> None:
    app, doc = build(module, Settings.from_env({}))
    routes, documented = app_operations(app), documented_operations(doc)
    assert routes - documented == set(), "routes missing from the document"
    assert documented - routes == set(), "documented operations the app does not serve"


@pytest.mark.parametrize("module", SERVICES)
def test_every_operation_documents_its_errors_in_the_shared_shape(module: str) -> None:
    _, doc = build(module, Settings.from_env({}))
    for path, item in doc["paths"].items():
        if path in ("/readyz", "/healthz"):
            continue  # their 503/500 are the probe's report, as their 200 is
        for method, op in item.items():
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path)
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["success", "error"]
    assert error["properties"]["success"] == {"const": False}


@pytest.mark.parametrize("module", SERVICES)
def test_document_loads_in_schemathesis_with_every_operation(module: str) -> None:
    _, doc = build(module, Settings.from_env({}))
    schema = schemathesis.openapi.from_dict(doc)
    labels = {result.ok().label for result in schema.get_all_operations()}  # type: ignore[union-attr]
    assert labels == {f"{m} {p}" for m, p in documented_operations(doc)}


@pytest.mark.parametrize("module", SERVICES)
async def test_openapi_json_is_served(
    aiohttp_client: Callable[..., Awaitable[Client]], settings: Settings, module: str
) -> None:
    app, doc = build(module, settings)
    client = await aiohttp_client(app)
    resp = await client.get(OPENAPI_PATH)
    assert resp.status == 200
    assert resp.content_type == "application/json"
    served = await resp.json()
    assert served == doc
    assert served["openapi"].startswith("3.")


def test_documented_bounds_are_the_validators_own() -> None:
    from session_api import validation
    from shared.model import MAX_ORDER_CODE, UUID_RE
    from webhook_ingest import payload

    _, api = build("session_api", Settings.from_env({}))
    create = api["components"]["schemas"]["CreateSession"]["properties"]
    assert create["amount"]["minimum"] == validation.MIN_AMOUNT
    assert create["amount"]["maximum"] == validation.MAX_AMOUNT
    assert create["accountNumber"]["pattern"] == validation.ACCOUNT_RE.pattern
    assert create["description"]["maxLength"] == validation.MAX_DESCRIPTION
    assert create["uuid"]["pattern"] == UUID_RE.pattern
    _, ingest = build("webhook_ingest", Settings.from_env({}))
    data = ingest["components"]["schemas"]["Webhook"]["properties"]["data"]["properties"]
    assert data["reference"]["maxLength"] == payload.MAX_REFERENCE_LEN
    assert data["orderCode"]["maximum"] == MAX_ORDER_CODE


async def test_paging_given_with_a_uuid_is_validated_as_documented(
    aiohttp_client: Callable[..., Awaitable[Client]], settings: Settings, store: Any
) -> None:
    """Found by the long fuzz: `?uuid=…&limit=-1` used to answer the status (200)."""
    app, _ = build("session_api", settings)
    client = await aiohttp_client(app)
    uuid = "00000000-0000-4000-8000-000000000000"
    for query in ({"limit": "-1"}, {"page": "1.5"}, {"limit": "101"}):
        resp = await client.get("/api/webhooks", params={"uuid": uuid, **query})
        assert resp.status == 400, query
    resp = await client.get("/api/webhooks", params={"uuid": uuid, "page": "2", "limit": ""})
    assert resp.status == 404  # valid paging, no such session


def test_the_status_event_schema_is_the_models_and_both_services_use_it() -> None:
    from datetime import UTC, datetime

    import jsonschema

    from shared import openapi
    from shared.model import MAX_ORDER_CODE, StatusEvent, StreamStatus

    event = StatusEvent(
        uuid="00000000-0000-4000-8000-000000000000",
        order_code=MAX_ORDER_CODE,
        status=StreamStatus.DONE,
        amount=20_000,
        amount_paid=20_000,
        updated_at=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        version=3,
    )
    sent = event.to_dict()
    schema = {
        "type": "object",
        "required": openapi.STATUS_EVENT_REQUIRED,
        "properties": openapi.STATUS_EVENT_PROPERTIES,
        "additionalProperties": False,
    }
    assert list(openapi.STATUS_EVENT_PROPERTIES) == list(sent)
    jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(sent)
    _, gateway = build("stream_gateway", Settings.from_env({}))
    _, api = build("session_api", Settings.from_env({}))
    streamed = gateway["components"]["schemas"]["StatusEvent"]
    polled = api["components"]["schemas"]["Status"]
    assert streamed["properties"] == openapi.STATUS_EVENT_PROPERTIES
    assert {k: v for k, v in polled["properties"].items() if k != "success"} == streamed[
        "properties"
    ]
    assert polled["required"] == ["success", *streamed["required"]]

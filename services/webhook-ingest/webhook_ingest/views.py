"""HTTP views of the ingest: they speak HTTP and map domain errors to status codes."""

from __future__ import annotations

import time

import structlog
from aiohttp import web

from shared.appkeys import SETTINGS
from shared.web import json_error

from .appkeys import INGEST_METRICS, INGESTOR
from .errors import BadSignature, InvalidWebhook, StoreUnavailable
from .payload import parse_webhook

log = structlog.get_logger(__name__)


async def receive_webhook(request: web.Request) -> web.Response:
    """`POST /api/webhooks`: PayOS's signed delivery."""
    started = time.perf_counter()
    metrics = request.app[INGEST_METRICS]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        metrics.webhooks.labels("too_large").inc()
        return json_error(413, f"body exceeds {request.app[SETTINGS].max_body_bytes} bytes")
    try:
        webhook = parse_webhook(body, request.app[SETTINGS].payos_checksum_key)
    except InvalidWebhook as exc:
        metrics.webhooks.labels("invalid").inc()
        return json_error(400, str(exc))
    except BadSignature as exc:
        metrics.webhooks.labels("bad_signature").inc()
        log.warning("webhook_rejected", reason=str(exc), signature=exc.hint)
        return json_error(401, str(exc))

    structlog.contextvars.bind_contextvars(
        order_code=webhook.order_code, reference=webhook.reference
    )
    try:
        result = await request.app[INGESTOR].ingest(webhook)
    except StoreUnavailable as exc:
        metrics.webhooks.labels("store_unavailable").inc()
        log.error("webhook_not_stored", error=str(exc))
        return json_error(503, "storage unavailable, deliver again later", retryable=True)

    metrics.webhooks.labels(result.outcome.value).inc()
    metrics.latency.observe(time.perf_counter() - started)
    log.info(
        "webhook_ingested",
        outcome=result.outcome.value,
        uuid=result.event.uuid if result.event else None,
        published=result.published,
    )
    return web.json_response(
        {"success": True, "code": "00", "desc": "success", "outcome": result.outcome.value}
    )

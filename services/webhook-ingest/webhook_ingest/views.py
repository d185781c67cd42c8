"""HTTP views of the ingest: they speak HTTP; a domain error they raise is answered by
`shared.web.error_middleware` (its status is the error's own)."""

from __future__ import annotations

import time

import structlog
from aiohttp import web

from shared.appkeys import SETTINGS
from shared.errors import ServiceError
from shared.web import read_body

from .appkeys import INGEST_METRICS, INGESTOR
from .errors import BadSignature
from .payload import parse_webhook

log = structlog.get_logger(__name__)


async def receive_webhook(request: web.Request) -> web.Response:
    """`POST /api/webhooks`: PayOS's signed delivery."""
    started = time.perf_counter()
    metrics = request.app[INGEST_METRICS]
    try:
        body = await read_body(request, request.app[SETTINGS].max_body_bytes)
        webhook = parse_webhook(body, request.app[SETTINGS].payos_checksum_key)
        structlog.contextvars.bind_contextvars(
            order_code=webhook.order_code, reference=webhook.reference
        )
        result = await request.app[INGESTOR].ingest(webhook)
    except ServiceError as exc:
        metrics.webhooks.labels(exc.label).inc()
        if isinstance(exc, BadSignature):
            log.warning("webhook_rejected", reason=str(exc), signature=exc.hint)
        raise

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

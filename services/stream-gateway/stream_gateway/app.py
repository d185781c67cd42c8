"""The gateway's app factory."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from weakref import WeakSet

import structlog
from aiohttp import web

from shared.appkeys import CACHE, SETTINGS, STORE, SUPERVISOR
from shared.clients import bounded_redis_ctx, mongo_ctx, supervisor_ctx
from shared.settings import Settings
from shared.status import StatusReader
from shared.web import cors_middleware, error_middleware, new_registry, request_context_middleware

from .admission import Admission, stream_limit
from .appkeys import ADMISSION, GATEWAY_METRICS, HUB, STATUS_READER, STREAMS
from .hub import Hub
from .links import open_link, pubsub_client
from .metrics import GatewayMetrics
from .routes import setup_routes

log = structlog.get_logger(__name__)

# Redis connections of one process: one for commands (status reads, readiness), one pub/sub.
COMMAND_CONNECTIONS = 1


def _client_name(role: str) -> str:
    """How this process's connections show in Redis's CLIENT LIST."""
    return f"stream-gateway-{os.getpid()}-{role}"


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    metrics = app[GATEWAY_METRICS]
    reader = StatusReader(app[CACHE], app[STORE], on_db_query=metrics.db_queries.inc)
    app[STATUS_READER] = reader
    redis = pubsub_client(app[SETTINGS], _client_name("pubsub"))
    hub = Hub(lambda: open_link(redis), reader, metrics, app[SUPERVISOR])
    app[HUB] = hub
    metrics.subscriptions.set_function(lambda: hub.subscription_count)
    metrics.pubsub_connected.set_function(lambda: 1 if hub.connected else 0)
    hub.start()
    yield
    await hub.stop()
    await redis.aclose()


async def _admit(app: web.Application) -> None:
    admission = app[ADMISSION]
    settings = app[SETTINGS]
    admission.limit = stream_limit(settings.max_streams)
    app[GATEWAY_METRICS].stream_limit.set(admission.limit)
    if admission.limit < settings.max_streams:
        log.warning(
            "max_streams_lowered_to_file_limit",
            max_streams=settings.max_streams,
            limit=admission.limit,
        )


async def _close_streams(app: web.Application) -> None:
    """On shutdown: refuse new streams and end the open ones, so browsers reconnect elsewhere."""
    app[HUB].closing = True
    open_streams = app[STREAMS]
    streams = list(open_streams)
    log.info("closing_streams", streams=len(streams))
    for stream in streams:
        stream.stop_streaming()
    timeout = app[SETTINGS].shutdown_timeout_seconds / 2
    async with asyncio.timeout(timeout):
        await asyncio.gather(*(s.wait() for s in streams), return_exceptions=True)


def create_app(settings: Settings) -> web.Application:
    """stream-gateway: `GET /api/webhooks/stream`, `GET /api/stats` plus the ops routes."""
    app = web.Application(
        middlewares=[
            request_context_middleware,
            cors_middleware(settings.cors_origins),
            error_middleware,
        ]
    )
    app[SETTINGS] = settings
    metrics = GatewayMetrics.create(new_registry(app))
    app[GATEWAY_METRICS] = metrics
    app[STREAMS] = WeakSet()
    # The limit is settled at start-up, once the runner has raised the open file limit.
    app[ADMISSION] = Admission(settings.max_streams)
    metrics.open_streams.set_function(lambda: len(app[STREAMS]))
    app.cleanup_ctx.extend(
        [
            supervisor_ctx,
            bounded_redis_ctx(COMMAND_CONNECTIONS, _client_name("commands")),
            mongo_ctx,
            _hub_ctx,
        ]
    )
    app.on_startup.append(_admit)
    app.on_shutdown.append(_close_streams)
    setup_routes(app)
    return app
